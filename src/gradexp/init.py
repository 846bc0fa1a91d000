"""Weight initializers, applied to a built model as their own step.

Every Linear and Conv weight gets the chosen initializer, every bias the
constant ``init.bias``; normalization parameters keep their (1, 0) start.
``default`` leaves PyTorch's own initialization untouched: the control.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from gradexp.config import (
    ActivationConfig,
    GainInitConfig,
    IdentityInitConfig,
    InitConfig,
    KaimingInitConfig,
    NormalInitConfig,
)
from gradexp.layers import act_gain_args
from gradexp.registry import Registry

log = logging.getLogger(__name__)

# fn(weight, init config, activation config) fills the weight in place.
Initializer = Callable[[torch.Tensor, InitConfig, ActivationConfig], None]
INITS: Registry[Initializer] = Registry("init")

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fan_in(weight: torch.Tensor) -> int:
    """Inputs per output unit: in_features (x kernel size for convs)."""
    return weight[0].numel()


@INITS.decorate("normal")
def _normal(w: torch.Tensor, cfg: InitConfig, act: ActivationConfig) -> None:
    assert isinstance(cfg, NormalInitConfig)
    nn.init.normal_(w, cfg.mean, cfg.std)


@INITS.decorate("lecun_normal")
def _lecun_normal(w: torch.Tensor, cfg: InitConfig, act: ActivationConfig) -> None:
    nn.init.normal_(w, 0.0, 1.0 / math.sqrt(fan_in(w)))


@INITS.decorate("xavier_normal")
def _xavier_normal(w: torch.Tensor, cfg: InitConfig, act: ActivationConfig) -> None:
    nn.init.xavier_normal_(w, gain=cfg.gain if isinstance(cfg, GainInitConfig) else 1.0)


@INITS.decorate("xavier_uniform")
def _xavier_uniform(w: torch.Tensor, cfg: InitConfig, act: ActivationConfig) -> None:
    nn.init.xavier_uniform_(w, gain=cfg.gain if isinstance(cfg, GainInitConfig) else 1.0)


def _kaiming(fill: Callable[..., torch.Tensor]) -> Initializer:
    def init(w: torch.Tensor, cfg: InitConfig, act: ActivationConfig) -> None:
        mode = cfg.mode if isinstance(cfg, KaimingInitConfig) else "fan_in"
        nonlinearity, slope = act_gain_args(act)
        # The gain follows the activation: sqrt(2/(1+a^2)) for (leaky) ReLU, 5/3 for tanh...
        fill(w, a=slope or 0.0, mode=mode, nonlinearity=nonlinearity)

    return init


INITS.register("kaiming_normal", _kaiming(nn.init.kaiming_normal_))
INITS.register("kaiming_uniform", _kaiming(nn.init.kaiming_uniform_))


@INITS.decorate("orthogonal")
def _orthogonal(w: torch.Tensor, cfg: InitConfig, act: ActivationConfig) -> None:
    nn.init.orthogonal_(w, gain=cfg.gain if isinstance(cfg, GainInitConfig) else 1.0)


@INITS.decorate("default")
def _default(w: torch.Tensor, cfg: InitConfig, act: ActivationConfig) -> None:
    """Leave the weight as PyTorch initialized it."""


def is_square(w: torch.Tensor) -> bool:
    return w.ndim >= 2 and w.shape[0] == w.shape[1]


def _identity(w: torch.Tensor, cfg: IdentityInitConfig) -> None:
    with torch.no_grad():
        if w.ndim == 2:
            nn.init.eye_(w)
        else:  # a conv with as many outputs as inputs: the identity map
            nn.init.dirac_(w)
        w.mul_(cfg.scale)


@torch.no_grad()
def init_weights(model: nn.Module, cfg: InitConfig, act: ActivationConfig) -> list[str]:
    """Initialize every Linear/Conv of ``model``; returns notes for the run log."""
    if cfg.name == "default":
        return []
    notes = []
    fallback: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, WEIGHTED):
            continue
        w = module.weight
        if isinstance(cfg, IdentityInitConfig):
            if is_square(w):
                _identity(w, cfg)
            else:
                INITS.get(cfg.fallback)(w, cfg, act)
                fallback.append(f"{name} {tuple(w.shape)}")
        else:
            INITS.get(cfg.name)(w, cfg, act)
        if module.bias is not None:
            nn.init.constant_(module.bias, cfg.bias)
    if fallback:
        assert isinstance(cfg, IdentityInitConfig)
        notes.append(
            f"init=identity: {len(fallback)} non-square weight(s) use init.fallback="
            f"{cfg.fallback}: {', '.join(fallback)}"
        )
    for note in notes:
        log.info(note)
    return notes
