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


def weights_and_biases(
    model: nn.Module,
) -> list[tuple[str, list[torch.Tensor], list[torch.Tensor]]]:
    """(name, weight matrices, biases) of every Linear, Conv and torch RNN module.

    A torch RNN/LSTM/GRU stacks its gates' matrices, (gates * H, in): each gate's
    block is returned as its own weight, so fan-based inits see (H, in) matrices.
    """
    out = []
    for name, module in model.named_modules():
        if isinstance(module, WEIGHTED):
            biases = [module.bias] if module.bias is not None else []
            out.append((name, [module.weight], biases))
        elif isinstance(module, nn.RNNBase):
            for pname, p in module.named_parameters():
                if pname.startswith("weight"):
                    gates = p.shape[0] // module.hidden_size
                    out.append((f"{name}.{pname}", list(p.chunk(gates)), []))
                else:
                    out.append((f"{name}.{pname}", [], [p]))
    return out


@torch.no_grad()
def init_weights(model: nn.Module, cfg: InitConfig, act: ActivationConfig) -> list[str]:
    """Initialize every Linear/Conv/RNN weight of ``model``; returns notes for the run log.

    Then every module with a ``post_init(init_cfg, act_cfg) -> list[str]`` method
    applies what its architecture prescribes over the group's choice (recurrent
    matrices, forget-gate biases, zero-initialized residual branches), also for
    ``init=default``.
    """
    notes = []
    fallback: list[str] = []
    for name, weights, biases in weights_and_biases(model) if cfg.name != "default" else []:
        for w in weights:
            if isinstance(cfg, IdentityInitConfig):
                if is_square(w):
                    _identity(w, cfg)
                else:
                    INITS.get(cfg.fallback)(w, cfg, act)
                    fallback.append(f"{name} {tuple(w.shape)}")
            else:
                INITS.get(cfg.name)(w, cfg, act)
        for b in biases:
            nn.init.constant_(b, cfg.bias)
    for module in model.modules():
        post_init = getattr(module, "post_init", None)
        if callable(post_init):
            notes.extend(post_init(cfg, act))
    if fallback:
        assert isinstance(cfg, IdentityInitConfig)
        notes.append(
            f"init=identity: {len(fallback)} non-square weight(s) use init.fallback="
            f"{cfg.fallback}: {', '.join(fallback)}"
        )
    for note in notes:
        log.info(note)
    return notes
