"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML option under ``configs/<group>/`` starts its defaults list with the
schema of its kind (``- /schema_<group>_<kind>@_here_``), so a misspelt key or a
value of the wrong type fails when Hydra composes the config, before any run.

This module must not import torch: the CLI imports it to build ``--help``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, NamedTuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from gradexp.errors import ConfigError

PROGRESS_MODES = ("auto", "rich", "plain", "off")
# Keys that change how a run executes or is shown, never what it computes: never in a run
# directory's name (configs/config.yaml's exclude_keys), never a `gradexp report` column,
# and free to change when a run is resumed.
EXECUTION_KEYS = ("trainer.device", "trainer.progress", "trainer.threads", "trainer.resume")
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


# --- model -----------------------------------------------------------------
@dataclass
class MLPConfig:
    name: str = "mlp"
    depth: int = 20  # number of hidden layers
    width: int = 16
    bias: bool = True


@dataclass
class ResMLPConfig:
    """A residual MLP: a first layer, then depth - 1 blocks h + Linear(act(norm(h)))."""

    name: str = "resmlp"
    depth: int = 20  # weight layers before the head, as in mlp
    width: int = 16
    bias: bool = True
    zero_init_last: bool = False  # zero each block's Linear: every block starts as identity


@dataclass
class CNNConfig:
    name: str = "cnn"
    depth: int = 10  # conv layers
    channels: int = 16
    kernel_size: int = 3
    downsample: list[int] = field(default_factory=list)  # layers (0-based) with stride 2
    bias: bool = True


@dataclass
class ResNetConfig:
    name: str = "resnet"
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2])  # basic blocks per stage
    width: int = 16  # channels of the first stage; doubled at each later stage
    zero_init_last: bool = False  # zero each block's last norm gain (or conv, without norm)


@dataclass
class NFNetConfig:
    name: str = "nfnet"
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2])
    width: int = 16
    alpha: float = 0.2  # residual branch scale
    zero_init_last: bool = True  # zero the gain of each branch's last conv (SkipInit)


@dataclass
class RecurrentConfig:
    """Elman RNN, LSTM and GRU: unrolled step by step unless fused=true."""

    name: str = MISSING
    hidden_size: int = 64
    layers: int = 1
    bias: bool = True
    fused: bool = False  # torch.nn.RNN/LSTM/GRU (cuDNN on GPU); no per-time-step telemetry
    recurrent_init: str = "same"  # same | identity | orthogonal | normal
    recurrent_std: float = 0.01  # for recurrent_init=normal
    recurrent_scale: float = 1.0  # for identity and orthogonal: spectral radius
    read: str = "rows"  # images as sequences: rows (H steps of C*W) | pixels (H*W steps of C)


@dataclass
class IRNNConfig(RecurrentConfig):
    """Le, Jaitly & Hinton 2015: ReLU, identity recurrence, N(0, input_std^2) input/output."""

    name: str = "irnn"
    recurrent_init: str = "identity"
    input_std: float = 0.001  # input and output weights; the init group is not used


@dataclass
class LSTMConfig(RecurrentConfig):
    name: str = "lstm"
    forget_bias: float = 1.0  # the forget gate's bias starts here (b_ih + b_hh)


# --- activation --------------------------------------------------------------
@dataclass
class ActivationConfig:
    name: str = MISSING


@dataclass
class LeakyReLUConfig(ActivationConfig):
    negative_slope: float = 0.01


@dataclass
class RReLUConfig(ActivationConfig):
    lower: float = 1.0 / 8
    upper: float = 1.0 / 3


@dataclass
class PReLUConfig(ActivationConfig):
    init: float = 0.25
    shared: bool = False  # one slope for the layer instead of one per unit


@dataclass
class ELUConfig(ActivationConfig):
    alpha: float = 1.0


# --- init ----------------------------------------------------------------------
@dataclass
class InitConfig:
    name: str = MISSING
    bias: float = 0.0  # constant for every bias (ignored by `default`)


@dataclass
class NormalInitConfig(InitConfig):
    mean: float = 0.0
    std: float = 1.0


@dataclass
class GainInitConfig(InitConfig):
    gain: float = 1.0


@dataclass
class KaimingInitConfig(InitConfig):
    mode: str = "fan_in"


@dataclass
class IdentityInitConfig(InitConfig):
    scale: float = 1.0
    fallback: str = "lecun_normal"  # for weights that are not square


# --- norm ------------------------------------------------------------------------
@dataclass
class NormConfig:
    name: str = MISSING
    eps: float = 1e-5


@dataclass
class BatchNormConfig(NormConfig):
    momentum: float = 0.1


@dataclass
class GroupNormConfig(NormConfig):
    num_groups: int = 8


# --- clip ------------------------------------------------------------------------
@dataclass
class ClipConfig:
    name: str = MISSING


@dataclass
class ValueClipConfig(ClipConfig):
    threshold: float = 5.0


@dataclass
class NormClipConfig(ClipConfig):
    max_norm: float = 1.0
    norm_type: float = 2.0


@dataclass
class AGCConfig(ClipConfig):
    clipping: float = 0.01  # lambda
    eps: float = 1e-3
    # Modules (by name, with their sub-modules) left unclipped: the classifier.
    exclude: list[str] = field(default_factory=lambda: ["head"])


# --- optim -----------------------------------------------------------------------
@dataclass
class OptimConfig:
    name: str = MISSING
    lr: float = 0.05
    weight_decay: float = 0.0  # L2, through the optimizer
    l1: float = 0.0  # coefficient of sum |w| added to the loss
    schedule: Schedule = Schedule.constant


@dataclass
class SGDConfig(OptimConfig):
    momentum: float = 0.9
    nesterov: bool = False


@dataclass
class AdamConfig(OptimConfig):
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class RMSpropConfig(OptimConfig):
    alpha: float = 0.99
    momentum: float = 0.0
    eps: float = 1e-8


# --- data ------------------------------------------------------------------------
@dataclass
class DataConfig:
    name: str = MISSING
    seed: int = 0  # the data set's own seed: sweeping `seed` changes the init only


@dataclass
class SyntheticDataConfig(DataConfig):
    features: int = 32
    classes: int = 10
    modes: int = 3  # Gaussian clusters per class
    noise: float = 1.0  # std of the noise around each centre, relative to the centres' spread
    n_train: int = 8192
    n_test: int = 2048


@dataclass
class DigitsDataConfig(DataConfig):
    test_fraction: float = 0.2


@dataclass
class SyntheticImagesDataConfig(DataConfig):
    """Each class a smooth random template; examples are shifted, noisy copies."""

    size: int = 16
    channels: int = 1
    classes: int = 10
    noise: float = 0.5  # noise std relative to the templates' (unit) std
    shift: int = 2  # random circular shift of up to this many pixels on each axis
    n_train: int = 8192
    n_test: int = 2048


@dataclass
class AddingDataConfig(DataConfig):
    """The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015)."""

    length: int = 100  # T, time steps
    n_train: int = 10000
    n_test: int = 2000


@dataclass
class CopyDataConfig(DataConfig):
    """The copy (memory) task: symbols, a blank delay, a go marker, then recall."""

    symbols: int = 8  # vocabulary
    length: int = 5  # symbols to remember
    delay: int = 50  # blank steps between the symbols and the go marker
    n_train: int = 10000
    n_test: int = 2000


# --- trainer ---------------------------------------------------------------------
@dataclass
class TrainerConfig:
    steps: int = 1000
    batch_size: int = 128
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Amp = Amp.off
    log_every: int = 10
    hist_every: int = 100
    eval_every: int = 100
    deterministic: bool = False
    on_nonfinite: OnNonfinite = OnNonfinite.stop
    per_param: bool = False  # also log every parameter's gradient norm
    tbptt: int = 0  # recurrent models: detach the hidden state every k steps (0: full BPTT)
    time_samples: int = 32  # recurrent models: time steps whose gradient is logged (0: all)
    threads: int = 1  # torch threads for this run; 0 keeps torch's default (all cores)
    progress: str = "auto"  # auto | rich | plain | off
    figure_every: int = 500  # gradient-flow figure to TensorBoard (0: only the PNG at the end)
    checkpoint_every: int = 0  # also save checkpoint.pt every N steps (always: stop and end)
    resume: bool = False  # continue the run in this run dir from its checkpoint.pt


@dataclass
class DiagnoseConfig:
    """The thresholds of the run's verdicts (see gradexp.verdicts), and optional probes."""

    vanishing_ratio: float = 1e-2  # first layer's (time step's) backward signal / last's below
    exploding_ratio: float = 1e2  # ... above this
    grad_bound: float = 1e4  # total gradient norm (before clipping) above this: exploding
    saturated_frac: float = 0.5  # a layer's saturated share of units at or above this
    dead_frac: float = 0.5  # a layer's share of units dead for good at or above this
    sustain: int = 3  # consecutive log steps a ratio must hold (all of them in shorter runs)
    jacobian: bool = False  # MLPs: singular values of the input-output Jacobian at init


# The final metrics a sweeper can optimize (summary.json's "metrics").
OBJECTIVE_METRICS = ("loss/test", "loss/train", "acc/test", "acc/train")


@dataclass
class ObjectiveConfig:
    """The number a run returns to a sweeper that optimizes (hydra/sweeper=optuna)."""

    metric: str = "loss/test"  # one of OBJECTIVE_METRICS, its final value
    # Returned by a run that diverged, failed or ended non-finite. None: 1e6 for a
    # minimizing sweeper, -1e6 for a maximizing one.
    penalty: float | None = None


@dataclass
class Config:
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


RECURRENT_MODELS = ("rnn", "irnn", "lstm", "gru")
CONV_MODELS = ("cnn", "resnet", "nfnet")
RECURRENT_INITS = ("same", "identity", "orthogonal", "normal")
# What each task feeds a model: vectors (B, F), images (B, C, H, W) or sequences (B, T, F).
DATA_KINDS = {
    "synthetic": "vector",
    "digits": "image",
    "synthetic_images": "image",
    "adding": "sequence",
    "copy": "sequence",
}
# The inputs each model reads: MLPs flatten anything, recurrent models read images row by
# row (or pixel by pixel), conv models need images.
MODEL_INPUTS = {
    "mlp": ("vector", "image", "sequence"),
    "resmlp": ("vector", "image", "sequence"),
    **{name: ("image",) for name in CONV_MODELS},
    **{name: ("sequence", "image") for name in RECURRENT_MODELS},
}
_FEEDFORWARD_NORMS = ("none", "batch", "layer", "group")
MODEL_NORMS = {
    "mlp": _FEEDFORWARD_NORMS,
    "resmlp": _FEEDFORWARD_NORMS,
    "cnn": (*_FEEDFORWARD_NORMS, "weight_std"),
    "resnet": (*_FEEDFORWARD_NORMS, "weight_std"),
    "nfnet": ("none",),
    **{name: ("none", "layer") for name in RECURRENT_MODELS},
}
_NORM_REASONS = {
    "nfnet": "it is normalizer-free (its convs are scaled weight-standardized already)",
    "batch": "batch statistics pooled over time steps break the recurrence; "
    "norm=layer normalizes inside the cell",
}


# The schema each option file names in its defaults list, as /schema_<group>_<kind>.
SCHEMAS: dict[str, dict[str, type]] = {
    "model": {
        "mlp": MLPConfig,
        "resmlp": ResMLPConfig,
        "cnn": CNNConfig,
        "resnet": ResNetConfig,
        "nfnet": NFNetConfig,
        "recurrent": RecurrentConfig,
        "irnn": IRNNConfig,
        "lstm": LSTMConfig,
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
    "optim": {"sgd": SGDConfig, "adam": AdamConfig, "rmsprop": RMSpropConfig},
    "data": {
        "synthetic": SyntheticDataConfig,
        "digits": DigitsDataConfig,
        "synthetic_images": SyntheticImagesDataConfig,
        "adding": AddingDataConfig,
        "copy": CopyDataConfig,
    },
    "trainer": {"default": TrainerConfig},
}


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="schema_config", node=Config)
    for group, kinds in SCHEMAS.items():
        for kind, node in kinds.items():
            # Root-level names, not a group: they stay out of `--help`'s group list.
            cs.store(name=f"schema_{group}_{kind}", node=node)


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


def _positive(value: float, key: str) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value}: must be > 0")


def validate(cfg: Config) -> None:
    """Check the values a schema cannot express; raise ConfigError naming the bad one."""
    t = cfg.trainer
    _positive(t.steps, "trainer.steps")
    _positive(t.batch_size, "trainer.batch_size")
    _positive(t.log_every, "trainer.log_every")
    _positive(t.hist_every, "trainer.hist_every")
    _positive(t.eval_every, "trainer.eval_every")
    if t.checkpoint_every < 0:
        raise ConfigError(f"trainer.checkpoint_every={t.checkpoint_every}: must be >= 0")
    if t.figure_every < 0:
        raise ConfigError(f"trainer.figure_every={t.figure_every}: must be >= 0 (0: end only)")
    d = cfg.diagnose
    for key in ("vanishing_ratio", "exploding_ratio", "grad_bound", "sustain"):
        _positive(getattr(d, key), f"diagnose.{key}")
    for key in ("saturated_frac", "dead_frac"):
        if not 0 < getattr(d, key) <= 1:
            raise ConfigError(f"diagnose.{key}={getattr(d, key)}: must be in (0, 1]")
    if d.jacobian and cfg.model.name != "mlp":
        raise ConfigError(f"diagnose.jacobian=true: model={cfg.model.name}; choose model=mlp")
    if d.vanishing_ratio >= 1 or d.exploding_ratio <= 1:
        raise ConfigError(
            f"diagnose.vanishing_ratio={d.vanishing_ratio}, exploding_ratio="
            f"{d.exploding_ratio}: need vanishing_ratio < 1 < exploding_ratio"
        )
    metric = cfg.objective.metric
    if metric not in OBJECTIVE_METRICS:
        raise ConfigError(
            f"objective.metric={metric}: unknown; choose from {', '.join(OBJECTIVE_METRICS)}"
        )
    if metric.startswith("acc/") and cfg.data.name == "adding":
        raise ConfigError(
            f"objective.metric={metric}: data=adding is a regression (MSE), it has no "
            "accuracy; choose loss/test or loss/train"
        )
    _positive(cfg.optim.lr, "optim.lr")
    for key in ("weight_decay", "l1"):
        if getattr(cfg.optim, key) < 0:
            raise ConfigError(f"optim.{key}={getattr(cfg.optim, key)}: must be >= 0")
    if t.threads < 0:
        raise ConfigError(f"trainer.threads={t.threads}: must be >= 0 (0 keeps torch's default)")
    if t.progress not in PROGRESS_MODES:
        raise ConfigError(
            f"trainer.progress={t.progress}: unknown; choose from {', '.join(PROGRESS_MODES)}"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise ConfigError(
            f"trainer.device={t.device}: unknown; choose from auto, cpu, cuda, cuda:N"
        )
    _validate_model(cfg)
    clip = cfg.clip
    if isinstance(clip, ValueClipConfig):
        _positive(clip.threshold, "clip.threshold")
    if isinstance(clip, NormClipConfig):
        _positive(clip.max_norm, "clip.max_norm")
        _positive(clip.norm_type, "clip.norm_type")
    if isinstance(clip, AGCConfig):
        _positive(clip.clipping, "clip.clipping")
        _positive(clip.eps, "clip.eps")
    norm = cfg.norm
    if isinstance(norm, GroupNormConfig):
        _positive(norm.num_groups, "norm.num_groups")
        key = "channels" if isinstance(cfg.model, CNNConfig) else "width"
        width = getattr(cfg.model, key)
        if width % norm.num_groups:
            divisors = [d for d in range(1, width + 1) if width % d == 0]
            raise ConfigError(
                f"norm.num_groups={norm.num_groups} does not divide model.{key}={width};"
                f" choose from {', '.join(map(str, divisors))}"
            )
    init = cfg.init
    if isinstance(init, IdentityInitConfig) and init.fallback not in FALLBACK_INITS:
        raise ConfigError(
            f"init.fallback={init.fallback}: unknown; choose from {', '.join(FALLBACK_INITS)}"
        )
    if isinstance(init, KaimingInitConfig) and init.mode not in ("fan_in", "fan_out"):
        raise ConfigError(f"init.mode={init.mode}: unknown; choose from fan_in, fan_out")
    if isinstance(init, NormalInitConfig) and init.std < 0:
        raise ConfigError(f"init.std={init.std}: must be >= 0")
    act = cfg.activation
    if isinstance(act, RReLUConfig) and not 0 <= act.lower <= act.upper:
        raise ConfigError(
            f"activation.lower={act.lower}, activation.upper={act.upper}: need 0 <= lower <= upper"
        )
    if isinstance(cfg.data, SyntheticDataConfig):
        for key in ("features", "classes", "modes", "n_train", "n_test"):
            _positive(getattr(cfg.data, key), f"data.{key}")
        if cfg.data.classes < 2:
            raise ConfigError(f"data.classes={cfg.data.classes}: need at least 2")
    if isinstance(cfg.optim, SGDConfig) and cfg.optim.nesterov and cfg.optim.momentum <= 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0")
    if isinstance(cfg.data, DigitsDataConfig) and not 0 < cfg.data.test_fraction < 1:
        raise ConfigError(f"data.test_fraction={cfg.data.test_fraction}: must be in (0, 1)")
    _validate_data(cfg.data)
    _validate_pairing(cfg)


def _validate_model(cfg: Config) -> None:
    m = cfg.model
    for key in ("depth", "width", "channels", "kernel_size", "hidden_size", "layers", "alpha"):
        if hasattr(m, key):
            _positive(getattr(m, key), f"model.{key}")
    if hasattr(m, "blocks") and (not m.blocks or min(m.blocks) < 1):
        raise ConfigError(f"model.blocks={list(m.blocks)}: need one or more stages of >= 1")
    if isinstance(m, CNNConfig):
        bad = [i for i in m.downsample if not 0 <= i < m.depth]
        if bad:
            raise ConfigError(
                f"model.downsample={list(m.downsample)}: layer {bad[0]} is not in"
                f" 0..{m.depth - 1} (model.depth={m.depth})"
            )
    if isinstance(m, RecurrentConfig):
        if m.recurrent_init not in RECURRENT_INITS:
            raise ConfigError(
                f"model.recurrent_init={m.recurrent_init}: unknown; choose from"
                f" {', '.join(RECURRENT_INITS)}"
            )
        if m.read not in ("rows", "pixels"):
            raise ConfigError(f"model.read={m.read}: unknown; choose from rows, pixels")
        if m.recurrent_std < 0:
            raise ConfigError(f"model.recurrent_std={m.recurrent_std}: must be >= 0")
        if isinstance(m, IRNNConfig) and m.input_std < 0:
            raise ConfigError(f"model.input_std={m.input_std}: must be >= 0")
        if m.fused:
            fusable = ("tanh", "relu") if m.name in ("rnn", "irnn") else ("tanh",)
            if cfg.activation.name not in fusable:
                raise ConfigError(
                    f"activation={cfg.activation.name}: model.fused=true runs torch's"
                    f" {m.name.upper()}, which supports {', '.join(fusable)}; or set"
                    " model.fused=false"
                )
            if cfg.norm.name != "none":
                raise ConfigError(
                    f"norm={cfg.norm.name}: model.fused=true has no norm inside the cell;"
                    " choose norm=none or model.fused=false"
                )
    t = cfg.trainer
    if t.tbptt < 0:
        raise ConfigError(f"trainer.tbptt={t.tbptt}: must be >= 0 (0: full BPTT)")
    if t.tbptt and not isinstance(m, RecurrentConfig):
        raise ConfigError(
            f"trainer.tbptt={t.tbptt}: model={m.name} is not recurrent; choose from"
            f" {', '.join(RECURRENT_MODELS)}"
        )
    if t.time_samples < 0:
        raise ConfigError(f"trainer.time_samples={t.time_samples}: must be >= 0 (0: all)")


def _validate_data(data: Any) -> None:
    keys = {
        SyntheticImagesDataConfig: ("size", "channels", "n_train", "n_test"),
        AddingDataConfig: ("n_train", "n_test"),
        CopyDataConfig: ("length", "delay", "n_train", "n_test"),
    }.get(type(data), ())
    for key in keys:
        _positive(getattr(data, key), f"data.{key}")
    for key, low in (("classes", 2), ("symbols", 2)):
        if hasattr(data, key) and getattr(data, key) < low:
            raise ConfigError(f"data.{key}={getattr(data, key)}: need at least {low}")
    if isinstance(data, AddingDataConfig) and data.length < 2:
        raise ConfigError(f"data.length={data.length}: need at least 2 (one marker per half)")
    if isinstance(data, SyntheticImagesDataConfig):
        if data.noise < 0:
            raise ConfigError(f"data.noise={data.noise}: must be >= 0")
        if not 0 <= data.shift < data.size:
            raise ConfigError(f"data.shift={data.shift}: must be in 0..{data.size - 1}")


def _validate_pairing(cfg: Config) -> None:
    """Which models read which tasks, and which norms each model takes."""
    model, data, norm = cfg.model.name, cfg.data.name, cfg.norm.name
    kind = DATA_KINDS.get(data)
    if kind is not None and model in MODEL_INPUTS and kind not in MODEL_INPUTS[model]:
        fits = [name for name, kinds in MODEL_INPUTS.items() if kind in kinds]
        raise ConfigError(
            f"model={model} does not fit data={data} (a {kind} task); models for it:"
            f" {', '.join(fits)}"
        )
    allowed = MODEL_NORMS.get(model)
    if allowed is not None and norm not in allowed:
        reason = _NORM_REASONS.get(model)
        if reason is None and model in RECURRENT_MODELS:
            reason = _NORM_REASONS.get(norm)
        takes = f"model={model} takes {', '.join(allowed)}"
        why = f"{reason}; {takes}" if reason else takes
        raise ConfigError(f"norm={norm} does not fit model={model}: {why}")


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
