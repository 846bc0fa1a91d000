"""Activations and normalizations, looked up by their short config names.

Activations are always out-of-place: the telemetry hooks hold references to
layer outputs, which an in-place activation would overwrite.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from gradexp.config import (
    ActivationConfig,
    BatchNormConfig,
    ELUConfig,
    GroupNormConfig,
    LeakyReLUConfig,
    NormConfig,
    PReLUConfig,
    RReLUConfig,
)
from gradexp.registry import Registry

ACTIVATIONS: Registry[type[nn.Module]] = Registry("activation")
for _name, _layer in {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "rrelu": nn.RReLU,
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}.items():
    ACTIVATIONS.register(_name, _layer)


def get_act_layer(name: str) -> type[nn.Module]:
    """The activation module type registered under ``name``."""
    return ACTIVATIONS.get(name)


def create_act(cfg: ActivationConfig, num_features: int) -> nn.Module:
    """An activation module for a layer of ``num_features`` units."""
    layer = get_act_layer(cfg.name)
    if isinstance(cfg, LeakyReLUConfig):
        return layer(negative_slope=cfg.negative_slope)
    if isinstance(cfg, RReLUConfig):
        return layer(lower=cfg.lower, upper=cfg.upper)
    if isinstance(cfg, PReLUConfig):
        return layer(num_parameters=1 if cfg.shared else num_features, init=cfg.init)
    if isinstance(cfg, ELUConfig):
        return layer(alpha=cfg.alpha)
    return layer()


def act_gain_args(cfg: ActivationConfig) -> tuple[str, float | None]:
    """(nonlinearity, param) for ``torch.nn.init.calculate_gain`` and Kaiming init.

    Leaky slopes set the gain sqrt(2 / (1 + a^2)); RReLU uses its mean slope, as
    it does at evaluation; PReLU its initial slope. Smooth ReLU-likes (ELU, GELU,
    SiLU) take ReLU's gain, the usual practice; SELU the linear gain (LeCun).
    """
    if isinstance(cfg, LeakyReLUConfig):
        return "leaky_relu", cfg.negative_slope
    if isinstance(cfg, RReLUConfig):
        return "leaky_relu", (cfg.lower + cfg.upper) / 2
    if isinstance(cfg, PReLUConfig):
        return "leaky_relu", cfg.init
    return {
        "sigmoid": ("sigmoid", None),
        "tanh": ("tanh", None),
        # PyTorch's advice for self-normalizing nets: var 1/fan_in, i.e. the linear gain.
        "selu": ("linear", None),
        "identity": ("linear", None),
    }.get(cfg.name, ("relu", None))


NORMS: Registry[Callable[[NormConfig, int], nn.Module]] = Registry("norm")
NORMS.register("none", lambda cfg, n: nn.Identity())
NORMS.register("layer", lambda cfg, n: nn.LayerNorm(n, eps=cfg.eps))


@NORMS.decorate("batch")
def _batch_norm(cfg: NormConfig, num_features: int) -> nn.Module:
    assert isinstance(cfg, BatchNormConfig)
    return nn.BatchNorm1d(num_features, eps=cfg.eps, momentum=cfg.momentum)


@NORMS.decorate("group")
def _group_norm(cfg: NormConfig, num_features: int) -> nn.Module:
    assert isinstance(cfg, GroupNormConfig)
    return nn.GroupNorm(cfg.num_groups, num_features, eps=cfg.eps)


def create_norm(cfg: NormConfig, num_features: int) -> nn.Module:
    """A normalization module over ``num_features`` features (nn.Identity for none)."""
    return NORMS.get(cfg.name)(cfg, num_features)
