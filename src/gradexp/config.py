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
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from gradexp.errors import ConfigError

PROGRESS_MODES = ("auto", "rich", "plain", "off")
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
    threads: int = 1  # torch threads for this run; 0 keeps torch's default (all cores)
    progress: str = "auto"  # auto | rich | plain | off


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
    seed: int = 0


# The schema each option file names in its defaults list, as /schema_<group>_<kind>.
SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"mlp": MLPConfig},
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
    "data": {"synthetic": SyntheticDataConfig, "digits": DigitsDataConfig},
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
    m = cfg.model
    _positive(m.depth, "model.depth")
    _positive(m.width, "model.width")
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
        if m.width % norm.num_groups:
            divisors = [d for d in range(1, m.width + 1) if m.width % d == 0]
            raise ConfigError(
                f"norm.num_groups={norm.num_groups} does not divide model.width={m.width};"
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
