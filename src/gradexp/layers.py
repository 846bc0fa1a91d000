"""Activations and normalizations, looked up by their short config names.

Activations are always out-of-place: the telemetry hooks hold references to
layer outputs, which an in-place activation would overwrite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
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


# --- weight standardization and 2-D maps -----------------------------------------------
# weight_std has no norm layer: the standardization lives in the conv (create_conv). A
# 1-D model never gets it (config.MODEL_NORMS), but the name must be known to NORMS.
NORMS.register("weight_std", lambda cfg, n: nn.Identity())

WS_EPS = 1e-4  # the weight_std option's default; nfnet's convs use it too


class WSConv2d(nn.Conv2d):
    """A scaled weight-standardized conv (Brock et al. 2021), a Conv2d for init and AGC.

    The conv applies W_hat = gain * (W - mean) / sqrt(max(var * fan_in, eps)), mean and
    (biased) variance over (in, kh, kw) for each output channel, with a learnable gain
    per output channel: each W_hat row has zero mean and squared norm gain^2, so a
    unit-variance input gives a unit-variance output whatever the scale of W. ``eps``
    bounds the scale of a constant (e.g. zeroed) row, as in DeepMind's NFNet code.
    """

    def __init__(self, *args: Any, eps: float = WS_EPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        fan_in = w[0].numel()
        var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
        scale = torch.rsqrt((var * fan_in).clamp_min(self.eps)) * self.gain
        return (w - mean) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


def create_conv(
    norm_cfg: NormConfig,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    bias: bool = True,
) -> nn.Conv2d:
    """A conv whose output keeps the input's size (halved for stride 2).

    norm=weight_std gives a WSConv2d with ``norm_cfg.eps``; any other norm a Conv2d.
    Stride 1 pads "same" (even kernels too); stride 2 pads (k - 1) // 2, which gives
    ceil(H / 2) for odd kernels and H / 2 for even ones.
    """
    padding: int | str = "same" if stride == 1 else (kernel_size - 1) // 2
    if norm_cfg.name == "weight_std":
        return WSConv2d(
            in_channels, out_channels, kernel_size, stride, padding, bias=bias, eps=norm_cfg.eps
        )
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # channels last: layer_norm normalizes the last dim
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


NORMS2D: Registry[Callable[[NormConfig, int], nn.Module]] = Registry("norm")
NORMS2D.register("none", lambda cfg, n: nn.Identity())
NORMS2D.register("weight_std", lambda cfg, n: nn.Identity())  # see create_conv
NORMS2D.register("layer", lambda cfg, n: LayerNorm2d(n, eps=cfg.eps))


@NORMS2D.decorate("batch")
def _batch_norm2d(cfg: NormConfig, num_features: int) -> nn.Module:
    assert isinstance(cfg, BatchNormConfig)
    return nn.BatchNorm2d(num_features, eps=cfg.eps, momentum=cfg.momentum)


NORMS2D.register("group", _group_norm)  # GroupNorm takes (B, C, *) already


def create_norm2d(cfg: NormConfig, channels: int) -> nn.Module:
    """A normalization module for (B, C, H, W) maps (nn.Identity for none and weight_std)."""
    return NORMS2D.get(cfg.name)(cfg, channels)


# --- NF-nets: the nonlinearity's gamma --------------------------------------------------
# Var[g(z)], z ~ N(0, 1), in closed form where one exists.
_CLOSED_FORM_VAR = {
    "relu": 0.5 - 1.0 / (2.0 * math.pi),  # E[relu^2] = 1/2, E[relu] = 1/sqrt(2 pi)
    "identity": 1.0,
}


def normal_variance(fn: Callable[[torch.Tensor], torch.Tensor], half_width: float = 12.0) -> float:
    """Var[fn(z)], z ~ N(0, 1), by Simpson's rule in float64 on 2^16 + 1 points.

    Deterministic; at most a few 1e-9 off for functions with a kink (ReLU) and
    ~1e-12 for smooth ones: the tails beyond 12 sigma weigh < 1e-32.
    """
    n = 2**16  # even: Simpson
    z = torch.linspace(-half_width, half_width, n + 1, dtype=torch.float64)
    w = torch.ones(n + 1, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    w *= (2 * half_width / n) / 3 * torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    with torch.no_grad():
        g = fn(z).to(torch.float64)
    mean = (w * g).sum()
    return float((w * (g - mean) ** 2).sum())


def activation_gamma(cfg: ActivationConfig) -> float:
    """NF-nets' gamma = 1 / sqrt(Var[g(z)]), z ~ N(0, 1), for the activation ``cfg``.

    Closed form for ReLU (sqrt(2 / (1 - 1/pi)) = 1.712859) and identity; otherwise
    numerical quadrature of the module create_act builds, in eval mode (RReLU at its
    mean slope, PReLU at its initial slope).
    """
    var = _CLOSED_FORM_VAR.get(cfg.name)
    if var is None:
        act = create_act(cfg, 1).eval().to(torch.float64)
        var = normal_variance(act)
    return 1.0 / math.sqrt(var)


class Gates(nn.Sigmoid):
    """The sigmoid gates of an LSTM or GRU cell, called once per gate and time step: a
    module (not torch.sigmoid) so activation health sees them; their saturation is
    counted apart from the cell's tanh (``gate_sat_frac``), their mean and std not at
    all (a gate is not a unit's output)."""

    is_gate = True
