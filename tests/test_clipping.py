"""gradexp.clipping.Clipper against oracles: torch's clip functions and a plain AGC loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradexp.clipping import Clipper
from gradexp.config import AGCConfig, ClipConfig, NormClipConfig, ValueClipConfig


class Net(nn.Module):
    """Every parameter shape AGC must handle, in depth layers.

    Layer 0: a conv (4-D weight) and a scalar gain. Layers 1-3: square linears, whose
    weights (and biases) share shapes and so get stacked. Layer 4: a (1, 8) weight,
    whose unit view has the shape of an 8-bias. Layer 5: ``headx``, whose name starts
    like the head's. Layer 6: the head.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gain = nn.Parameter(torch.tensor(1.5))
        self.body = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.narrow = nn.Linear(8, 1)
        self.headx = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def layers(self) -> dict[str, int]:
        """Top-level name prefix -> depth layer."""
        return {
            "conv": 0,
            "gain": 0,
            "body.0": 1,
            "body.1": 2,
            "body.2": 3,
            "narrow": 4,
            "headx": 5,
            "head": 6,
        }


NUM_LAYERS = 7


def layer_of(name: str, net: Net) -> int:
    # Longest matching prefix, so "headx.weight" is not taken for "head".
    best = max((p for p in net.layers() if name == p or name.startswith(p + ".")), key=len)
    return net.layers()[best]


def make_net(seed: int = 0) -> tuple[Net, list[str], list[nn.Parameter], list[int]]:
    torch.manual_seed(seed)
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]
    return net, names, params, [layer_of(n, net) for n in names]


def set_grads(params: list[nn.Parameter], scale: float = 1.0, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale


def clipper(cfg: ClipConfig, net_parts) -> Clipper:
    _, names, params, layers = net_parts
    return Clipper(cfg, params, names, layers, NUM_LAYERS)


def grads_of(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in params]


# --- norm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [10.0, 1e-4])  # above and below max_norm
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_norm_mode_matches_clip_grad_norm(scale, norm_type):
    parts = make_net()
    params = parts[2]
    set_grads(params, scale)
    oracle = [nn.Parameter(p.detach().clone()) for p in params]
    for o, p in zip(oracle, params, strict=True):
        o.grad = p.grad.clone()
    total = nn.utils.clip_grad_norm_(oracle, 1.0, norm_type)
    stats = clipper(NormClipConfig(name="norm", max_norm=1.0, norm_type=norm_type), parts)(
        measure=True
    )
    for p, o in zip(params, oracle, strict=True):
        torch.testing.assert_close(p.grad, o.grad)
    coef = min(1.0, 1.0 / (total.item() + 1e-6))
    assert stats["coef"].item() == pytest.approx(coef, rel=1e-5)
    if scale > 1:
        assert stats["coef"].item() < 0.1
    else:
        assert stats["coef"].item() == 1.0


def test_norm_mode_total_norm_is_by_hand():
    parts = make_net()
    params = parts[2]
    set_grads(params, 3.0)
    total = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
    before = grads_of(params)
    stats = clipper(NormClipConfig(name="norm", max_norm=2.0), parts)(measure=True)
    coef = 2.0 / (total + 1e-6)
    assert stats["coef"].item() == pytest.approx(coef, rel=1e-5)
    after = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
    assert after == pytest.approx(2.0, rel=1e-5)
    for p, b in zip(params, before, strict=True):
        torch.testing.assert_close(p.grad, b * coef)


def test_norm_mode_without_measure_clips_and_returns_nothing():
    parts = make_net()
    params = parts[2]
    set_grads(params, 10.0)
    assert clipper(NormClipConfig(name="norm", max_norm=1.0), parts)(measure=False) == {}
    total = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
    assert total == pytest.approx(1.0, rel=1e-5)


# --- value -------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.5, 2.0, 100.0])
def test_value_mode_matches_clip_grad_value_and_counts_hits(threshold):
    parts = make_net()
    params = parts[2]
    set_grads(params, 1.0)
    oracle = [nn.Parameter(p.detach().clone()) for p in params]
    for o, p in zip(oracle, params, strict=True):
        o.grad = p.grad.clone()
    hits, total = 0, 0
    for p in params:
        for v in p.grad.flatten().tolist():
            hits += abs(v) > threshold
            total += 1
    nn.utils.clip_grad_value_(oracle, threshold)
    stats = clipper(ValueClipConfig(name="value", threshold=threshold), parts)(measure=True)
    for p, o in zip(params, oracle, strict=True):
        assert torch.equal(p.grad, o.grad)
        assert p.grad.abs().max().item() <= threshold
    assert stats["frac"].item() == pytest.approx(hits / total, abs=1e-7)
    if threshold == 100.0:
        assert stats["frac"].item() == 0.0
    else:
        assert 0 < stats["frac"].item() < 1


def test_value_mode_without_measure_clips_and_returns_nothing():
    parts = make_net()
    params = parts[2]
    set_grads(params, 10.0)
    assert clipper(ValueClipConfig(name="value", threshold=1.0), parts)(measure=False) == {}
    assert max(p.grad.abs().max().item() for p in params) == 1.0


def test_none_leaves_grads_alone():
    parts = make_net()
    params = parts[2]
    set_grads(params, 10.0)
    before = grads_of(params)
    assert clipper(ClipConfig(name="none"), parts)(measure=True) == {}
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.grad, b)


# --- AGC -----------------------------------------------------------------------------------


def agc_reference(
    names: list[str],
    params: list[nn.Parameter],
    layers: list[int],
    cfg: AGCConfig,
) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """Clipped grads, and per layer (clipped units, units), by a plain loop over rows."""
    out = []
    clipped = [0] * NUM_LAYERS
    units = [0] * NUM_LAYERS
    for name, p, layer in zip(names, params, layers, strict=True):
        g = p.grad.detach().clone().double()
        excluded = any(name == e or name.startswith(e + ".") for e in cfg.exclude)
        if excluded:
            out.append(g)
            continue
        w = p.detach().double()
        if p.ndim > 1:
            w_rows = w.reshape(w.shape[0], -1)
            g_rows = g.reshape(g.shape[0], -1)  # a view: scaling a row scales g
        else:
            w_rows = w.reshape(1, -1)
            g_rows = g.reshape(1, -1)
        for i in range(w_rows.shape[0]):
            w_norm = math.sqrt(sum(v * v for v in w_rows[i].tolist()))
            g_norm = math.sqrt(sum(v * v for v in g_rows[i].tolist()))
            max_norm = cfg.clipping * max(w_norm, cfg.eps)
            units[layer] += 1
            if g_norm > max_norm:
                g_rows[i] *= max_norm / max(g_norm, 1e-6)
                clipped[layer] += 1
        out.append(g)
    return out, clipped, units


def agc_grads(params: list[nn.Parameter], cfg: AGCConfig, seed: int = 1) -> None:
    """Gradient rows whose norms straddle the AGC threshold, the weight rows' own."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        rows = p.detach().reshape(p.shape[0], -1) if p.ndim > 1 else p.detach().reshape(1, -1)
        w_norm = rows.norm(dim=1, keepdim=True).clamp_min(cfg.eps)
        direction = torch.randn(rows.shape, generator=g)
        direction /= direction.norm(dim=1, keepdim=True)
        # factor ~ exp(N(0, 1)): about half the units above lambda * ||W_i||, half below
        factor = torch.exp(torch.randn(rows.shape[0], 1, generator=g))
        p.grad = (direction * w_norm * cfg.clipping * factor).reshape(p.shape)


def run_agc(cfg: AGCConfig, parts, grads=agc_grads):
    net, names, params, layers = parts
    grads(params, cfg)
    expected, clipped, units = agc_reference(names, params, layers, cfg)
    stats = clipper(cfg, parts)(measure=True)
    for name, p, e in zip(names, params, expected, strict=True):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-5, atol=1e-9, msg=name)
    return stats, clipped, units


def check_fracs(stats, clipped, units):
    # NaN for a layer AGC leaves out entirely (no units): nothing to report there.
    layer_frac = [c / u if u else math.nan for c, u in zip(clipped, units, strict=True)]
    torch.testing.assert_close(
        stats["layer_frac"].double(), torch.tensor(layer_frac, dtype=torch.float64), equal_nan=True
    )
    assert stats["frac"].item() == pytest.approx(sum(clipped) / sum(units), rel=1e-6)


@pytest.mark.parametrize("clipping", [0.01, 0.5])
def test_agc_matches_reference_loop(clipping):
    cfg = AGCConfig(name="agc", clipping=clipping)
    parts = make_net()
    stats, clipped, units = run_agc(cfg, parts)
    # The test is not vacuous: some units of each kind were clipped, others were not.
    assert 0 < sum(clipped) < sum(units)
    check_fracs(stats, clipped, units)


def test_agc_unit_counts():
    # Units per layer by hand: one per output row of a >1-D weight, one per 1-D/scalar.
    cfg = AGCConfig(name="agc")
    _, clipped, units = run_agc(cfg, make_net())
    assert units == [8 + 1 + 1, 8 + 1, 8 + 1, 8 + 1, 1 + 1, 8 + 1, 0]


def test_agc_leaves_the_head_untouched_by_default():
    cfg = AGCConfig(name="agc", clipping=0.01)
    parts = make_net()
    net, _, params, _ = parts
    set_grads(params, 100.0)  # far above every threshold
    head_before = [net.head.weight.grad.clone(), net.head.bias.grad.clone()]
    headx_before = net.headx.weight.grad.clone()
    stats = clipper(cfg, parts)(measure=True)
    assert torch.equal(net.head.weight.grad, head_before[0])
    assert torch.equal(net.head.bias.grad, head_before[1])
    # "headx" only shares a prefix with "head": it is clipped
    assert not torch.equal(net.headx.weight.grad, headx_before)
    assert math.isnan(stats["layer_frac"][6].item())  # the excluded head
    assert stats["layer_frac"][:6].tolist() == [1.0] * 6
    assert stats["frac"].item() == 1.0


@pytest.mark.parametrize("exclude", [[], ["conv", "body.1"], ["body"], ["head", "headx"]])
def test_agc_exclude_is_configurable(exclude):
    cfg = AGCConfig(name="agc", clipping=0.05, exclude=exclude)
    parts = make_net()
    net, names, params, _ = parts
    set_grads(params, 100.0)
    before = dict(zip(names, grads_of(params), strict=True))
    stats, clipped, units = run_agc(cfg, parts, grads=lambda ps, c: None)
    for name, p in zip(names, params, strict=True):
        excluded = any(name == e or name.startswith(e + ".") for e in exclude)
        assert torch.equal(p.grad, before[name]) == excluded, name
    check_fracs(stats, clipped, units)


def test_agc_eps_floor_for_zero_weight_rows():
    cfg = AGCConfig(name="agc", clipping=0.1, eps=1e-3)
    parts = make_net()
    net, _, params, _ = parts
    with torch.no_grad():
        net.body[0].weight[3].zero_()  # one zero row
        net.body[0].bias.zero_()  # a zero bias, as most inits leave it
    set_grads(params, 1.0)
    g_row = net.body[0].weight.grad[3].clone()
    stats, clipped, units = run_agc(cfg, parts, grads=lambda ps, c: None)
    floor = cfg.clipping * cfg.eps
    row = net.body[0].weight.grad[3]
    assert row.norm().item() == pytest.approx(floor, rel=1e-5)
    torch.testing.assert_close(row / row.norm(), g_row / g_row.norm())  # direction kept
    assert net.body[0].bias.grad.norm().item() == pytest.approx(floor, rel=1e-5)
    check_fracs(stats, clipped, units)


def test_agc_zero_gradient_rows_stay_zero():
    cfg = AGCConfig(name="agc", clipping=1e-6, eps=1e-12)
    parts = make_net()
    net, _, params, _ = parts
    set_grads(params, 1.0)
    net.body[1].weight.grad[2].zero_()
    net.body[1].bias.grad.zero_()
    stats, clipped, units = run_agc(cfg, parts, grads=lambda ps, c: None)
    assert torch.all(net.body[1].weight.grad[2] == 0)
    assert torch.all(net.body[1].bias.grad == 0)
    assert torch.isfinite(net.body[1].weight.grad).all()
    # body.1's layer: 7 of its 8 weight rows clipped, the zero row and zero bias not
    assert clipped[2] == 7
    check_fracs(stats, clipped, units)


def test_agc_conv_weight_clips_per_output_channel():
    cfg = AGCConfig(name="agc", clipping=0.02)
    parts = make_net()
    net, _, params, _ = parts
    agc_grads(params, cfg)
    # Every output channel's gradient at half its bound, but channel 5 at 50x: it alone
    # is clipped, to lambda * ||W_5|| over its whole (in, kh, kw) kernel.
    w_norm = net.conv.weight.detach().flatten(1).norm(dim=1)
    g = torch.randn(net.conv.weight.shape, generator=torch.Generator().manual_seed(3))
    g *= (0.5 * cfg.clipping * w_norm / g.flatten(1).norm(dim=1)).reshape(-1, 1, 1, 1)
    g[5] *= 100
    net.conv.weight.grad = g.clone()
    stats, clipped, units = run_agc(cfg, parts, grads=lambda ps, c: None)
    after = net.conv.weight.grad
    assert after[5].norm().item() == pytest.approx(cfg.clipping * w_norm[5].item(), rel=1e-5)
    torch.testing.assert_close(after[5], g[5] / 100 * 2, rtol=1e-5, atol=0)
    others = [c for c in range(8) if c != 5]
    assert torch.equal(after[others], g[others])
    check_fracs(stats, clipped, units)


def test_agc_scalar_parameter():
    cfg = AGCConfig(name="agc", clipping=0.1)
    parts = make_net()
    net, _, params, _ = parts
    set_grads(params, 0.0)
    net.gain.grad = torch.tensor(-2.0)
    clipper(cfg, parts)(measure=False)
    assert net.gain.grad.shape == ()
    assert net.gain.grad.item() == pytest.approx(-0.1 * 1.5, rel=1e-6)


def test_agc_skips_params_without_grad():
    cfg = AGCConfig(name="agc", clipping=0.01)
    parts = make_net()
    net, names, params, layers = parts
    set_grads(params, 100.0)
    net.body[2].weight.grad = None
    net.body[2].bias.grad = None
    stats = clipper(cfg, parts)(measure=True)
    assert net.body[2].weight.grad is None
    # body.2 (layer 3) had no gradient: nothing clipped there
    assert stats["layer_frac"][3].item() == 0.0
    assert stats["layer_frac"][2].item() == 1.0


def test_agc_without_measure_returns_nothing():
    cfg = AGCConfig(name="agc")
    parts = make_net()
    params = parts[2]
    agc_grads(params, cfg)
    _, names, _, layers = parts
    expected, _, _ = agc_reference(names, params, layers, cfg)
    assert clipper(cfg, parts)(measure=False) == {}
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-5, atol=1e-9)


def test_agc_is_idempotent():
    # After one pass every unit is at or below its bound: a second pass changes nothing.
    cfg = AGCConfig(name="agc", clipping=0.05)
    parts = make_net()
    params = parts[2]
    set_grads(params, 10.0)
    clip = clipper(cfg, parts)
    clip()
    once = grads_of(params)
    clip()
    for p, o in zip(params, once, strict=True):
        torch.testing.assert_close(p.grad, o, rtol=1e-5, atol=0)
