"""Mean-field theory of model=mlp at initialization, and its hidden stack's Jacobian spectrum.

At infinite width each pre-activation z_l of a random MLP is Gaussian over units,
N(b_l, q_l), and the forward and backward signals follow a one-dimensional recursion
(Poole et al. 2016, Schoenholz et al. 2017). With sigma_w^2 = fan_in * v_l, v_l the
variance of W_l's entries, and sigma_b^2 the variance of a random bias:

    q_1     = sigma_w^2 E[x^2] + sigma_b^2
    q_{l+1} = sigma_w^2 E[phi(z_l)^2] + sigma_b^2
    chi_l   = sigma_w^2 E[phi'(z_l)^2]

Backward, under the gradient independence assumption, the mean square of dl/dh per
unit is m(h_{l-1}) = fan_out(W_l) v_l E[phi'(z_l)^2] m(h_l), and
m(h_L) = out_features * v_head * m(logits). These are the quantities telemetry's
SignalProbe measures as signal_fwd (RMS of h) and signal_bwd (per-example RMS of
dl_i/dh); the backward one is predicted relative to the head's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from gradexp.config import (
    ActivationConfig,
    Config,
    ELUConfig,
    GainInitConfig,
    IdentityInitConfig,
    InitConfig,
    KaimingInitConfig,
    LeakyReLUConfig,
    NormalInitConfig,
    PReLUConfig,
    RReLUConfig,
)
from gradexp.init import INITS
from gradexp.layers import act_gain_args, create_act


class TheoryUnavailable(Exception):
    """The mean-field theory does not cover a configuration; str(e) says why, in one line."""


# --- weight variance per init ------------------------------------------------------------


def _gain(cfg: InitConfig) -> float:
    # As gradexp.init: the gain option where the init has one, else 1.
    return cfg.gain if isinstance(cfg, GainInitConfig) else 1.0


def _kaiming_variance(cfg: InitConfig, act: ActivationConfig, fan_in: int, fan_out: int) -> float:
    mode = cfg.mode if isinstance(cfg, KaimingInitConfig) else "fan_in"
    nonlinearity, slope = act_gain_args(act)
    # The arguments gradexp.init passes to kaiming_*_, which computes its gain this way.
    gain = nn.init.calculate_gain(nonlinearity, slope or 0.0)
    return gain**2 / (fan_in if mode == "fan_in" else fan_out)


def _normal_variance(cfg: InitConfig, act: ActivationConfig, fan_in: int, fan_out: int) -> float:
    assert isinstance(cfg, NormalInitConfig)
    return cfg.std**2


def _xavier_variance(cfg: InitConfig, act: ActivationConfig, fan_in: int, fan_out: int) -> float:
    return _gain(cfg) ** 2 * 2.0 / (fan_in + fan_out)


VarianceRule = Callable[[InitConfig, ActivationConfig, int, int], float]
_VARIANCES: dict[str, VarianceRule] = {
    "normal": _normal_variance,
    "lecun_normal": lambda cfg, act, fan_in, fan_out: 1.0 / fan_in,
    "xavier_normal": _xavier_variance,
    "xavier_uniform": _xavier_variance,  # U[-r, r], r^2 / 3 = gain^2 * 2 / (fan_in + fan_out)
    "kaiming_normal": _kaiming_variance,
    "kaiming_uniform": _kaiming_variance,
    # Orthonormal rows (fan_out <= fan_in) or columns: each has squared norm gain^2.
    "orthogonal": lambda cfg, act, fan_in, fan_out: _gain(cfg) ** 2 / max(fan_in, fan_out),
    # PyTorch's Linear: kaiming_uniform_(a=sqrt(5)), i.e. U[-1/sqrt(fan_in), 1/sqrt(fan_in)].
    "default": lambda cfg, act, fan_in, fan_out: 1.0 / (3.0 * fan_in),
}


def _init_choices() -> str:
    return ", ".join(name for name in INITS.names() if name in _VARIANCES)


def weight_variance(
    init_cfg: InitConfig, act_cfg: ActivationConfig, fan_in: int, fan_out: int
) -> float:
    """Variance of each entry of a (fan_out, fan_in) weight that ``init_cfg`` fills.

    Read from the config, as gradexp.init applies it (Kaiming's gain from the
    activation), not from a model's weights. For init=normal this is std^2 whatever
    the mean.

    Raises:
        TheoryUnavailable: for init=identity (not a random matrix) or an init this
            module does not know.
    """
    rule = _VARIANCES.get(init_cfg.name)
    if rule is None:
        why = (
            "its square weights are scale * I, not a random matrix"
            if isinstance(init_cfg, IdentityInitConfig)
            else "no weight variance is known for it"
        )
        raise TheoryUnavailable(
            f"init={init_cfg.name}: {why}; the theory takes init={{{_init_choices()}}}"
        )
    return float(rule(init_cfg, act_cfg, fan_in, fan_out))


# --- Gaussian expectations -------------------------------------------------------------


def _cdf(x: float) -> float:
    # erfc keeps its relative accuracy in both tails, unlike 1 - erf.
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _piecewise_linear(mean: float, q: float, slope_sq: float) -> tuple[float, float]:
    """phi(z) = z for z > 0, a z below; ``slope_sq`` = E[a^2] (a may be random)."""
    s = math.sqrt(q)
    t = mean / s
    pos, neg = _cdf(t), _cdf(-t)
    second = mean * mean + q
    # E[z^2 1{z > 0}] and E[z^2 1{z < 0}] for z ~ N(mean, q).
    sq_pos = second * pos + mean * s * _pdf(t)
    sq_neg = second * neg - mean * s * _pdf(t)
    return sq_pos + slope_sq * sq_neg, pos + slope_sq * neg


def _exp_below_zero(k: float, mean: float, q: float) -> float:
    """E[exp(k z) 1{z < 0}], z ~ N(mean, q): exp(k m + k^2 q / 2) Phi(-(m + k q) / s)."""
    s = math.sqrt(q)
    # In logs: at large q, exp(k^2 q / 2) overflows where Phi underflows.
    log_cdf = torch.special.log_ndtr(torch.tensor(-(mean + k * q) / s, dtype=torch.float64))
    return math.exp(k * mean + 0.5 * k * k * q + float(log_cdf))


def _elu_like(mean: float, q: float, scale: float, alpha: float) -> tuple[float, float]:
    """phi(z) = scale * z for z > 0, scale * alpha * (e^z - 1) below (ELU, SELU)."""
    sq_pos, pos = _piecewise_linear(mean, q, 0.0)
    e1, e2 = _exp_below_zero(1.0, mean, q), _exp_below_zero(2.0, mean, q)
    neg = _cdf(-mean / math.sqrt(q))
    phi_sq = sq_pos + alpha**2 * (e2 - 2.0 * e1 + neg)  # (e^z - 1)^2 = e^2z - 2 e^z + 1
    dphi_sq = pos + alpha**2 * e2  # phi' = scale * alpha * e^z below 0
    return scale**2 * phi_sq, scale**2 * dphi_sq


# torch.nn.SELU's constants.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946

# Composite Gauss-Legendre for the smooth activations, in x = (z - mean) / sqrt(q).
# (Gauss-Hermite misses E[tanh'(z)^2] by ~1e-3 at q = 10 with 200 nodes, and by ~50%
# at q = 400, where sigmoid and tanh nets with N(0, 1) weights live: it cannot resolve
# a feature of width 1 in z once that is 1/sqrt(q) wide in x.) Panels are at most one
# unit wide in x and, where the activation bends (|z| < BEND), in z too.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(16)
_TAIL = 12.0  # N(0, 1) puts < 4e-33 of its mass beyond 12 sigma
_BEND = 40.0  # beyond |z| = 40 sigmoid, tanh, GELU and SiLU are affine to 1e-16


def _panel_edges(mean: float, s: float) -> np.ndarray:
    """Left and right x-edges of the quadrature panels, shape (panels, 2)."""
    lo = min(max((-_BEND - mean) / s, -_TAIL), _TAIL)
    hi = min(max((_BEND - mean) / s, -_TAIL), _TAIL)
    pieces = [(-_TAIL, lo, 1.0), (lo, hi, min(1.0, 1.0 / s)), (hi, _TAIL, 1.0)]
    edges = []
    for start, stop, width in pieces:
        n = math.ceil((stop - start) / width)
        if n > 0:
            points = np.linspace(start, stop, n + 1)
            edges.append(np.stack([points[:-1], points[1:]], axis=1))
    return np.concatenate(edges)


def _smooth(act: nn.Module, mean: float, q: float) -> tuple[float, float]:
    s = math.sqrt(q)
    edges = _panel_edges(mean, s)
    half = (edges[:, 1:] - edges[:, :1]) / 2
    x = ((edges[:, 1:] + edges[:, :1]) / 2 + half * _GL_NODES).ravel()
    w = (half * _GL_WEIGHTS).ravel() * np.exp(-0.5 * x**2) / math.sqrt(2.0 * math.pi)
    z = torch.tensor(mean + s * x, dtype=torch.float64, requires_grad=True)
    phi = act(z)
    # phi' from torch's own backward: elementwise, so the gradient of the sum.
    (dphi,) = torch.autograd.grad(phi.sum(), z)
    weights = torch.from_numpy(w)
    return float((weights * phi.detach() ** 2).sum()), float((weights * dphi**2).sum())


SMOOTH = ("sigmoid", "tanh", "gelu", "silu")
CLOSED_FORM = ("relu", "leaky_relu", "prelu", "rrelu", "identity", "elu", "selu")


def _negative_slope_sq(cfg: ActivationConfig) -> float:
    """E[a^2] for the slope a below zero of a piecewise-linear activation."""
    if isinstance(cfg, LeakyReLUConfig):
        return cfg.negative_slope**2
    if isinstance(cfg, PReLUConfig):
        return cfg.init**2  # every unit's slope starts at init
    if isinstance(cfg, RReLUConfig):
        # Training mode: a ~ U(lower, upper) per element, E[a^2] = (l^2 + l u + u^2) / 3.
        lo, hi = cfg.lower, cfg.upper
        return (lo * lo + lo * hi + hi * hi) / 3.0
    return {"relu": 0.0, "identity": 1.0}[cfg.name]


def gaussian_moments(act_cfg: ActivationConfig, mean: float, q: float) -> tuple[float, float]:
    """(E[phi(z)^2], E[phi'(z)^2]) for z ~ N(mean, q), phi the activation ``act_cfg``.

    Closed forms for the piecewise ones (ReLU, leaky ReLU, PReLU at its initial
    slope, RReLU in training mode with its random slope, identity, ELU, SELU);
    composite Gauss-Legendre quadrature of the module gradexp builds, in float64,
    for the smooth ones (sigmoid, tanh, GELU, SiLU), with phi' from autograd. Both
    are within 1e-9 relative of fine Simpson integrals for 1e-4 <= q <= 1e12; below
    that ELU's and SELU's E[phi^2] loses ~1e-16 / q to cancellation.

    Raises:
        TheoryUnavailable: for an activation not listed above.
        ValueError: for q <= 0 or a non-finite q.
    """
    if not 0.0 < q < math.inf:
        raise ValueError(f"q={q}: the pre-activation variance must be positive and finite")
    name = act_cfg.name
    if name in SMOOTH:
        return _smooth(create_act(act_cfg, 1).to(torch.float64), mean, q)
    if isinstance(act_cfg, ELUConfig):
        return _elu_like(mean, q, 1.0, act_cfg.alpha)
    if name == "selu":
        return _elu_like(mean, q, SELU_SCALE, SELU_ALPHA)
    if name in CLOSED_FORM:
        return _piecewise_linear(mean, q, _negative_slope_sq(act_cfg))
    raise TheoryUnavailable(
        f"activation={name}: no mean-field expectation for it; the theory takes "
        f"activation={{{', '.join(sorted(SMOOTH + CLOSED_FORM))}}}"
    )


# --- the recursion -------------------------------------------------------------------------


def _positive_finite(value: float, layer: str) -> float:
    if not 0.0 < value < math.inf:
        raise TheoryUnavailable(
            f"the forward signal {'vanishes' if value == 0 else 'overflows'} in float64 at"
            f" {layer}; the theory has no finite prediction"
        )
    return value


def _check_covered(cfg: Config) -> None:
    if cfg.model.name != "mlp":
        raise TheoryUnavailable(
            f"model={cfg.model.name}: the mean-field theory here covers model=mlp only"
        )
    if cfg.norm.name != "none":
        raise TheoryUnavailable(
            f"norm={cfg.norm.name}: a normalization layer rescales the signal; the theory"
            " takes norm=none only"
        )
    init = cfg.init
    if isinstance(init, NormalInitConfig) and init.mean != 0:
        raise TheoryUnavailable(
            f"init.mean={init.mean}: the theory needs zero-mean weights; use init.mean=0"
        )


def mean_field(
    cfg: Config, input_mean_square: float, in_features: int, out_features: int
) -> dict[str, Any]:
    """Mean-field prediction of an mlp's per-layer signals at initialization.

    Reads cfg.model (depth, width, bias), cfg.init, cfg.activation and cfg.norm. Biases
    are the constant init.bias, or with init=default PyTorch's random
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), a variance 1/(3 fan_in) added to q; none with
    model.bias=false. RReLU is taken in training mode, as at a training step.

    Args:
        cfg: the run's config.
        input_mean_square: E[x^2], the data's mean squared input feature.
        in_features: features per (flattened) example.
        out_features: the head's outputs.

    Returns:
        A JSON-ready dict of plain floats: ``signal_fwd`` (predicted RMS of each depth
        layer's output h, hidden.0 .. hidden.{depth-1}, head), ``signal_bwd`` (predicted
        per-example RMS of dl_i/dh relative to the head's, so the head's is 1.0),
        ``signal_fwd_ratio`` and ``signal_bwd_ratio`` (hidden.0 over head of each),
        ``q`` (pre-activation variance of each hidden layer) and ``chi`` (each hidden
        layer's sigma_w^2 E[phi'(z)^2]).

    Raises:
        TheoryUnavailable: for a model other than mlp, a norm other than none,
            init=identity, init=normal with a nonzero mean, an activation without an
            expectation, zero weights, or a signal that under- or overflows float64.
        ValueError: for an input_mean_square that is not positive and finite.
    """
    if not 0.0 < input_mean_square < math.inf:
        raise ValueError(f"input_mean_square={input_mean_square}: must be positive and finite")
    _check_covered(cfg)
    m, init = cfg.model, cfg.init
    sizes = [in_features] + [m.width] * m.depth + [out_features]
    fans = list(zip(sizes[:-1], sizes[1:]))  # (fan_in, fan_out) of each weight, head last
    v = [weight_variance(init, cfg.activation, fan_in, fan_out) for fan_in, fan_out in fans]
    if min(v) == 0:
        raise TheoryUnavailable(
            f"init={init.name} gives all-zero weights here; the theory needs random weights"
        )
    bias_mean = init.bias if m.bias and init.name != "default" else 0.0
    bias_var = [
        1.0 / (3.0 * fan_in) if m.bias and init.name == "default" else 0.0 for fan_in, _ in fans
    ]

    q: list[float] = []
    phi_sq: list[float] = []
    dphi_sq: list[float] = []
    second = input_mean_square  # E[h^2] of the current layer's input
    for i in range(m.depth):
        qi = _positive_finite(sizes[i] * v[i] * second + bias_var[i], f"hidden.{i}")
        second, d = gaussian_moments(cfg.activation, bias_mean, qi)
        q.append(qi)
        phi_sq.append(second)
        dphi_sq.append(d)
    head_sq = _positive_finite(
        sizes[m.depth] * v[m.depth] * second + bias_var[m.depth] + bias_mean**2, "head"
    )

    # Mean square of dl/dh per unit, relative to the logits', from the head down.
    back = [out_features * v[m.depth], 1.0]
    for i in range(m.depth - 2, -1, -1):
        back.insert(0, sizes[i + 2] * v[i + 1] * dphi_sq[i + 1] * back[0])

    if not math.isfinite(back[0]):
        raise TheoryUnavailable(
            "the backward signal overflows float64 below the head; the theory has no finite"
            " prediction"
        )
    signal_fwd = [math.sqrt(p) for p in phi_sq] + [math.sqrt(head_sq)]
    signal_bwd = [math.sqrt(b) for b in back]
    return {
        "signal_fwd_ratio": signal_fwd[0] / signal_fwd[-1],
        "signal_bwd_ratio": signal_bwd[0],
        "signal_fwd": signal_fwd,
        "signal_bwd": signal_bwd,
        "q": q,
        "chi": [sizes[i] * v[i] * dphi_sq[i] for i in range(m.depth)],
    }


# --- the input-output Jacobian -------------------------------------------------------------


def jacobian_spectrum(model: nn.Module, x: torch.Tensor, max_examples: int = 8) -> dict[str, Any]:
    """Singular values of the hidden stack's input-output Jacobian, per example.

    The stack maps x.flatten(1) to the last hidden block's output (the head is left
    out). The first ``max_examples`` examples go through it as one batch, in the
    model's current mode; J_i = d h_i / d x_i, each example's output with respect to
    its own input (the others held fixed: a batch norm in training mode couples them).
    Buffers are cloned, so a BatchNorm's running statistics stay as they were.

    Args:
        model: an mlp: ``.hidden`` (a ModuleList of blocks) and ``.head``.
        x: a batch of inputs.
        max_examples: how many examples, from the first.

    Returns:
        A JSON-ready dict: ``mean``, ``std`` (population), ``min``, ``max`` and
        ``mean_sq`` (mean of s^2) over the singular values of every example's J,
        ``examples`` (how many), and ``singular_values``: the first example's, in
        descending order.
    """
    n = min(max_examples, len(x))
    buffers = [{name: b.clone() for name, b in block.named_buffers()} for block in model.hidden]
    inputs = x[:n].flatten(1).detach().requires_grad_()
    with torch.enable_grad():
        h = inputs
        for block, block_buffers in zip(model.hidden, buffers):
            h = functional_call(block, block_buffers, (h,))
        width = h.shape[1]
        # One forward (one draw of RReLU's slopes), then a batched backward per example i
        # with cotangents e_(i, k), k over the output units: row k of J_i.
        eye = torch.eye(width, dtype=h.dtype, device=h.device)
        rows = []
        for i in range(n):
            cotangents = torch.zeros(width, n, width, dtype=h.dtype, device=h.device)
            cotangents[:, i] = eye
            (grads,) = torch.autograd.grad(
                h, inputs, cotangents, retain_graph=i < n - 1, is_grads_batched=True
            )
            rows.append(grads[:, i])  # (width, in)
    s = torch.linalg.svdvals(torch.stack(rows).double())  # (n, min(width, in)), descending
    return {
        "mean": float(s.mean()),
        "std": float(s.std(correction=0)),
        "min": float(s.min()),
        "max": float(s.max()),
        "mean_sq": float(s.square().mean()),
        "examples": n,
        "singular_values": s[0].tolist(),
    }
