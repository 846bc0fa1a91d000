"""Activation health (saturation, dead units) against hand computation, and the verdicts
of real runs: vanishing, healthy, diverged, dead units, saturated, along time."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import composed
from gradexp.data import load_data
from gradexp.init import init_weights
from gradexp.models import create_model
from gradexp.telemetry import ActivationProbe, DeadUnits, LayerMap, activation_modules

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def built(*overrides: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The initialized model for ``overrides`` and a batch of its task's inputs."""
    cfg = composed(*overrides)
    data = load_data(cfg.data, CPU)
    torch.manual_seed(seed)
    model = create_model(cfg, data.spec)
    init_weights(model, cfg.init, cfg.activation)
    return model, data.x_train[:64]


def act_outputs(model: nn.Module, x: torch.Tensor) -> dict[nn.Module, list[torch.Tensor]]:
    """Every output of every activation module in one forward, by independent hooks."""
    outs: dict[nn.Module, list[torch.Tensor]] = {}
    kinds = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU)
    handles = [
        m.register_forward_hook(lambda m, i, o: outs.setdefault(m, []).append(o.detach()))
        for m in model.modules()
        if isinstance(m, kinds)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outs


def probe(model: nn.Module, x: torch.Tensor) -> tuple[LayerMap, dict, list]:
    layers = LayerMap.of(model)
    acts = activation_modules(layers.modules)
    with ActivationProbe(acts, len(layers)) as p:
        model(x)
    return layers, {k: v.tolist() for k, v in p.result(CPU).items()}, p.dead_masks()


@pytest.mark.parametrize(
    "act, flat",
    [
        # where the derivative is 5% of its peak: 4a(1 - a) = 0.05, 1 - a^2 = 0.05
        ("sigmoid", lambda a: (a - 0.5).abs() > math.sqrt(0.95) / 2),
        ("tanh", lambda a: a.abs() > math.sqrt(0.95)),
    ],
)
def test_saturation_is_the_share_of_units_in_the_flat_regions(act, flat):
    # N(0, 1) weights on width 32: pre-activations of std ~3, many units in the tails
    model, x = built("model.depth=4", "model.width=32", f"activation={act}", "init=normal")
    layers, stats, _ = probe(model, x)
    outs = act_outputs(model, x)
    for i, block in enumerate(model.hidden):
        (a,) = outs[block.act]
        a = a.double()
        # the documented output thresholds: derivative below 5% of its peak
        assert stats["sat_frac"][i] == pytest.approx(float(flat(a).double().mean()), abs=1e-12)
        assert stats["act_mean"][i] == pytest.approx(float(a.mean()), rel=1e-9)
        assert stats["act_std"][i] == pytest.approx(float(a.std(correction=0)), rel=1e-9)
        assert math.isnan(stats["dead_frac"][i])  # a sigmoid/tanh unit cannot die
    assert 0.2 < max(stats["sat_frac"][:-1]) < 0.9  # the test is not vacuous
    assert math.isnan(stats["sat_frac"][-1]) and math.isnan(stats["act_mean"][-1])  # head


def test_dead_units_output_zero_for_every_example():
    model, x = built("model.depth=3", "model.width=16", "activation=relu", "init=kaiming_normal")
    with torch.no_grad():  # kill 5 units of hidden.1 and 3 of hidden.2 by their biases
        model.hidden[1].linear.bias[:5] = -100.0
        model.hidden[2].linear.bias[-3:] = -100.0
    layers, stats, masks = probe(model, x)
    outs = act_outputs(model, x)
    for i, block in enumerate(model.hidden):
        (a,) = outs[block.act]
        expected = (a == 0).all(dim=0)
        assert stats["dead_frac"][i] == float(expected.double().mean())
        assert torch.equal(masks[i], expected)
        assert math.isnan(stats["sat_frac"][i])
    assert stats["dead_frac"][1] >= 5 / 16 and stats["dead_frac"][2] >= 3 / 16


def test_conv_units_are_channels_over_examples_and_positions():
    model, x = built("model=cnn", "model.depth=3", "model.channels=8", "activation=relu")
    with torch.no_grad():
        model.conv[1].conv.bias[:2] = -100.0
    _, stats, masks = probe(model, x)
    outs = act_outputs(model, x)
    (a,) = outs[model.conv[1].act]
    assert masks[1].shape == (8,)
    assert torch.equal(masks[1], (a == 0).all(dim=(0, 2, 3)))
    assert stats["dead_frac"][1] == pytest.approx(float(masks[1].double().mean()))
    assert stats["dead_frac"][1] >= 2 / 8


def test_recurrent_units_are_judged_over_every_time_step():
    model, x = built("model=irnn", "model.hidden_size=8", "data.length=12")
    with torch.no_grad():
        model.recurrent[0].cell.bias_ih_l0[:3] = -100.0
    _, stats, masks = probe(model, x)
    (act,) = [m for m in model.recurrent[0].modules() if isinstance(m, nn.ReLU)]
    outs = act_outputs(model, x)[act]
    assert len(outs) == 12  # one call per time step
    a = torch.stack(outs)  # (T, B, H)
    assert torch.equal(masks[0], (a == 0).all(dim=(0, 1)))
    assert stats["act_mean"][0] == pytest.approx(float(a.double().mean()), rel=1e-9)
    assert masks[0][:3].all()


def test_hooks_are_removed_and_statistics_are_nan_when_not_called():
    model, x = built("model=lstm", "model.fused=true", "model.hidden_size=8", "data.length=6")
    layers = LayerMap.of(model)
    acts = activation_modules(layers.modules)
    assert acts  # the cell's tanh
    with ActivationProbe(acts, len(layers)) as p:
        model(x)
    assert all(not m._forward_hooks for _, m in acts)
    result = p.result(CPU)
    # the fused path calls torch's kernel, not the module: nothing measured, no crash
    assert all(math.isnan(v) for v in result["act_mean"].tolist())


def test_dead_unit_tracker_remembers_who_never_recovered():
    t = torch.tensor
    acts = [(0, nn.ReLU()), (0, nn.ReLU()), (2, nn.ReLU())]
    tracker = DeadUnits(acts, 3)
    tracker.update([t([1, 1, 0, 0]).bool(), t([0, 0]).bool(), None])
    tracker.update([t([1, 0, 0, 1]).bool(), t([0, 1]).bool(), None])
    tracker.update([t([1, 0, 1, 1]).bool(), t([0, 1]).bool(), None])
    # layer 0 has 6 units: 5 died; unit 1 of the first module came back, 4 never did
    assert tracker.result() == [
        {"ever": 5 / 6, "recovered": 1 / 6, "never_recovered": 4 / 6},
        None,
        None,
    ]
