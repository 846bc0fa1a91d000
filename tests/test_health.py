"""Activation health (saturation, dead units) against hand computation, and the verdicts
of real runs: vanishing, healthy, diverged, dead units, saturated, along time."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from conftest import (
    TINY,
    Run,
    composed,
    layer_tags,
    load_summary,
    scalar_series,
    train,
)
from gradexp.data import load_data
from gradexp.figures import FIGURE_HEIGHT, FIGURE_WIDTH
from gradexp.init import init_weights
from gradexp.metrics import NullLogger
from gradexp.models import create_model
from gradexp.telemetry import ActivationProbe, DeadUnits, LayerMap, activation_modules
from gradexp.train import run
from gradexp.verdicts import KINDS, OUTCOMES, describe

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gates_saturation_is_counted_apart_from_the_cells_tanh(kind):
    # N(0, 1) weights: gates pushed into both tails
    model, x = built(f"model={kind}", "init=normal", "model.hidden_size=16", "data.length=8")
    _, stats, _ = probe(model, x)
    cell = model.recurrent[0]
    outs = act_outputs(model, x)
    gates = torch.stack(outs[cell.gates]).double()  # every gate, every time step
    assert len(outs[cell.gates]) == {"lstm": 3, "gru": 2}[kind] * 8
    flat = (gates - 0.5).abs() > math.sqrt(0.95) / 2  # both tails: near 0 and near 1
    assert stats["gate_sat_frac"][0] == pytest.approx(float(flat.double().mean()), abs=1e-12)
    assert (gates < 0.0127).any() and (gates > 0.9873).any()  # both tails occur
    # mean, std and sat_frac stay the tanh's own
    tanh = torch.stack(outs[cell.act]).double()
    assert stats["act_mean"][0] == pytest.approx(float(tanh.mean()), rel=1e-9)
    saturated = tanh.abs() > math.sqrt(0.95)
    assert stats["sat_frac"][0] == pytest.approx(float(saturated.double().mean()), abs=1e-12)
    assert math.isnan(stats["gate_sat_frac"][-1])  # the head has no gates


def test_hooks_are_removed_and_statistics_are_nan_when_not_called():
    model, x = built("model=lstm", "model.fused=true", "model.hidden_size=8", "data.length=6")
    layers = LayerMap.of(model)
    # torch's fused kernel applies the nonlinearity itself: nothing to probe
    assert activation_modules(layers.modules) == []
    acts = [(0, model.recurrent[0].act)]
    with ActivationProbe(acts, len(layers)) as p:
        model(x)
    assert not model.recurrent[0].act._forward_hooks
    result = p.result(CPU)
    assert all(math.isnan(v) for key in result for v in result[key].tolist())


def test_dead_unit_tracker_remembers_who_never_recovered():
    t = torch.tensor
    acts = [(0, nn.ReLU()), (0, nn.ReLU()), (2, nn.ReLU())]
    tracker = DeadUnits(acts, 3, sustain=2)
    tracker.update([t([1, 1, 0, 0]).bool(), t([0, 0]).bool(), None])
    tracker.update([t([1, 0, 0, 1]).bool(), t([0, 1]).bool(), None])
    tracker.update([t([1, 0, 1, 1]).bool(), t([0, 1]).bool(), None])
    # layer 0 has 6 units: 5 died, unit 1 of the first module came back; dead at the last
    # 2 log steps (sustain): units 0 and 3 of the first module, unit 1 of the second
    assert tracker.result() == [
        {"ever": 5 / 6, "recovered": 1 / 6, "never_recovered": 3 / 6},
        None,
        None,
    ]


def test_a_unit_that_dies_again_and_stays_dead_counts_as_dead_for_good():
    t = torch.tensor
    tracker = DeadUnits([(0, nn.ReLU())], 1, sustain=2)
    for mask in ([1, 0], [0, 0], [1, 0], [1, 0]):
        tracker.update([t(mask).bool()])
    assert tracker.result() == [{"ever": 0.5, "recovered": 0.5, "never_recovered": 0.5}]
    # one batch is not enough once the run has `sustain` log steps
    tracker.update([t([0, 1]).bool()])
    assert tracker.result()[0]["never_recovered"] == 0.0


# --- verdicts of real runs ----------------------------------------------------------------

QUIET = ("trainer.progress=off", "trainer.figure_every=0", "data.n_train=512", "data.n_test=128")


def run_quietly(tmp_path, *overrides: str) -> dict:
    cfg = composed(*QUIET, *overrides)
    return run(cfg, tmp_path, logger=NullLogger(), console=Console(file=io.StringIO()))


def kinds(summary: dict) -> list[str]:
    return [v["kind"] for v in summary["verdicts"]]


def test_deep_sigmoid_mlp_with_lecun_init_vanishes(tmp_path):
    # std 1/sqrt(fan_in) and sigmoid' <= 1/4: each layer keeps < 1/4 of the signal
    s = run_quietly(
        tmp_path, "activation=sigmoid", "init=lecun_normal", "model.depth=10", "trainer.steps=30"
    )
    (v,) = s["verdicts"]
    assert (v["kind"], v["step"], v["evidence"]["axis"]) == ("vanishing", 0, "depth")
    first, head = s["layers"][0], s["layers"][-1]
    measured = first["signal_bwd"]["first"] / head["signal_bwd"]["first"]
    assert v["evidence"]["ratio"] == pytest.approx(measured)
    assert measured < 1e-4
    assert v["evidence"]["held"] == "4/4"  # steps 0, 10, 20, 29


def test_relu_mlp_with_kaiming_init_at_depth_20_is_healthy(tmp_path):
    s = run_quietly(
        tmp_path,
        "activation=relu",
        "init=kaiming_normal",
        "model.depth=20",
        "model.width=64",
        "trainer.steps=100",
    )
    assert s["status"] == "completed"
    assert kinds(s) == ["healthy"]
    (v,) = s["verdicts"]
    assert v["layer"] is None and v["evidence"]["logged_steps"] == 11


def reference_first_nonfinite_step(cfg) -> int:
    """A plain loop, apart from the trainer: the first step whose loss or gradient is
    non-finite, with the trainer's seeds, data order and optimizer settings."""
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, CPU)
    model = create_model(cfg, data.spec)
    init_weights(model, cfg.init, cfg.activation)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    gen = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.trainer.steps):
        x, y = data.batch(cfg.trainer.batch_size, gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        if not (torch.isfinite(loss) and torch.isfinite(grads).all()):
            return step
        opt.step()
    raise AssertionError("the reference never went non-finite")


def test_huge_learning_rate_with_normal_init_diverges_at_the_right_step(tmp_path):
    overrides = ("activation=relu", "init=normal", "optim.lr=1e6", "model.depth=4")
    s = run_quietly(tmp_path, *overrides, "trainer.steps=30")
    expected = reference_first_nonfinite_step(composed(*QUIET, *overrides, "trainer.steps=30"))
    assert s["status"] == "diverged"
    diverged = [v for v in s["verdicts"] if v["kind"] == "diverged"]
    assert len(diverged) == 1 and diverged[0]["step"] == expected > 0
    assert diverged[0]["layer"] == s["nonfinite"]["layer"]
    assert kinds(s)[0] == "diverged"


def test_relu_net_with_a_large_negative_bias_has_dead_units(tmp_path):
    s = run_quietly(
        tmp_path, "activation=relu", "init=kaiming_normal", "init.bias=-3", "trainer.steps=20"
    )
    dead = [v for v in s["verdicts"] if v["kind"] == "dead_units"]
    assert len(dead) == 1
    assert dead[0]["step"] == 0
    layer = next(entry for entry in s["layers"] if entry["name"] == dead[0]["layer"])
    assert layer["dead_units"]["never_recovered"] == dead[0]["evidence"]["fraction"] >= 0.5
    assert layer["dead_frac"]["first"] >= 0.5
    # a dead unit passes no gradient: everything below the dead layer gets nothing
    assert "vanishing" in kinds(s)


def test_tanh_with_unit_normal_weights_saturates(tmp_path):
    s = run_quietly(
        tmp_path,
        "activation=tanh",
        "init=normal",
        "model.width=64",
        "model.depth=5",
        "trainer.steps=20",
    )
    (v,) = [v for v in s["verdicts"] if v["kind"] == "saturated"]
    assert v["step"] == 0 and v["evidence"]["fraction"] >= 0.5
    worst = max(s["layers"][:-1], key=lambda e: e["sat_frac"]["first"])
    assert v["layer"] == worst["name"]


def test_rnn_with_a_small_recurrent_matrix_vanishes_along_time(tmp_path):
    common = ("model=rnn", "init=xavier_normal", "data.length=30", "trainer.steps=3")
    s = run_quietly(
        tmp_path / "small", *common, "model.recurrent_init=normal", "model.recurrent_std=0.01"
    )
    (v,) = [v for v in s["verdicts"] if v["evidence"].get("axis") == "time"]
    assert (v["kind"], v["layer"], v["step"]) == ("vanishing", "recurrent.0", 0)
    (time,) = s["time"]
    assert v["evidence"]["ratio"] == pytest.approx(time["ratio"]["first"])
    assert time["ratio"]["first"] < 1e-20
    # truncated BPTT: the zeros before the last chunk are by design, not vanishing
    s = run_quietly(tmp_path / "tbptt", *common, "trainer.tbptt=10")
    assert not [v for v in s["verdicts"] if v["evidence"].get("axis") == "time"]
    assert s["time"][0]["grad_norm"]["first"][0] == 0.0


# --- what a user sees: the CLI, summary.json, TensorBoard, the PNG --------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FLOW_DEPTH = 10


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The default (vanishing) config, tiny but 10 layers deep, a figure every 2 steps."""
    return train(
        tmp_path_factory.mktemp("flow"),
        *TINY,
        f"model.depth={FLOW_DEPTH}",
        "trainer.figure_every=2",
    ).ok()


def test_verdicts_in_summary_terminal_and_tensorboard(flow_run: Run) -> None:
    from tensorboard.plugins.hparams import plugin_data_pb2

    summary = load_summary(flow_run.dir, strict=True)
    verdicts = summary["verdicts"]
    assert verdicts and all(set(v) == {"kind", "layer", "step", "evidence"} for v in verdicts)
    assert all(v["kind"] in KINDS for v in verdicts)
    assert "vanishing" in [v["kind"] for v in verdicts]
    out = flow_run.proc.stdout
    assert "verdicts" in out and "vanishing" in out and "held at" in out
    acc = flow_run.events
    (text,) = acc.Tensors("run/verdicts/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    # The outcome in words, then the verdicts table.
    outcome = summary["outcome"]
    assert outcome["kind"] in OUTCOMES
    assert outcome["ratio"] == pytest.approx(
        summary["metrics"]["loss/test"] / summary["metrics"]["loss/baseline"]
    )
    head, rest = table.split("\n\n", 1)
    assert head.startswith("outcome: **") and outcome["kind"] in head
    assert rest.startswith("| verdict | layer | step | evidence |") and "vanishing" in rest
    assert f"outcome: {outcome['kind']}" in out
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    kinds = list(dict.fromkeys(v["kind"] for v in verdicts))
    assert start.hparams["verdicts"].string_value == ",".join(kinds)
    for kind in KINDS:
        assert start.hparams[f"verdict/{kind}"].string_value == str(kind in kinds).lower()
    assert start.hparams["outcome"].string_value == outcome["kind"]


def test_activation_health_is_logged_per_layer(flow_run: Run) -> None:
    summary = flow_run.summary
    scalars = flow_run.events.Tags()["scalars"]
    for i, tag in enumerate(layer_tags(FLOW_DEPTH)[:-1]):
        for key in ("act_mean", "act_std", "sat_frac"):
            series = scalar_series(flow_run.events, f"{key}/{tag}")
            assert [s for s, _ in series] == [0, 2, 3, 4, 5]
            assert series[-1][1] == pytest.approx(summary["layers"][i][key]["last"], rel=1e-6)
        assert f"dead_frac/{tag}" not in scalars  # sigmoid units cannot die
    head = layer_tags(FLOW_DEPTH)[-1]
    assert not [t for t in scalars if t.endswith(head) and t.split("/")[0] in ("sat_frac",)]


def test_gradient_flow_figure_png_and_tensorboard_images(flow_run: Run) -> None:
    png = flow_run.dir / "gradient_flow.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
        width, height = im.size
    assert (width, height) == (FIGURE_WIDTH, FIGURE_HEIGHT)
    images = flow_run.events.Images("flow/gradient_flow")
    # every figure_every steps (0, 2, 4) and the end (step count 6)
    assert [e.step for e in images] == [0, 2, 4, 6]
    assert (images[-1].width, images[-1].height) == (width, height)


def test_theory_beside_measurement_in_summary(flow_run: Run) -> None:
    theory = flow_run.summary["theory"]
    assert set(theory) >= {"signal_fwd_ratio", "signal_bwd_ratio"}
    assert len(theory["signal_bwd"]) == FLOW_DEPTH + 1 and theory["signal_bwd"][-1] == 1.0
    ratio = theory["signal_fwd"][0] / theory["signal_fwd"][-1]
    assert theory["signal_fwd_ratio"] == pytest.approx(ratio)
    assert scalar_series(flow_run.events, "theory/signal_bwd_ratio") == [
        (0, pytest.approx(theory["signal_bwd_ratio"], rel=1e-6))
    ]
    # per layer, beside the measured step-0 profile (the backward one scaled to the head)
    (text,) = flow_run.events.Tensors("theory/vs_measured/text_summary")
    rows = text.tensor_proto.string_val[0].decode().splitlines()[2:]
    layers = flow_run.summary["layers"]
    assert len(rows) == FLOW_DEPTH + 1
    for row, layer, fwd in zip(rows, layers, theory["signal_fwd"]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == layer["name"]
        assert float(cells[1]) == pytest.approx(fwd, rel=1e-2)
        assert float(cells[2]) == pytest.approx(layer["signal_fwd"]["first"], rel=1e-2)
        assert float(cells[4]) == pytest.approx(layer["signal_bwd"]["first"], rel=1e-2)
    assert float(rows[-1].split("|")[4]) == pytest.approx(layers[-1]["signal_bwd"]["first"], 1e-2)


def test_run_without_matplotlib_says_so_and_finishes(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "matplotlib.py").write_text("raise ImportError('no matplotlib here')\n")
    pythonpath = os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])
    r = train(tmp_path, *TINY, env={"PYTHONPATH": pythonpath}).ok()
    assert "figures need matplotlib: pip install 'gradexp[plot]'" in r.proc.stdout
    assert "Traceback" not in r.proc.stderr
    assert not (r.dir / "gradient_flow.png").exists()
    assert r.summary["status"] == "completed" and r.summary["verdicts"]


def test_non_mlp_runs_have_no_theory_and_say_why(tmp_path: Path) -> None:
    s = run_quietly(tmp_path, "model=resmlp", "model.depth=3", "trainer.steps=2")
    assert s["theory"] is None


def test_jacobian_spectrum_on_request(tmp_path: Path) -> None:
    s = run_quietly(
        tmp_path,
        "init=orthogonal",
        "activation=identity",
        "model.depth=3",
        "model.width=32",
        "model.bias=false",
        "diagnose.jacobian=true",
        "trainer.steps=1",
    )
    j = s["jacobian"]
    # a linear net of orthogonal square layers (after a 32 -> 32 first layer): isometry
    assert j["mean"] == pytest.approx(1.0, abs=1e-5) and j["std"] < 1e-5


def test_jacobian_on_a_model_other_than_mlp_is_a_one_line_error(tmp_path: Path, cli) -> None:
    r = cli(["train", "model=cnn", "diagnose.jacobian=true"], tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "diagnose.jacobian=true: model=cnn; choose model=mlp" in r.stderr


def test_a_finite_blow_up_is_judged_diverged_while_the_status_stays_completed(
    tmp_path: Path,
) -> None:
    run = train(tmp_path, *TINY, "trainer.steps=30", "trainer.log_every=3", "optim.lr=100").ok()
    assert run.summary["status"] == "completed"
    (v,) = [v for v in run.summary["verdicts"] if v["kind"] == "diverged"]
    losses = dict(scalar_series(run.events, "loss/train"))
    e = v["evidence"]
    assert e["axis"] == "loss" and e["loss_start"] == pytest.approx(losses[0], rel=1e-6)
    assert e["loss"] == pytest.approx(losses[v["step"]], rel=1e-6)
    assert e["loss"] > 10 * max(e["loss_start"], e["baseline"])
    assert all(math.isfinite(x) for x in losses.values())
    assert "still finite" in describe(v) and "verdicts: diverged" in run.proc.stdout


@pytest.mark.parametrize("seed", range(5))
def test_a_healthy_deep_net_is_healthy_whatever_the_seed(tmp_path: Path, seed: int) -> None:
    # The tutorial's tanh + Xavier 20-layer MLP (200 steps): no verdict but healthy.
    run = train(
        tmp_path, "activation=tanh", "init=xavier_normal", "trainer.steps=200",
        "trainer.log_every=20", f"seed={seed}",
    ).ok()  # fmt: skip
    assert [v["kind"] for v in run.summary["verdicts"]] == ["healthy"]
