"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML option under ``configs/<group>/`` starts its defaults list with the
schema of its kind (``- /schema_<group>_<kind>@_here_``), so a misspelt key or a
value of the wrong type fails when Hydra composes the config, before any run. The
schema's defaults are the option's: an option file sets its name and only what
differs. Each schema checks its own values (``validate``): every number against the
range the schema declares for it (``Range``: NaN is always refused, an infinity unless
the range takes it), then what no range expresses; ``validate(cfg)`` adds the checks
that read two groups, and a model family's and a task's facts (the inputs it reads and
the norms it takes; the kind of input it feeds) are on their schemas.

This module must not import torch: the CLI imports it to build ``gradexp train --help``
and to check a command line before any job starts.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, NamedTuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from gradexp.errors import ConfigError

# Keys that change how a run executes or is shown, never what it computes: never in a run
# directory's name (configs/config.yaml's exclude_keys), never a `gradexp report` column,
# and free to change when a run is resumed.
EXECUTION_KEYS = ("trainer.device", "trainer.progress", "trainer.threads", "trainer.resume")


class Alias(NamedTuple):
    """Names the literature uses for one option of a group."""

    names: tuple[str, ...]
    option: str
    why: str  # why this variant: what the names' authors defined


# Resolved on the command line before Hydra composes (gradexp.preflight.resolve_aliases),
# so run names, .hydra/overrides.yaml, summary.json and HParams show the option itself.
ALIASES: dict[str, tuple[Alias, ...]] = {
    "init": (
        Alias(
            ("xavier", "glorot"), "xavier_uniform", "Glorot & Bengio 2010 defined the uniform form"
        ),
        Alias(("kaiming", "he", "msra"), "kaiming_normal", "He et al. 2015 used the normal form"),
        Alias(
            ("lecun",),
            "lecun_normal",
            "LeCun et al. 1998's std 1/sqrt(fan_in), in SELU's normal form",
        ),
    ),
}


def resolve_alias(group: str, name: str) -> str:
    """The option ``name`` stands for in ``group``: itself unless it is an alias."""
    for alias in ALIASES.get(group, ()):
        if name in alias.names:
            return alias.option
    return name


def aliases_help() -> str:
    """The aliases, one line per option, for ``gradexp train --help``."""
    return "\n".join(
        f"  {', '.join(f'{group}={name}' for name in alias.names)}: {alias.option} ({alias.why})"
        for group, aliases in ALIASES.items()
        for alias in aliases
    )


class Amp(enum.Enum):
    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


# Functional form: `raise` is a keyword, and OmegaConf matches enum members by name.
OnNonfinite = enum.Enum("OnNonfinite", ["stop", "skip", "raise"])


class Schedule(enum.Enum):
    constant = "constant"
    cosine = "cosine"


# The largest size or count a key takes: a dimension torch can index with (int32).
INT_LIMIT = 2**31 - 1


def _number(x: float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


@dataclass(frozen=True)
class Range:
    """The values a numeric key takes, and how an error states them.

    A float key must be finite unless ``infinite`` (NaN never passes). Its two bounds read
    as an interval ("must be in [0, 1)"), one bound as a comparison ("must be > 0 and
    finite"). An integer key always has two bounds, the upper one a size limit, read as a
    second comparison ("must be > 0 and <= 2147483647"). ``note`` says what a special value
    means; it follows the first bound ("must be >= 0 (0: full BPTT) and <= ...")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""
    integer: bool = False  # the key is an int (or a list of ints)
    infinite: bool = False  # a float key that takes inf (within its bounds)

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer:
            if not isinstance(value, int):
                return False
        else:
            try:
                value = float(value)
            except OverflowError:  # an int beyond any float
                return False
            if math.isnan(value) or (math.isinf(value) and not self.infinite):
                return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        note = f" ({self.note})" if self.note else ""
        if not self.integer and self.low is not None and self.high is not None:
            left, right = "(["[not self.low_open], ")]"[not self.high_open]
            return f"must be in {left}{_number(self.low)}, {_number(self.high)}{right}{note}"
        clauses = []
        if self.low is not None:
            clauses.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
        if self.high is not None:
            clauses.append(f"{'<' if self.high_open else '<='} {_number(self.high)}")
        if not self.integer and not self.infinite:
            clauses.append("finite")
        if not clauses:
            return f"may be any number{note}"
        first, *rest = clauses
        return " and ".join([f"must be {first}{note}", *rest])


# The ranges most keys take.
FINITE = Range()  # any finite float
POSITIVE = Range(0, low_open=True)  # a finite float > 0
NONNEGATIVE = Range(0)  # a finite float >= 0
FRACTION = Range(0, 1, high_open=True)  # [0, 1): momentum, Adam's betas, RMSprop's alpha
SIZE = Range(0, INT_LIMIT, low_open=True, integer=True)  # a size or a count, >= 1
# torch.manual_seed's own range: a 64-bit integer, signed or not
SEED = Range(-(2**63), 2**64 - 1, integer=True)


def _int_from(low: int, note: str = "") -> Range:
    """An integer key >= ``low`` (and a size torch can index with)."""
    return Range(low, INT_LIMIT, integer=True, note=note)


def ranges_of(cls: type) -> dict[str, Range]:
    """The ranges ``cls`` and its bases declare (``ranges``), a subclass's over its base's."""
    out: dict[str, Range] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("ranges", {}))
    return out


def check_ranges(node: Any, prefix: str = "") -> None:
    """Raise ConfigError naming the first of ``node``'s fields outside its declared range
    (a list's every item must be in it; an unset optional key is not checked)."""
    ranges = ranges_of(type(node))
    for f in fields(node):
        if f.name not in ranges:
            continue
        value, allowed = getattr(node, f.name), ranges[f.name]
        if value is None:
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        if all(item in allowed for item in items):
            continue
        key = f"{prefix}{f.name}"
        if isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={list(value)}: each item {allowed}")
        raise ConfigError(f"{key}={value}: {allowed}")


class Schema:
    """A group's schema: its defaults are the option's (an option file sets only what
    differs), and it checks the values a type cannot express.

    Every numeric field has a declared range (``ranges``: a subclass's add to its base's),
    checked by ``validate``; a subclass's ``validate`` calls ``super().validate()`` first,
    then checks what no range expresses (choices, one key against another)."""

    group: ClassVar[str]  # the config key it sits under, as error messages name it
    ranges: ClassVar[dict[str, Range]] = {}

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value of this group, if any."""
        check_ranges(self, f"{self.group}.")


def _choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value}: unknown; choose from {', '.join(choices)}")


# --- model -----------------------------------------------------------------
_FEEDFORWARD_NORMS = ("none", "batch", "layer", "group")


@dataclass
class ModelConfig(Schema):
    """A model family. Each family's schema declares which inputs it reads and which norm
    options it takes (no defaults here: a family that forgets them fails at once)."""

    group: ClassVar[str] = "model"
    inputs: ClassVar[tuple[str, ...]]  # the data kinds it reads (see DataConfig.kind)
    norms: ClassVar[tuple[str, ...]]  # the norm options it takes

    name: str = MISSING

    def norm_reason(self, norm: str) -> str | None:
        """Why ``norm`` (not in ``norms``) does not fit, when there is more to say."""
        return None


@dataclass
class MLPConfig(ModelConfig):
    inputs = ("vector", "image", "sequence")  # flattens anything
    norms = _FEEDFORWARD_NORMS
    ranges = {"depth": SIZE, "width": SIZE}

    name: str = "mlp"
    depth: int = 20  # number of hidden layers
    width: int = 16
    bias: bool = True


@dataclass
class ResMLPConfig(ModelConfig):
    """A residual MLP: a first layer, then depth - 1 blocks h + Linear(act(norm(h)))."""

    inputs = ("vector", "image", "sequence")
    norms = _FEEDFORWARD_NORMS
    ranges = {"depth": SIZE, "width": SIZE}

    name: str = "resmlp"
    depth: int = 20  # weight layers before the head, as in mlp
    width: int = 16
    bias: bool = True
    zero_init_last: bool = False  # zero each block's Linear: every block starts as identity


@dataclass
class CNNConfig(ModelConfig):
    inputs = ("image",)
    norms = (*_FEEDFORWARD_NORMS, "weight_std")
    ranges = {
        "depth": SIZE,
        "channels": SIZE,
        "kernel_size": SIZE,
        "downsample": _int_from(0),
    }

    name: str = "cnn"
    depth: int = 10  # conv layers
    channels: int = 16
    kernel_size: int = 3
    downsample: list[int] = field(default_factory=list)  # layers (0-based) with stride 2: [3, 6]
    bias: bool = True

    def validate(self) -> None:
        super().validate()
        bad = [i for i in self.downsample if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(
                f"model.downsample={list(self.downsample)}: layer {bad[0]} is not in"
                f" 0..{self.depth - 1} (model.depth={self.depth})"
            )


def _check_blocks(blocks: list[int]) -> None:
    if not blocks:  # each stage's count is in ranges
        raise ConfigError(f"model.blocks={list(blocks)}: need one or more stages of >= 1")


@dataclass
class ResNetConfig(ModelConfig):
    inputs = ("image",)
    norms = (*_FEEDFORWARD_NORMS, "weight_std")
    ranges = {"blocks": SIZE, "width": SIZE}

    name: str = "resnet"
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2])  # basic blocks per stage
    width: int = 16  # channels of the first stage; doubled at each later stage
    zero_init_last: bool = False  # zero each block's last norm gain (or conv, without norm)

    def validate(self) -> None:
        super().validate()
        _check_blocks(self.blocks)


@dataclass
class NFNetConfig(ModelConfig):
    inputs = ("image",)
    norms = ("none",)
    ranges = {"blocks": SIZE, "width": SIZE, "alpha": POSITIVE}

    name: str = "nfnet"
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2])
    width: int = 16
    alpha: float = 0.2  # residual branch scale
    zero_init_last: bool = True  # zero the gain of each branch's last conv (SkipInit)

    def validate(self) -> None:
        super().validate()
        _check_blocks(self.blocks)

    def norm_reason(self, norm: str) -> str | None:
        return "it is normalizer-free (its convs are scaled weight-standardized already)"


RECURRENT_INITS = ("same", "identity", "orthogonal", "normal")


@dataclass
class RecurrentConfig(ModelConfig):
    """Elman RNN, LSTM and GRU: unrolled step by step unless fused=true."""

    inputs = ("sequence", "image")  # images row by row (or pixel by pixel)
    norms = ("none", "layer")
    ranges = {
        "hidden_size": SIZE,
        "layers": SIZE,
        "recurrent_std": NONNEGATIVE,
        "recurrent_scale": FINITE,
    }

    name: str = MISSING
    hidden_size: int = 64
    layers: int = 1
    bias: bool = True
    fused: bool = False  # torch.nn.RNN/LSTM/GRU (cuDNN on GPU); no per-time-step telemetry
    recurrent_init: str = "same"  # same (as init) | identity | orthogonal | normal
    recurrent_std: float = 0.01  # for recurrent_init=normal
    recurrent_scale: float = 1.0  # for identity and orthogonal: spectral radius
    read: str = "rows"  # images as sequences: rows (H steps of C*W) | pixels (H*W steps of C)

    def validate(self) -> None:
        super().validate()
        _choice(self.recurrent_init, "model.recurrent_init", RECURRENT_INITS)
        _choice(self.read, "model.read", ("rows", "pixels"))

    def norm_reason(self, norm: str) -> str | None:
        if norm == "batch":
            return (
                "batch statistics pooled over time steps break the recurrence; "
                "norm=layer normalizes inside the cell"
            )
        return None


@dataclass
class IRNNConfig(RecurrentConfig):
    """Le, Jaitly & Hinton 2015: ReLU, identity recurrence, N(0, input_std^2) input/output."""

    ranges = {"input_std": NONNEGATIVE}

    name: str = "irnn"
    recurrent_init: str = "identity"  # identity x recurrent_scale
    input_std: float = 0.001  # input and output weights; the init group is not used


@dataclass
class LSTMConfig(RecurrentConfig):
    ranges = {"forget_bias": FINITE}

    name: str = "lstm"
    forget_bias: float = 1.0  # the forget gate's bias starts here (b_ih + b_hh)


# --- activation --------------------------------------------------------------
@dataclass
class ActivationConfig(Schema):
    group: ClassVar[str] = "activation"

    name: str = MISSING


@dataclass
class LeakyReLUConfig(ActivationConfig):
    ranges = {"negative_slope": FINITE}

    negative_slope: float = 0.01


@dataclass
class RReLUConfig(ActivationConfig):
    # In training each element's slope ~ U[lower, upper]; in eval (lower + upper) / 2.
    ranges = {"lower": NONNEGATIVE, "upper": NONNEGATIVE}

    lower: float = 0.125
    upper: float = 0.3333333333  # torch's 1/3, to the 10 digits every run has used

    def validate(self) -> None:
        super().validate()
        if not self.lower <= self.upper:
            raise ConfigError(
                f"activation.lower={self.lower}, activation.upper={self.upper}:"
                " need 0 <= lower <= upper"
            )


@dataclass
class PReLUConfig(ActivationConfig):
    ranges = {"init": FINITE}

    init: float = 0.25  # the learned slope's start
    shared: bool = False  # one slope for the layer instead of one per unit


@dataclass
class ELUConfig(ActivationConfig):
    ranges = {"alpha": FINITE}

    alpha: float = 1.0


# --- init ----------------------------------------------------------------------
# Initializers an identity init may fall back to for non-square weights.
FALLBACK_INITS = (
    "lecun_normal",
    "xavier_normal",
    "xavier_uniform",
    "kaiming_normal",
    "kaiming_uniform",
    "orthogonal",
    "default",
)


@dataclass
class InitConfig(Schema):
    group: ClassVar[str] = "init"
    ranges = {"bias": FINITE}

    name: str = MISSING
    bias: float = 0.0  # constant for every bias (ignored by `default`)


@dataclass
class NormalInitConfig(InitConfig):
    ranges = {"mean": FINITE, "std": NONNEGATIVE}

    mean: float = 0.0
    std: float = 1.0


@dataclass
class GainInitConfig(InitConfig):
    ranges = {"gain": NONNEGATIVE}  # xavier's std is gain * ...: torch refuses a negative one

    gain: float = 1.0


@dataclass
class KaimingInitConfig(InitConfig):
    mode: str = "fan_in"  # fan_in | fan_out; the gain follows the activation and its slope

    def validate(self) -> None:
        super().validate()
        _choice(self.mode, "init.mode", ("fan_in", "fan_out"))


@dataclass
class IdentityInitConfig(InitConfig):
    ranges = {"scale": FINITE}

    scale: float = 1.0  # square weights = scale * I
    fallback: str = "lecun_normal"  # for weights that are not square (input, output)

    def validate(self) -> None:
        super().validate()
        _choice(self.fallback, "init.fallback", FALLBACK_INITS)


# --- norm ------------------------------------------------------------------------
@dataclass
class NormConfig(Schema):
    group: ClassVar[str] = "norm"
    ranges = {"eps": POSITIVE}

    name: str = MISSING
    eps: float = 1e-5


@dataclass
class BatchNormConfig(NormConfig):
    ranges = {"momentum": Range(0, 1)}  # the running statistics' update weight

    momentum: float = 0.1


@dataclass
class GroupNormConfig(NormConfig):
    ranges = {"num_groups": SIZE}

    num_groups: int = 8  # must divide model.width (model.channels)


# --- clip ------------------------------------------------------------------------
@dataclass
class ClipConfig(Schema):
    group: ClassVar[str] = "clip"

    name: str = MISSING


@dataclass
class ValueClipConfig(ClipConfig):
    ranges = {"threshold": POSITIVE}

    threshold: float = 5.0  # every gradient component into [-threshold, threshold]


@dataclass
class NormClipConfig(ClipConfig):
    ranges = {
        "max_norm": POSITIVE,
        "norm_type": Range(0, low_open=True, infinite=True, note="inf: the largest |gradient|"),
    }

    max_norm: float = 1.0  # rescale all gradients when their global norm exceeds this
    norm_type: float = 2.0  # the p of the p-norm; inf: the infinity norm


@dataclass
class AGCConfig(ClipConfig):
    ranges = {"clipping": POSITIVE, "eps": POSITIVE}

    clipping: float = 0.01  # lambda: unit-wise ||G_i|| <= lambda * max(||W_i||, eps)
    eps: float = 1e-3
    # Modules (by name, with their sub-modules) left unclipped: the classifier.
    exclude: list[str] = field(default_factory=lambda: ["head"])


# --- optim -----------------------------------------------------------------------
@dataclass
class OptimConfig(Schema):
    group: ClassVar[str] = "optim"
    ranges = {"lr": POSITIVE, "weight_decay": NONNEGATIVE, "l1": NONNEGATIVE}

    name: str = MISSING
    lr: float = 0.01
    weight_decay: float = 0.0  # L2, through the optimizer
    l1: float = 0.0  # coefficient of sum |w| added to the loss
    schedule: Schedule = Schedule.constant


@dataclass
class SGDConfig(OptimConfig):
    ranges = {"momentum": FRACTION}

    momentum: float = 0.9
    nesterov: bool = False

    def validate(self) -> None:
        super().validate()
        if self.nesterov and self.momentum <= 0:
            raise ConfigError("optim.nesterov=true needs optim.momentum > 0")


@dataclass
class AdamConfig(OptimConfig):
    """Adam, and AdamW (optim=adamw: the same keys, weight decay decoupled)."""

    ranges = {"beta1": FRACTION, "beta2": FRACTION, "eps": POSITIVE}

    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class HessianFreeConfig(OptimConfig):
    """Hessian-free optimization (Martens 2010) with Levenberg-Marquardt damping, and
    structural damping for recurrent nets (Martens & Sutskever 2011): see
    gradexp.hessian_free.HessianFree."""

    ranges = {
        "damping": POSITIVE,
        "cg_max_iters": SIZE,
        "cg_decay": Range(0, 1),
        "cg_tol": POSITIVE,
        "curvature_batch": _int_from(0, "0: the whole batch"),
        "structural_damping": NONNEGATIVE,
    }

    lr: float = 1.0  # where the line search along CG's direction starts
    damping: float = 1.0  # lambda at the start; then adapted from the reduction ratio
    cg_max_iters: int = 250
    cg_decay: float = 0.95  # CG starts from this times the previous step's solution
    cg_tol: float = 5e-4  # Martens' relative-progress stopping rule
    curvature_batch: int = 0  # examples for the G v products: the batch's first k
    structural_damping: float = 0.0  # mu: recurrent models' hidden-state damping
    precondition: bool = False  # Martens' diagonal preconditioner (per-example gradients)


@dataclass
class RMSpropConfig(OptimConfig):
    ranges = {"alpha": FRACTION, "momentum": FRACTION, "eps": POSITIVE}

    lr: float = 0.001
    alpha: float = 0.99
    momentum: float = 0.0
    eps: float = 1e-8


# --- data ------------------------------------------------------------------------
@dataclass
class DataConfig(Schema):
    """A task. Each task's schema declares the kind of input it feeds a model."""

    group: ClassVar[str] = "data"
    kind: ClassVar[str]  # vector (B, F), image (B, C, H, W) or sequence (B, T, F)
    ranges = {"seed": SEED}

    name: str = MISSING
    seed: int = 0  # the data set's own seed: sweeping `seed` changes the init only


@dataclass
class SyntheticDataConfig(DataConfig):
    kind = "vector"
    ranges = {
        "features": SIZE,
        "classes": _int_from(2),
        "modes": SIZE,
        "noise": NONNEGATIVE,
        "n_train": SIZE,
        "n_test": SIZE,
    }

    features: int = 32
    classes: int = 10
    modes: int = 3  # Gaussian clusters per class: not linearly separable
    noise: float = 1.0  # std of the noise around each centre, relative to the centres' spread
    n_train: int = 8192
    n_test: int = 2048


@dataclass
class DigitsDataConfig(DataConfig):
    """sklearn's 1,797 8x8 digits (the optional extra [digits]); seed: the split's."""

    kind = "image"
    ranges = {"test_fraction": Range(0, 1, low_open=True, high_open=True)}

    test_fraction: float = 0.2


@dataclass
class SyntheticImagesDataConfig(DataConfig):
    """Each class a smooth random template; examples are shifted, noisy copies."""

    kind = "image"
    ranges = {
        "size": SIZE,
        "channels": SIZE,
        "classes": _int_from(2),
        "noise": NONNEGATIVE,
        "shift": _int_from(0),
        "n_train": SIZE,
        "n_test": SIZE,
    }

    size: int = 16
    channels: int = 1
    classes: int = 10
    noise: float = 0.5  # noise std relative to the templates' (unit) std
    shift: int = 2  # random circular shift of up to this many pixels on each axis
    n_train: int = 8192
    n_test: int = 2048

    def validate(self) -> None:
        super().validate()
        if not self.shift < self.size:
            raise ConfigError(f"data.shift={self.shift}: must be in 0..{self.size - 1}")


@dataclass
class AddingDataConfig(DataConfig):
    """The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015): channel 0 holds
    U[0,1] values, channel 1 marks one of them in each half of the sequence; the target is
    the sum of the two marked values (MSE loss). Predicting the constant 1 scores
    Var(U1 + U2) = 1/6: logged as loss/baseline."""

    kind = "sequence"
    ranges = {"length": _int_from(2, "one marker per half"), "n_train": SIZE, "n_test": SIZE}

    length: int = 100  # T, time steps
    n_train: int = 10000
    n_test: int = 2000


@dataclass
class CopyDataConfig(DataConfig):
    """The copy (memory) task: `length` random symbols, `delay` blank steps, a go marker,
    then the model outputs the symbols in order (cross-entropy and accuracy per symbol)."""

    kind = "sequence"
    ranges = {
        "symbols": _int_from(2),
        "length": SIZE,
        "delay": SIZE,
        "n_train": SIZE,
        "n_test": SIZE,
    }

    symbols: int = 8  # vocabulary
    length: int = 5  # symbols to remember
    delay: int = 50  # blank steps between the symbols and the go marker
    n_train: int = 10000
    n_test: int = 2000


# --- trainer ---------------------------------------------------------------------
PROGRESS_MODES = ("auto", "rich", "plain", "off")


@dataclass
class TrainerConfig(Schema):
    group: ClassVar[str] = "trainer"
    ranges = {
        "steps": Range(0, 10**9, low_open=True, integer=True),
        "batch_size": SIZE,
        "log_every": SIZE,
        "hist_every": SIZE,
        "eval_every": SIZE,
        "tbptt": _int_from(0, "0: full BPTT"),
        "time_samples": _int_from(0, "0: all"),
        "threads": _int_from(0, "0 keeps torch's default"),
        "figure_every": _int_from(0, "0: end only"),
        "checkpoint_every": _int_from(0, "0: on a stop and at the end only"),
    }

    steps: int = 1000
    batch_size: int = 128
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # off | bf16 | fp16 (fp16 uses a gradient scaler; statistics are taken after unscaling)
    amp: Amp = Amp.off
    log_every: int = 10  # scalars and per-layer statistics
    hist_every: int = 100  # gradient histograms
    eval_every: int = 100  # test-set evaluation
    deterministic: bool = False
    on_nonfinite: OnNonfinite = OnNonfinite.stop  # stop | skip | raise
    per_param: bool = False  # also log every parameter's gradient norm
    tbptt: int = 0  # recurrent models: detach the hidden state every k steps (0: full BPTT)
    time_samples: int = 32  # recurrent models: time steps whose gradient is logged (0: all)
    # torch threads for this run: 1 suits small nets on CPU; 0 keeps torch's default (all cores)
    threads: int = 1
    progress: str = "auto"  # auto | rich | plain | off
    figure_every: int = 500  # gradient-flow figure to TensorBoard (0: only the PNG at the end)
    # also save checkpoint.pt every N steps (it is always saved on SIGINT/SIGTERM and at the end)
    checkpoint_every: int = 0
    resume: bool = False  # continue the run in this run dir from its checkpoint.pt

    def validate(self) -> None:
        super().validate()
        _choice(self.progress, "trainer.progress", PROGRESS_MODES)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(
                f"trainer.device={self.device}: unknown; choose from auto, cpu, cuda, cuda:N"
            )


@dataclass
class DiagnoseConfig(Schema):
    """The thresholds of the run's verdicts (see gradexp.verdicts), and optional probes."""

    group: ClassVar[str] = "diagnose"
    ranges = {
        "vanishing_ratio": POSITIVE,
        "exploding_ratio": POSITIVE,
        "grad_bound": POSITIVE,
        "saturated_frac": Range(0, 1, low_open=True),
        "dead_frac": Range(0, 1, low_open=True),
        "sustain": SIZE,
        "loss_blowup": Range(1, low_open=True),
        "weight_growth": Range(1, low_open=True),
        "learned_ratio": Range(0, 1, low_open=True),
        "partly_ratio": Range(0, 1, low_open=True),
    }

    vanishing_ratio: float = 1e-2  # first layer's (time step's) backward signal / last's below
    exploding_ratio: float = 1e2  # ... above this
    grad_bound: float = 1e4  # total gradient norm (before clipping) above this: exploding
    saturated_frac: float = 0.5  # a layer's saturated share of units at or above this
    dead_frac: float = 0.5  # a layer's share of units dead for good at or above this
    sustain: int = 3  # consecutive log steps a ratio must hold (all of them in shorter runs)
    # A finite blow-up (scripts/verdict_thresholds.py: runs that learn or stall peak at
    # 1-3.3x on both; lr 30-1000 blow-ups at 240-2900x loss and 166-4000x weights):
    loss_blowup: float = 10.0  # training loss over max(its step-0 value, the baseline) above
    weight_growth: float = 10.0  # a layer's weight norm over its step-0 value above
    # The outcome, from the final test loss over the input-blind baseline's: at most
    # learned_ratio: learned; at most partly_ratio: partly; above: not learned.
    learned_ratio: float = 0.5
    partly_ratio: float = 0.8
    jacobian: bool = False  # MLPs: singular values of the input-output Jacobian at init

    def validate(self) -> None:
        super().validate()
        if self.vanishing_ratio >= 1 or self.exploding_ratio <= 1:
            raise ConfigError(
                f"diagnose.vanishing_ratio={self.vanishing_ratio}, exploding_ratio="
                f"{self.exploding_ratio}: need vanishing_ratio < 1 < exploding_ratio"
            )
        if self.learned_ratio > self.partly_ratio:
            raise ConfigError(
                f"diagnose.learned_ratio={self.learned_ratio}, partly_ratio="
                f"{self.partly_ratio}: need learned_ratio <= partly_ratio"
            )


# The final metrics a sweeper can optimize (summary.json's "metrics").
OBJECTIVE_METRICS = ("loss/test", "loss/train", "acc/test", "acc/train")


@dataclass
class ObjectiveConfig(Schema):
    """The number a run returns to a sweeper that optimizes (hydra/sweeper=optuna)."""

    group: ClassVar[str] = "objective"
    ranges = {"penalty": FINITE}  # when given

    metric: str = "loss/test"  # one of OBJECTIVE_METRICS, its final value
    # Returned by a run that diverged, failed or ended non-finite. None: 1e6 for a
    # minimizing sweeper, -1e6 for a maximizing one.
    penalty: float | None = None

    def validate(self) -> None:
        super().validate()
        _choice(self.metric, "objective.metric", OBJECTIVE_METRICS)


@dataclass
class Config:
    ranges: ClassVar[dict[str, Range]] = {"seed": SEED}  # the top level's own key

    model: Any = MISSING
    activation: Any = MISSING
    init: Any = MISSING
    norm: Any = MISSING
    clip: Any = MISSING
    optim: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = MISSING
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    seed: int = 0


# The schema each option file names in its defaults list, as /schema_<group>_<key>: a
# model's by the option's own name (rnn and gru share theirs), the others' by their kind.
SCHEMAS: dict[str, dict[str, type[Schema]]] = {
    "model": {
        "mlp": MLPConfig,
        "resmlp": ResMLPConfig,
        "cnn": CNNConfig,
        "resnet": ResNetConfig,
        "nfnet": NFNetConfig,
        "rnn": RecurrentConfig,
        "irnn": IRNNConfig,
        "lstm": LSTMConfig,
        "gru": RecurrentConfig,
    },
    "activation": {
        "plain": ActivationConfig,
        "leaky_relu": LeakyReLUConfig,
        "rrelu": RReLUConfig,
        "prelu": PReLUConfig,
        "elu": ELUConfig,
    },
    "init": {
        "plain": InitConfig,
        "normal": NormalInitConfig,
        "gain": GainInitConfig,
        "kaiming": KaimingInitConfig,
        "identity": IdentityInitConfig,
    },
    "norm": {"plain": NormConfig, "batch": BatchNormConfig, "group": GroupNormConfig},
    "clip": {
        "plain": ClipConfig,
        "value": ValueClipConfig,
        "norm": NormClipConfig,
        "agc": AGCConfig,
    },
    "optim": {
        "sgd": SGDConfig,
        "adam": AdamConfig,
        "rmsprop": RMSpropConfig,
        "hessian_free": HessianFreeConfig,
    },
    "data": {
        "synthetic": SyntheticDataConfig,
        "digits": DigitsDataConfig,
        "synthetic_images": SyntheticImagesDataConfig,
        "adding": AddingDataConfig,
        "copy": CopyDataConfig,
    },
    "trainer": {"default": TrainerConfig},
}
# Each model's and task's facts, by option name (read from their schemas).
MODEL_INPUTS = {name: schema.inputs for name, schema in SCHEMAS["model"].items()}
MODEL_NORMS = {name: schema.norms for name, schema in SCHEMAS["model"].items()}
RECURRENT_MODELS = tuple(
    name for name, schema in SCHEMAS["model"].items() if issubclass(schema, RecurrentConfig)
)
DATA_KINDS = {name: schema.kind for name, schema in SCHEMAS["data"].items()}


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent; done when this module is
    imported, so whoever composes the config has them)."""
    cs = ConfigStore.instance()
    cs.store(name="schema_config", node=Config)
    for group, kinds in SCHEMAS.items():
        for kind, node in kinds.items():
            # Root-level names, not a group: they stay out of `--help`'s group list.
            cs.store(name=f"schema_{group}_{kind}", node=node)


register_configs()


def flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """A config as {"dotted.key": value} (enums by name): what a checkpoint records of it."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            out.update(flat(value, f"{key}."))
        else:
            out[key] = value.name if isinstance(value, enum.Enum) else value
    return out


def validate(cfg: Config) -> None:
    """Check the values a schema cannot express; raise ConfigError naming the bad one.

    Each group checks its own values; what depends on two groups is checked here."""
    check_ranges(cfg)
    groups = (cfg.trainer, cfg.diagnose, cfg.objective, cfg.optim, cfg.model, cfg.clip)
    for node in (*groups, cfg.norm, cfg.init, cfg.activation, cfg.data):
        node.validate()
    _validate_across(cfg)


def _validate_across(cfg: Config) -> None:
    """The checks that read two groups: which models read which tasks and take which norms,
    a fused cell's activation and norm, and the options only some models or tasks have."""
    model, data, norm = cfg.model, cfg.data, cfg.norm
    if cfg.diagnose.jacobian and model.name != "mlp":
        raise ConfigError(f"diagnose.jacobian=true: model={model.name}; choose model=mlp")
    metric = cfg.objective.metric
    if metric.startswith("acc/") and data.name == "adding":
        raise ConfigError(
            f"objective.metric={metric}: data=adding is a regression (MSE), it has no "
            "accuracy; choose loss/test or loss/train"
        )
    recurrent = isinstance(model, RecurrentConfig)
    if recurrent and model.fused:
        fusable = ("tanh", "relu") if model.name in ("rnn", "irnn") else ("tanh",)
        if cfg.activation.name not in fusable:
            raise ConfigError(
                f"activation={cfg.activation.name}: model.fused=true runs torch's"
                f" {model.name.upper()}, which supports {', '.join(fusable)}; or set"
                " model.fused=false"
            )
        if norm.name != "none":
            raise ConfigError(
                f"norm={norm.name}: model.fused=true has no norm inside the cell;"
                " choose norm=none or model.fused=false"
            )
    tbptt = cfg.trainer.tbptt
    if tbptt and not recurrent:
        raise ConfigError(
            f"trainer.tbptt={tbptt}: model={model.name} is not recurrent; choose from"
            f" {', '.join(RECURRENT_MODELS)}"
        )
    if isinstance(cfg.optim, HessianFreeConfig):
        _validate_hessian_free(cfg)
    if data.kind not in model.inputs:
        fits = [name for name, kinds in MODEL_INPUTS.items() if data.kind in kinds]
        raise ConfigError(
            f"model={model.name} does not fit data={data.name} (a {data.kind} task); models"
            f" for it: {', '.join(fits)}"
        )
    if norm.name not in model.norms:
        reason = model.norm_reason(norm.name)
        takes = f"model={model.name} takes {', '.join(model.norms)}"
        raise ConfigError(
            f"norm={norm.name} does not fit model={model.name}: "
            + (f"{reason}; {takes}" if reason else takes)
        )
    if isinstance(norm, GroupNormConfig):
        key = "channels" if isinstance(model, CNNConfig) else "width"
        width = getattr(model, key)
        if width % norm.num_groups:
            divisors = [d for d in range(1, width + 1) if width % d == 0]
            raise ConfigError(
                f"norm.num_groups={norm.num_groups} does not divide model.{key}={width};"
                f" choose from {', '.join(map(str, divisors))}"
            )


def _validate_hessian_free(cfg: Config) -> None:
    """optim=hessian_free against the rest: it bounds its step by damping and a line
    search (no clipping), takes its curvature in float32 or wider (no AMP), and its
    curvature batch is part of the batch."""
    hf, t = cfg.optim, cfg.trainer
    if cfg.clip.name != "none":
        raise ConfigError(
            f"clip={cfg.clip.name}: optim=hessian_free bounds its step by damping and a line"
            " search, and clipping its gradient would change the system CG solves; choose"
            " clip=none"
        )
    if t.amp != Amp.off:
        raise ConfigError(
            f"trainer.amp={t.amp.name}: optim=hessian_free's curvature products and line"
            " search need full precision; choose trainer.amp=off"
        )
    if hf.curvature_batch > t.batch_size:
        raise ConfigError(
            f"optim.curvature_batch={hf.curvature_batch}: larger than trainer.batch_size="
            f"{t.batch_size}; choose 1 to {t.batch_size}, or 0 for the whole batch"
        )
    if hf.structural_damping and not isinstance(cfg.model, RecurrentConfig):
        raise ConfigError(
            f"optim.structural_damping={hf.structural_damping}: damps the hidden states of"
            f" recurrent layers and model={cfg.model.name} has none; choose from"
            f" {', '.join(RECURRENT_MODELS)}, or optim.structural_damping=0"
        )
    if hf.precondition and cfg.norm.name == "batch":
        raise ConfigError(
            "optim.precondition=true: needs per-example gradients and norm=batch couples the"
            " examples of a batch; choose another norm or optim.precondition=false"
        )


def _check_known_keys(obj: Any, path: str = "") -> None:
    """Reject keys no schema has: `+trainer.stepz=5` composes (`+` adds a key), and
    OmegaConf.to_object would keep it as a stray attribute that nothing reads."""
    if not is_dataclass(obj):
        return
    names = [f.name for f in fields(obj)]
    for key in vars(obj):
        if key not in names:
            full = f"{path}.{key}" if path else key
            raise ConfigError(f"{full}: unknown key; {path or 'the config'} has {', '.join(names)}")
    for name in names:
        _check_known_keys(getattr(obj, name), f"{path}.{name}" if path else name)


def to_config(cfg: Any) -> Config:
    """The composed DictConfig as typed dataclasses, validated."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    _check_known_keys(obj)
    validate(obj)
    return obj
