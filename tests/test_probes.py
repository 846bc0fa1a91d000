"""The loop's parts on their own: the step plan, the finite guard, the probes and their
declarations, a probe added from outside the package, the optimizer closure, and
BatchNorm folding at a run's end."""

from __future__ import annotations

import io
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from conftest import TINY, composed, layer_tags, load_events, load_summary, scalar_series
from gradexp.config import TrainerConfig
from gradexp.guard import Decision, FiniteGuard
from gradexp.metrics import NullLogger, declared_quantities
from gradexp.optim import momentum_buffers
from gradexp.probes import (
    ClipProbe,
    ParamNormProbe,
    Probe,
    StepContext,
    StepPlan,
    WeightProbe,
    to_host,
)
from gradexp.record import Quantity, StepRecord
from gradexp.telemetry import LayerMap
from gradexp.train import Trainer, run

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = "trainer.progress=off"


class Stack(nn.Module):
    """Three depth layers (the last named head), as gradexp's models expose them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))

    def depth_layers(self) -> list[tuple[str, nn.Module]]:
        return [("a", self.a), ("b", self.b), ("head", self.head)]


def stack_layers() -> tuple[Stack, LayerMap]:
    torch.manual_seed(0)
    model = Stack()
    return model, LayerMap.of(model)


def set_grads(layers: LayerMap, values: dict[int, float]) -> None:
    """Every gradient 1, except the given layers' entries."""
    for p, i in zip(layers.params, layers.layer_of):
        p.grad = torch.full_like(p, values.get(i, 1.0))


# --- the step plan -----------------------------------------------------------------------


def test_step_plan_rides_hist_eval_and_figure_steps_on_log_steps():
    t = TrainerConfig(
        steps=12, log_every=4, hist_every=3, eval_every=5, figure_every=6, checkpoint_every=5
    )
    plans = [StepPlan.of(s, t) for s in range(12)]
    assert [s for s, p in enumerate(plans) if p.log] == [0, 3, 4, 5, 6, 8, 9, 10, 11]
    assert [s for s, p in enumerate(plans) if p.hist] == [0, 3, 6, 9]
    assert [s for s, p in enumerate(plans) if p.eval] == [0, 5, 10, 11]  # and the last
    assert [s for s, p in enumerate(plans) if p.figure] == [0, 6]  # not the last: the end draws
    # After the update of steps 4 and 9: 5 and 10 steps done.
    assert [s for s, p in enumerate(plans) if p.checkpoint] == [4, 9]
    for p in plans:
        assert p.log or not (p.hist or p.eval or p.figure)


# --- the finite guard --------------------------------------------------------------------


def guard(layers: LayerMap, **kw) -> FiniteGuard:
    opts = {"skip": False, "every_step": True, "scaler": False, **kw}
    return FiniteGuard(layers, torch.device("cpu"), **opts)


def test_guard_lets_finite_steps_through_and_stops_at_the_first_bad_one():
    _, layers = stack_layers()
    g = guard(layers)
    ok = torch.tensor(1.0)
    assert g.decide(0, ok, torch.ones(3), log=True) == Decision.ok
    assert g.decide(1, ok, None, log=False) == Decision.ok
    # Layers b and head non-finite: b is nearer the input, head (nearest the output) is
    # where backprop produced it.
    bad = torch.tensor([1.0, math.inf, math.nan], dtype=torch.float64)
    assert g.decide(2, ok, bad, log=True) == Decision.stop
    assert g.nonfinite == {"step": 2, "layer": "head"} == g.first()
    assert g.skipped == 0


def test_guard_on_a_device_that_decides_on_log_steps_only_reports_the_first_bad_step():
    _, layers = stack_layers()
    g = guard(layers, every_step=False)  # CUDA: no synchronization on non-log steps
    nan = torch.tensor(math.nan)
    assert g.decide(3, nan, None, log=False) == Decision.ok  # recorded on the device only
    assert g.decide(4, torch.tensor(1.0), None, log=False) == Decision.ok
    set_grads(layers, {1: math.inf})  # the layers are read from the gradients at hand
    assert g.decide(5, torch.tensor(1.0), torch.ones(3), log=True) == Decision.stop
    assert g.nonfinite == {"step": 3, "layer": "b"}


def test_guard_skip_mode_counts_bad_steps_and_goes_on():
    _, layers = stack_layers()
    g = guard(layers, skip=True)
    assert g.needs_grad_norms
    bad = torch.tensor([1.0, math.inf, 1.0], dtype=torch.float64)
    assert g.decide(0, torch.tensor(1.0), torch.ones(3), log=False) == Decision.ok
    assert g.decide(1, torch.tensor(1.0), bad, log=False) == Decision.skip
    assert g.decide(2, torch.tensor(1.0), torch.ones(3), log=False) == Decision.ok
    assert g.decide(3, torch.tensor(math.nan), torch.ones(3), log=False) == Decision.skip
    assert g.skipped == 2
    assert g.nonfinite is None and g.first() == {"step": 1, "layer": "b"}


def test_guard_blames_the_previous_unchecked_step_when_its_gradients_were_bad():
    _, layers = stack_layers()
    g = guard(layers)
    g.decide(6, torch.tensor(1.0), None, log=False)  # a non-log step: gradients not checked
    assert not g.grads_checked
    set_grads(layers, {0: math.nan})
    assert not g.previous_step_bad(7, torch.tensor(1.0))  # a finite loss: nothing to do
    assert g.previous_step_bad(7, torch.tensor(math.inf))
    assert g.nonfinite == {"step": 6, "layer": "a"}


def test_guard_leaves_gradients_to_the_fp16_scaler():
    _, layers = stack_layers()
    g = guard(layers, scaler=True)
    bad = torch.tensor([math.inf, 1.0, 1.0], dtype=torch.float64)
    assert g.decide(0, torch.tensor(1.0), bad, log=True) == Decision.ok
    assert g.decide(1, torch.tensor(math.nan), bad, log=True) == Decision.stop


def test_guard_state_round_trips():
    _, layers = stack_layers()
    g = guard(layers, skip=True)
    g.decide(0, torch.tensor(math.nan), torch.ones(3), log=True)
    h = guard(layers, skip=True)
    h.load_state_dict(g.state_dict())
    assert (h.first(), h.skipped, h.grads_checked) == (g.first(), 1, True)


# --- probes ------------------------------------------------------------------------------


def context(layers: LayerMap, lr: float = 0.1) -> StepContext:
    plan = StepPlan(True, False, False, False, False)
    grads = layers.grads()
    loss = torch.tensor(1.0)
    y = torch.zeros(2, dtype=torch.long)
    return StepContext(0, plan, loss, torch.zeros(2, 2), y, grads, layers.layer_sq_norms(grads), lr)


def test_update_ratio_from_momentum_buffers_equals_the_parameter_difference():
    """Heavy-ball SGD's update is read from its buffers; any other optimizer's from a
    copy of the parameters. Both give the same ratio."""
    ratios = []
    for read_buffers in (True, False):
        model, layers = stack_layers()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def buffers(o=opt, ls=layers) -> list[torch.Tensor] | None:
            return momentum_buffers(o, ls.params)

        probe = WeightProbe(layers, buffers if read_buffers else None)
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
        for _ in range(2):  # the second step has a non-trivial buffer
            opt.zero_grad()
            model(x).square().mean().backward()
            ctx = context(layers)
            weight = probe.before_update(ctx)["weight_norm"]
            opt.step()
            ratios.append(probe.after_update(ctx)["update_ratio"])
        assert torch.all(weight > 0)
    by_buffers, by_copy = ratios[1], ratios[3]
    assert torch.allclose(by_buffers, by_copy, rtol=1e-5)
    assert torch.all(by_buffers > 0)


def test_per_parameter_norms_of_a_vanished_gradient_are_tiny_not_zero():
    _, layers = stack_layers()
    set_grads(layers, {0: 1e-30})
    host = to_host(ParamNormProbe().after_backward(context(layers)))
    norms = host["grad_norm_param"]
    # a.weight: 16 entries of 1e-30 -> 4e-30 (float32 squares them to 0)
    assert norms[0] == pytest.approx(4e-30, rel=1e-6)
    assert norms[1] == pytest.approx(2e-30, rel=1e-6)  # a.bias: 4 entries
    assert norms[2] == pytest.approx(4.0, rel=1e-6)


def test_a_clip_statistic_that_is_not_declared_is_an_error_not_dropped():
    class Mode:
        stats = {"coef": Quantity("clip/coef", "scalar")}

    probe = ClipProbe(Mode())  # type: ignore[arg-type]
    _, layers = stack_layers()
    ctx = context(layers)
    ctx.clip = {"coef": torch.tensor(0.5)}
    assert set(probe.after_clip(ctx)) == {"clip/coef"}
    ctx.clip = {"coef": torch.tensor(0.5), "new": torch.tensor(1.0)}
    with pytest.raises(KeyError, match="new"):
        probe.after_clip(ctx)


def test_to_host_keeps_tiny_values_and_host_floats():
    host = to_host({"a": torch.tensor([1e-200], dtype=torch.float64), "b": 2.5})
    assert host == {"a": [1e-200], "b": [2.5]}


# --- a probe from outside the package ---------------------------------------------------


class MaxAbsGrad(Probe):
    """A toy per-layer quantity: the largest |gradient entry| of each layer."""

    name = "toy"
    quantities = [
        Quantity("toy_grad_max", doc="max |g| per layer", chart="toy: max |g|", summary=True)
    ]

    def __init__(self, layers: LayerMap | None = None) -> None:
        self.layers = layers

    def after_backward(self, ctx: StepContext) -> dict:
        out = torch.zeros(len(self.layers))  # type: ignore[arg-type]
        for g, i in zip(ctx.grads, self.layers.layer_of):  # type: ignore[union-attr]
            out[i] = torch.maximum(out[i], g.abs().max())
        return {"toy_grad_max": out}


def test_a_new_per_layer_quantity_is_one_probe_and_nothing_in_the_loop(tmp_path: Path):
    cfg = composed(*TINY, QUIET)
    toy = MaxAbsGrad()
    trainer = Trainer(cfg, tmp_path, console=Console(file=io.StringIO()), probes=[toy])
    toy.layers = trainer.layers
    summary = trainer.train()
    tags = layer_tags(3)
    acc = load_events(tmp_path)
    # Its tags, at every log step ...
    for tag in tags:
        assert [s for s, _ in scalar_series(acc, f"toy_grad_max/{tag}")] == [0, 2, 3, 4, 5]
    # ... its Custom Scalars chart, with exactly its layers on it ...
    from tensorboard.plugins.custom_scalar import layout_pb2

    proto = acc.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    scalars = acc.Tags()["scalars"]
    matched = [t for t in scalars if any(re.search(r, t) for r in charts["toy: max |g|"])]
    assert sorted(matched) == sorted(f"toy_grad_max/{t}" for t in tags)
    # ... and its summary.json keys, against an independent reading of the event file.
    layers = load_summary(tmp_path)["layers"]
    assert [layer["name"] for layer in layers] == [t.split("_", 1)[1] for t in tags]
    for layer, tag in zip(layers, tags):
        series = scalar_series(acc, f"toy_grad_max/{tag}")
        assert layer["toy_grad_max"]["first"] == pytest.approx(series[0][1])
        assert layer["toy_grad_max"]["last"] == pytest.approx(series[-1][1])
    # The largest entry is at most the layer's norm, and positive.
    for layer in summary["layers"]:
        assert 0 < layer["toy_grad_max"]["first"] <= layer["grad_norm"]["first"] * (1 + 1e-6)


def test_probe_names_key_the_checkpoint_and_must_differ(tmp_path: Path):
    cfg = composed(*TINY, QUIET)
    with pytest.raises(ValueError, match="probe names"):
        Trainer(cfg, tmp_path, logger=NullLogger(), probes=[MaxAbsGrad(), MaxAbsGrad()])


# --- the optimizer step takes a closure -------------------------------------------------


def test_an_optimizer_that_reevaluates_the_loss_gets_a_closure(tmp_path: Path):
    cfg = composed(*TINY, QUIET, "model.depth=2")
    trainer = Trainer(cfg, tmp_path, logger=NullLogger(), console=Console(file=io.StringIO()))
    calls = []

    class CountingLBFGS(torch.optim.LBFGS):
        def step(self, closure):  # type: ignore[override]
            def counted() -> torch.Tensor:
                calls.append(1)
                return closure()

            return super().step(counted)

    lbfgs = CountingLBFGS(trainer.layers.params, lr=0.5, max_iter=3)
    trainer.optimizer = lbfgs
    trainer.scheduler = torch.optim.lr_scheduler.ConstantLR(lbfgs, factor=1.0, total_iters=0)
    summary = trainer.train()
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert len(calls) >= 6  # at least one re-evaluation per step
    # LBFGS with line steps lowers the training loss on this separable task.
    losses = [r.scalars["loss/train"] for r in trainer.history.records]
    assert losses[-1] < losses[0]


# --- BatchNorm folding at the end of a run ----------------------------------------------


def test_a_batchnorm_run_ends_with_its_folded_model(tmp_path: Path):
    cfg = composed(*TINY, QUIET, "norm=batch")
    console = io.StringIO()
    summary = run(cfg, tmp_path, console=Console(file=console, width=200))
    fold = load_summary(tmp_path)["fold"]
    assert fold["folded"] == 3 and fold["remaining"] == 0  # every hidden Linear + BatchNorm
    # Folding changes the arithmetic, not the function: same test metrics, tiny difference.
    assert fold["loss/test"] == pytest.approx(summary["metrics"]["loss/test"], rel=1e-4)
    # at most one of the 64 test examples may flip, where two logits are within ~1e-6
    assert fold["acc/test"] == pytest.approx(summary["metrics"]["acc/test"], abs=1 / 64 + 1e-9)
    assert 0 <= fold["max_abs_diff"] < 1e-4
    assert fold["speedup"] > 0
    assert "BatchNorm folded into 3 layers" in console.getvalue()
    acc = load_events(tmp_path)
    assert scalar_series(acc, "fold/max_abs_diff")[0][1] == pytest.approx(fold["max_abs_diff"])


def test_runs_without_batchnorm_have_no_fold(tmp_path: Path):
    summary = run(composed(*TINY, QUIET), tmp_path, logger=NullLogger(),
                  console=Console(file=io.StringIO()))  # fmt: skip
    assert summary["fold"] is None


def test_records_are_what_the_history_keeps():
    rec = StepRecord(3, {"loss/train": 1.0}, {"grad_norm": [1.0]}, params={"p": [1.0]})
    from gradexp.record import History

    h = History(["a"])
    h.append(rec)
    assert h.records[0].params == {} and h.records[0].layers == {"grad_norm": [1.0]}
    assert h.final("loss/train") == 1.0 and h.first_last("grad_norm") == ([1.0], [1.0])


# --- the README's tag table against the declarations ------------------------------------


def readme_tags() -> set[str]:
    """The tags the README's "TensorBoard tags" table names (its first column)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.split("### TensorBoard tags", 1)[1].split("\n#", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return {tag for cell in rows for tag in re.findall(r"`([^`]+)`", cell)}


@pytest.mark.parametrize(
    "overrides",
    [
        ("clip=agc", "trainer.per_param=true"),
        ("clip=norm", "norm=batch"),
        ("clip=value",),
        ("model=lstm", "data=adding", "data.length=6", "model.hidden_size=4"),
    ],
)
def test_every_declared_quantity_is_in_the_readme_tag_table(tmp_path: Path, overrides):
    tiny = TINY if "model=lstm" not in overrides else ("data.n_train=64", "data.n_test=16")
    trainer = Trainer(composed(*tiny, QUIET, *overrides), tmp_path, logger=NullLogger())
    documented = readme_tags()
    declared = {q.name: q for q in declared_quantities()}
    for q in trainer.quantities:
        # What a run has, its probes' classes declare (the chart may be left out).
        assert q.name in declared and replace(declared[q.name], chart=q.chart) == q, q
    for q in declared.values():
        assert q.name + SUFFIX[q.kind] in documented, q


SUFFIX = {"scalar": "", "layer": "/<L>", "hist": "/<L>", "param": "/<name>", "time": "/<L>/t<step>"}


# --- CUDA: a step that does not log never waits for the device ---------------------------


class SyncTrap(Probe):
    """Never measures; on every step's plan it arms torch's sync debug mode for a step
    that does not log (any device synchronization then raises) and disarms it for one
    that does."""

    name = "sync_trap"

    def __init__(self) -> None:
        self.armed_steps = 0

    def active(self, plan: StepPlan) -> bool:
        torch.cuda.set_sync_debug_mode(0 if plan.log else "error")
        self.armed_steps += not plan.log
        return False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("clip", ["none", "norm", "agc"])
def test_a_step_that_does_not_log_does_not_synchronize_the_device(tmp_path: Path, clip: str):
    cfg = composed(
        *TINY, QUIET, "trainer.device=cuda", f"clip={clip}", "trainer.steps=12",
        "trainer.log_every=100", "trainer.hist_every=100", "trainer.eval_every=100",
        "trainer.figure_every=0",
    )  # fmt: skip
    trap = SyncTrap()
    try:
        summary = run(cfg, tmp_path, logger=NullLogger(), console=Console(file=io.StringIO()),
                      probes=[trap])  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert summary["status"] == "completed" and summary["steps"] == 12
    assert trap.armed_steps == 10  # steps 1-10: only 0 and the last log


def test_a_checkpoint_of_another_layout_is_refused_in_one_line(tmp_path: Path):
    from gradexp.checkpoint import resume_state, save
    from gradexp.errors import ConfigError

    cfg = composed(*TINY, QUIET)
    path = tmp_path / "checkpoint.pt"
    save(path, {"step": 2, "config": {}, "last": {}})  # the layout before probes had state
    with pytest.raises(ConfigError, match="another version of gradexp") as e:
        resume_state(path, cfg)
    assert "\n" not in str(e.value)
