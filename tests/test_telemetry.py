"""gradexp.telemetry: per-layer norms and signals against independent computations."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradexp.config import (
    ActivationConfig,
    BatchNormConfig,
    Config,
    GainInitConfig,
    GroupNormConfig,
    KaimingInitConfig,
    MLPConfig,
    NormConfig,
    PReLUConfig,
)
from gradexp.data import DataSpec
from gradexp.init import init_weights
from gradexp.models.mlp import MLP
from gradexp.telemetry import LayerMap, SignalProbe, histogram_from_stats, histogram_stats

CPU = torch.device("cpu")
NORMS = {
    "none": NormConfig(name="none"),
    "layer": NormConfig(name="layer"),
    "batch": BatchNormConfig(name="batch"),
    "group": GroupNormConfig(name="group", num_groups=4),
}


def make_mlp(
    depth: int = 4,
    width: int = 8,
    in_features: int = 6,
    classes: int = 5,
    act: ActivationConfig | None = None,
    norm: str = "none",
    bias: bool = True,
    seed: int = 0,
) -> MLP:
    cfg = Config(
        model=MLPConfig(depth=depth, width=width, bias=bias),
        activation=act or ActivationConfig(name="tanh"),
        norm=NORMS[norm],
    )
    torch.manual_seed(seed)
    return MLP.from_config(cfg, DataSpec((in_features,), classes))


def batch(n: int = 16, in_features: int = 6, classes: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_features, generator=g), torch.randint(classes, (n,), generator=g)


def manual_forward(model: MLP, x: torch.Tensor) -> list[torch.Tensor]:
    """Every layer output h, in depth order, the head's logits last."""
    hs = []
    h = x.flatten(1)
    for block in model.hidden:
        h = block(h)
        hs.append(h)
    hs.append(model.head(h))
    return hs


def rms(t: torch.Tensor) -> float:
    return math.sqrt(float(t.double().square().mean()))


# --- LayerMap ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth, first, last",
    [
        (3, "00_hidden.0", "03_head"),
        (10, "00_hidden.0", "10_head"),
        (100, "000_hidden.0", "100_head"),
    ],
)
def test_layer_tags_are_in_depth_order(depth, first, last):
    model = make_mlp(depth=depth, width=2)
    layers = LayerMap.of(model)
    assert len(layers) == depth + 1
    assert layers.tags[0] == first and layers.tags[-1] == last
    pad = len(first.split("_")[0])
    expected = [f"{i:0{pad}d}_hidden.{i}" for i in range(depth)] + [f"{depth:0{pad}d}_head"]
    assert layers.tags == expected
    # sorting the tags as strings keeps depth order (TensorBoard sorts them so)
    assert sorted(layers.tags) == layers.tags
    assert layers.modules == [*model.hidden, model.head]


def test_layer_map_assigns_every_parameter_to_its_layer():
    model = make_mlp(depth=3, act=PReLUConfig(name="prelu"), norm="layer")
    layers = LayerMap.of(model)
    assert layers.param_names == [n for n, _ in model.named_parameters()]
    for name, layer in zip(layers.param_names, layers.layer_of, strict=True):
        expected = int(name.split(".")[1]) if name.startswith("hidden.") else 3
        assert layer == expected, name
    assert layers.index.tolist() == layers.layer_of
    # block 0 holds linear weight+bias, layer-norm weight+bias, the PReLU slopes
    assert layers.layer_of.count(0) == 5


def test_layer_map_skips_frozen_parameters_and_rejects_strays():
    model = make_mlp(depth=2)
    model.hidden[0].linear.bias.requires_grad_(False)
    layers = LayerMap.of(model)
    assert "hidden.0.linear.bias" not in layers.param_names
    model.stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="stray"):
        LayerMap.of(model)


@pytest.mark.parametrize("norm", list(NORMS))
def test_layer_grad_norms_match_per_layer_sums(norm):
    model = make_mlp(depth=4, act=PReLUConfig(name="prelu"), norm=norm)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    layers = LayerMap.of(model)
    got = layers.layer_sq_norms(layers.grads()).sqrt()
    expected = []
    for module in [*model.hidden, model.head]:
        sq = sum(float(p.grad.double().square().sum()) for p in module.parameters())
        expected.append(math.sqrt(sq))
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64))
    if norm != "none":  # the norm layer's own parameters count, and they have gradients
        assert float(model.hidden[1].norm.weight.grad.norm()) > 0


def test_grads_fill_zeros_for_parameters_without_gradient():
    model = make_mlp(depth=2)
    layers = LayerMap.of(model)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    model.head.bias.grad = None
    grads = layers.grads()
    i = layers.param_names.index("head.bias")
    assert torch.equal(grads[i], torch.zeros(5))
    sq = layers.layer_sq_norms(grads)
    assert sq[-1].item() == pytest.approx(float(model.head.weight.grad.square().sum()), rel=1e-5)


# --- SignalProbe ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_signals_match_autograd_reference(norm, act):
    model = make_mlp(depth=5, act=ActivationConfig(name=act), norm=norm)
    x, y = batch(32)
    n = x.shape[0]

    # reference: run the blocks by hand, ask autograd for dL/dh of every h
    hs = manual_forward(model, x)
    loss = F.cross_entropy(hs[-1], y)
    dl_dh = torch.autograd.grad(loss, hs)
    ref_fwd = [rms(h.detach()) for h in hs]
    ref_bwd = [rms(n * g) for g in dl_dh]

    layers = LayerMap.of(model)
    model.zero_grad()
    with SignalProbe(layers.modules) as probe:
        F.cross_entropy(model(x), y).backward()
    fwd, bwd = probe.result(CPU)
    assert fwd.shape == bwd.shape == (6,)
    torch.testing.assert_close(fwd.double(), torch.tensor(ref_fwd, dtype=torch.float64))
    torch.testing.assert_close(bwd.double(), torch.tensor(ref_bwd, dtype=torch.float64))


@pytest.mark.parametrize("norm", ["none", "layer", "group"])
def test_backward_signal_is_rms_of_per_example_gradients(norm):
    # Without batch norm, example i's loss depends only on its own h_i: run each
    # example alone and collect d(l_i)/d(h_i); their RMS is the backward signal.
    model = make_mlp(depth=4, norm=norm)
    x, y = batch(12)
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(5)]
    for i in range(len(x)):
        hs = manual_forward(model, x[i : i + 1])
        loss_i = F.cross_entropy(hs[-1], y[i : i + 1])
        for layer, g in enumerate(torch.autograd.grad(loss_i, hs)):
            per_layer[layer].append(g)
    expected = [rms(torch.cat(gs)) for gs in per_layer]

    layers = LayerMap.of(model)
    with SignalProbe(layers.modules) as probe:
        F.cross_entropy(model(x), y).backward()
    _, bwd = probe.result(CPU)
    torch.testing.assert_close(bwd.double(), torch.tensor(expected, dtype=torch.float64))


def test_probe_does_not_change_gradients():
    model = make_mlp(depth=3, norm="batch")
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with SignalProbe(LayerMap.of(model).modules):
        F.cross_entropy(model(x), y).backward()
    for p, g in zip(model.parameters(), plain, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_hooks_are_removed_after_the_block():
    model = make_mlp(depth=3)
    x, y = batch()
    modules = LayerMap.of(model).modules
    with SignalProbe(modules) as probe:
        assert all(len(m._forward_hooks) == 1 for m in modules)
        F.cross_entropy(model(x), y).backward()
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert probe.handles == []
    # a forward after the block records nothing
    recorded = list(probe.fwd)
    model(x * 10)
    assert all(a is b for a, b in zip(probe.fwd, recorded, strict=True))


def test_hooks_are_removed_when_the_block_raises():
    model = make_mlp(depth=3)
    modules = LayerMap.of(model).modules
    with pytest.raises(RuntimeError, match="boom"), SignalProbe(modules):
        raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_unreached_layers_are_nan():
    model = make_mlp(depth=3)
    x, _ = batch()
    modules = LayerMap.of(model).modules
    with SignalProbe(modules) as probe:
        pass
    fwd, bwd = probe.result(CPU)
    assert torch.isnan(fwd).all() and torch.isnan(bwd).all()
    with SignalProbe(modules) as probe, torch.no_grad():
        model(x)
    fwd, bwd = probe.result(CPU)
    assert torch.isfinite(fwd).all()
    assert torch.isnan(bwd).all()  # no backward pass, no backward signal


# --- gradient histograms ---------------------------------------------------------------------


def test_histogram_stats_against_numpy():
    v = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 3 + 1
    v[10], v[20], v[30] = float("nan"), float("inf"), float("-inf")
    stats = histogram_stats(v, bins=16)
    assert stats.shape == (6 + 16,)
    finite = v[torch.isfinite(v)].double().numpy()
    nonfinite, count, lo, hi, total, sq = stats[:6].tolist()
    assert (nonfinite, count) == (3, 4997)
    assert (lo, hi) == (finite.min(), finite.max())
    assert total == pytest.approx(finite.sum(), rel=1e-4)
    assert sq == pytest.approx((finite**2).sum(), rel=1e-5)
    counts, _ = np.histogram(finite, bins=16, range=(lo, hi))
    assert stats[6:].tolist() == counts.tolist()


def test_log10_abs_histogram_against_numpy():
    # Entries over 12 decades, both signs, with zeros and non-finite ones.
    g = torch.Generator().manual_seed(1)
    v = torch.sign(torch.randn(4000, generator=g)) * 10 ** (torch.rand(4000, generator=g) * 12 - 10)
    v[:7] = 0.0
    v[7], v[8] = float("nan"), float("-inf")
    stats = histogram_stats(v, bins=24, log10_abs=True)
    kept = v.double().numpy()
    kept = np.log10(np.abs(kept[np.isfinite(kept) & (kept != 0)]))
    nonfinite, count, lo, hi, total, sq = stats[:6].tolist()
    assert (nonfinite, count) == (2, 4000 - 9)  # zeros are not counted, nor shown
    assert lo == pytest.approx(kept.min(), abs=1e-5) and hi == pytest.approx(kept.max(), abs=1e-5)
    assert total == pytest.approx(kept.sum(), rel=1e-4)
    assert sq == pytest.approx((kept**2).sum(), rel=1e-4)
    counts, _ = np.histogram(kept, bins=24, range=(lo, hi))
    # float32 log10 may move a value sitting on a bin edge to its neighbour
    assert np.abs(stats[6:].numpy() - counts).sum() <= 4
    assert stats[6:].sum() == count


def test_histogram_from_stats_decodes_for_tensorboard():
    v = torch.linspace(-2.0, 6.0, 801)  # one value on every 0.01
    hist = histogram_from_stats(histogram_stats(v, bins=8).tolist())
    assert hist["num"] == 801
    assert (hist["min"], hist["max"]) == (-2.0, 6.0)
    assert hist["sum"] == pytest.approx(float(v.double().sum()), abs=1e-3)
    assert hist["sum_squares"] == pytest.approx(float(v.double().square().sum()), rel=1e-5)
    # right edges of 8 equal bins over [-2, 6]
    assert hist["bucket_limits"] == pytest.approx([-1.0, 0, 1, 2, 3, 4, 5, 6])
    assert sum(hist["bucket_counts"]) == 801
    assert all(99 <= c <= 102 for c in hist["bucket_counts"])


def test_histogram_of_a_constant_and_of_nothing():
    hist = histogram_from_stats(histogram_stats(torch.full((7,), 2.5)).tolist())
    assert hist["bucket_limits"] == [2.5]
    assert hist["bucket_counts"] == [7.0]
    assert (hist["min"], hist["max"], hist["num"]) == (2.5, 2.5, 7)
    empty = histogram_stats(torch.tensor([float("nan"), float("inf")]), bins=4)
    assert empty.shape == (10,)
    assert empty[:2].tolist() == [2.0, 0.0]
    assert histogram_from_stats(empty.tolist()) is None


def test_histogram_round_trips_through_tensorboard(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator
    from torch.utils.tensorboard import SummaryWriter

    v = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    hist = histogram_from_stats(histogram_stats(v, bins=10).tolist())
    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_histogram_raw("g", global_step=3, **hist)
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    (event,) = acc.Histograms("g")
    assert event.step == 3
    h = event.histogram_value
    assert h.num == 1000
    assert h.min == pytest.approx(float(v.min())) and h.max == pytest.approx(float(v.max()))
    assert list(h.bucket) == pytest.approx(hist["bucket_counts"])


# --- the domain claim: weight-gradient ratios hide what the backward signal shows ------------


def flow_log2_ratios(init, depth: int, width: int, model_seeds: int, examples: int):
    """Mean over single examples of log2(first/head) for grad norm and backward signal."""
    grad_ratios, signal_ratios = [], []
    relu = ActivationConfig(name="relu")
    for seed in range(model_seeds):
        model = make_mlp(depth, width, width, 10, act=relu, bias=False, seed=seed)
        init_weights(model, init, relu)
        layers = LayerMap.of(model)
        x, y = batch(examples, width, 10, seed=100 + seed)
        for i in range(examples):
            model.zero_grad(set_to_none=True)
            with SignalProbe(layers.modules) as probe:
                F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            grad = layers.layer_sq_norms(layers.grads()).sqrt()
            _, bwd = probe.result(CPU)
            grad_ratios.append(math.log2(grad[0] / grad[-1]))
            signal_ratios.append(math.log2(bwd[0] / bwd[-1]))
    return statistics.mean(grad_ratios), statistics.mean(signal_ratios)


def test_xavier_vs_kaiming_grad_ratios_alike_backward_signal_not():
    """A bias-free ReLU MLP, width 512 (input too), depth L = 10, at init.

    Xavier's square layers are He's scaled by 2^(-1/2). The net is positively
    homogeneous, so every hidden weight gradient scales alike and first/last
    weight-gradient ratios differ only through the head, whose Xavier variance
    2/(n + classes) is not half of He's 2/n: by log2(sqrt(2 n / (n + classes))), about
    +0.49, whatever the depth. The backward signal loses 2^(-1/2) per ReLU layer
    under Xavier: between hidden.0 and the head lie L - 1 square layers, and the
    head's factor sqrt(n / (n + classes)): log2 ratio about -(L - 1)/2 = -4.51.

    Per-example (batch of 1) quantities, averaged over examples: a large batch's mean
    gradient adds a coherent softmax component that grows with B under He init and
    breaks the symmetry (see the report that came with this test).
    """
    depth, width, classes = 10, 512, 10
    g_x, s_x = flow_log2_ratios(GainInitConfig(name="xavier_normal"), depth, width, 4, 16)
    g_k, s_k = flow_log2_ratios(KaimingInitConfig(name="kaiming_normal"), depth, width, 4, 16)
    head = 0.5 * math.log2(width / (width + classes))
    grad_diff, signal_diff = g_x - g_k, s_x - s_k
    assert grad_diff == pytest.approx(0.5 + head, abs=0.3)
    assert signal_diff == pytest.approx(-(depth - 1) / 2 + head, abs=0.4)
    # and the point of the claim: the signal shows a gap the gradient norms do not
    assert abs(signal_diff) > 4 * abs(grad_diff)
    # He keeps the gradient level; its signal drops only through the narrow head
    assert abs(g_k) < 0.5
    assert s_k == pytest.approx(0.5 * math.log2(2 * classes / width), abs=0.4)


def test_layer_norms_of_a_vanished_gradient_are_tiny_not_zero():
    # float32 squares of entries below ~1e-19 underflow to 0: a vanished gradient must
    # still read as its (tiny) norm, as computed exactly in float64.
    layer = torch.nn.Linear(4, 3)
    model = torch.nn.Sequential(layer)
    model.depth_layers = lambda: [("0", layer)]
    layers = LayerMap.of(model)
    tensors = [torch.full((3, 4), 1e-25), torch.full((3,), 3e-30)]
    sq = layers.layer_sq_norms(tensors)
    expected = sum(t.double().square().sum() for t in tensors)
    assert sq.dtype == torch.float64
    assert sq[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert sq[0].item() > 0
