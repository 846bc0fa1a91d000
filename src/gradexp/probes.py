"""Probes: the instruments the loop calls at fixed points of a logging step.

A probe declares what it measures (``quantities``, see gradexp.record.Quantity) and
acts in some of the step's phases: ``hooks()`` is entered around forward and
backward; ``after_backward``, ``after_clip``, ``before_update`` and ``after_update``
return device tensors (or host floats) keyed by quantity name. The trainer brings all
of a step's values to the host in one transfer, then each probe's ``read`` puts them
into the step's ``StepRecord``. Nothing runs on a step whose plan a probe is not
``active`` for, so a step that does not log pays nothing. A probe with state (the
dead-unit tracker) saves and restores it with ``state_dict`` / ``load_state_dict``.

Adding a per-layer quantity is one probe (or one more declaration in a probe): the
tags, the Custom Scalars chart, summary.json's keys and the checkpoint follow.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from gradexp import telemetry
from gradexp.hessian_free import HessianFree
from gradexp.record import (
    RELATIVE_PREFIX,
    RELATIVE_SECTION,
    Quantity,
    StepRecord,
    log10_relative,
    ratio,
)
from gradexp.telemetry import LayerMap, histogram_from_stats, histogram_stats

if TYPE_CHECKING:
    from gradexp.clipping import ClipMode
    from gradexp.config import TrainerConfig
    from gradexp.data import Dataset

Stats = dict[str, "torch.Tensor | float"]
# Custom Scalars charts that collect the scalars of several probes.
LOSS_CHART = "loss (train, test) and the input-blind baseline"
ACC_CHART = "accuracy (train, test)"


def relative(name: str, what: str, chart: str) -> Quantity:
    """The log10 of per-layer quantity ``name`` over the head's: ``log10_rel/<name>``.

    On a log10 scale relative to the head, TensorBoard's linear axes, smoothing, outlier
    clipping and four-decimal data table cannot turn a vanishing layer into a flat 0 nor
    invent a decay; the head reads 0. A zero or non-finite value is not logged (sparse).
    """
    return Quantity(
        f"{RELATIVE_PREFIX}{name}",
        doc=f"log10 of the layer's {what} over the head's (0: the head's; -2: 1% of it;"
        " not logged where either is zero or not finite)",
        sparse=True,
        chart=chart,
        section=RELATIVE_SECTION,
    )


SIGNAL_REL_CHART = "log10 backward signal / head's (0: as strong as the head; -2: 1% of it)"
GRAD_REL_CHART = "log10 gradient norm / head's (0: as large as the head's; -2: 1% of it)"


@dataclass(frozen=True)
class StepPlan:
    """What this step does besides training: one object instead of five flags.

    ``log``: statistics are taken and logged; histograms, evaluations and figures ride
    on log steps (they need the statistics), and so does the last step.
    """

    log: bool
    hist: bool
    eval: bool
    figure: bool
    checkpoint: bool

    @classmethod
    def of(cls, step: int, t: TrainerConfig) -> StepPlan:
        """The plan of ``step`` under the trainer's cadences (log_every, hist_every,
        eval_every, figure_every, checkpoint_every)."""
        final = step == t.steps - 1
        hist = step % t.hist_every == 0
        evaluate = step % t.eval_every == 0 or final
        figure = bool(t.figure_every) and step % t.figure_every == 0 and not final
        log = step % t.log_every == 0 or hist or evaluate or figure or final
        checkpoint = bool(t.checkpoint_every) and (step + 1) % t.checkpoint_every == 0
        return cls(log, hist, evaluate, figure, checkpoint)


@dataclass
class StepContext:
    """What the loop hands its probes about the current step.

    Attributes:
        step: the training step.
        plan: the step's plan.
        loss: the batch loss (detached, float32).
        output: the model's output (detached).
        target: the batch's targets.
        grads: each parameter's gradient, after AMP unscaling, in ``LayerMap`` order.
        grad_sq: per-layer squared gradient norms before clipping (float64; None on a
            step that took none).
        lr: the learning rate of this step's update.
        clip: the clip mode's statistics (after clipping, on log steps).
    """

    step: int
    plan: StepPlan
    loss: torch.Tensor
    output: torch.Tensor
    target: torch.Tensor
    grads: list[torch.Tensor]
    grad_sq: torch.Tensor | None
    lr: float
    clip: dict[str, torch.Tensor] = field(default_factory=dict)


class Probe:
    """The base: a probe that measures nothing, in no phase. Subclasses declare in
    ``declares`` every quantity they can measure, whatever the run; an instance's
    ``quantities`` are those of its run (all of them unless it narrows them); they
    override the phases they act in."""

    name = "probe"  # its key in the checkpoint
    declares: ClassVar[tuple[Quantity, ...]] = ()
    quantities: Sequence[Quantity] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "quantities" not in vars(cls):
            cls.quantities = cls.declares

    @classmethod
    def declared(cls) -> tuple[Quantity, ...]:
        """Every quantity this kind of probe can declare (no model needed): what the
        HParams experiment and the README's tag table are built from."""
        return cls.declares

    def active(self, plan: StepPlan) -> bool:
        return plan.log

    def hooks(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def after_backward(self, ctx: StepContext) -> Stats:
        return {}

    def after_clip(self, ctx: StepContext) -> Stats:
        return {}

    def before_update(self, ctx: StepContext) -> Stats:
        return {}

    def after_update(self, ctx: StepContext) -> Stats:
        return {}

    def read(self, host: dict[str, list[float]], record: StepRecord) -> None:
        """Put this probe's host values into ``record``: by default every declared
        per-layer, per-parameter and scalar quantity that this step measured."""
        for q in self.quantities:
            values = host.get(q.name)
            if values is None:
                continue
            if q.kind == "scalar":
                record.scalars[q.name] = values[0]
            elif q.kind == "layer":
                record.layers[q.name] = values
            elif q.kind == "param":
                record.params[q.name] = values

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        pass


class TaskProbe(Probe):
    """The task's numbers: training loss and accuracy, the input-blind baseline, the
    learning rate, the speed, the fp16 loss scale."""

    name = "task"
    _task: ClassVar[dict[str, Any]] = {"section": "task", "kind": "scalar", "summary": True}
    ACC_TRAIN = Quantity(
        "acc/train", doc="training accuracy of the batch", chart=ACC_CHART, **_task
    )
    AMP_SCALE = Quantity(
        "amp/scale", "scalar", "the gradient scaler's scale", when="trainer.amp=fp16"
    )
    declares = (
        Quantity("loss/train", doc="training loss of the batch", chart=LOSS_CHART, **_task),
        Quantity(
            "loss/baseline",
            doc="the loss of the best input-blind prediction",
            chart=LOSS_CHART,
            **_task,
        ),
        ACC_TRAIN,
        Quantity("opt/lr", "scalar", "the learning rate of the step's update"),
        Quantity("perf/steps_per_s", "scalar", "training speed since the last log step"),
        AMP_SCALE,
    )

    def __init__(self, data: Dataset, scaler: torch.amp.GradScaler, start_step: int) -> None:
        self.data = data
        self.scaler = scaler
        self.last = (time.perf_counter(), start_step - 1)
        left_out = {self.ACC_TRAIN} if data.spec.regression else set()
        left_out |= set() if scaler.is_enabled() else {self.AMP_SCALE}
        self.quantities = [q for q in self.declares if q not in left_out]

    def after_backward(self, ctx: StepContext) -> Stats:
        out: Stats = {"loss/train": ctx.loss, "loss/baseline": self.data.baseline, "opt/lr": ctx.lr}
        hits = self.data.correct(ctx.output, ctx.target)
        if hits is not None:
            out["acc/train"] = hits / ctx.target.numel()
        return out

    def after_update(self, ctx: StepContext) -> Stats:
        now = time.perf_counter()
        (then, step), self.last = self.last, (now, ctx.step)
        out: Stats = {"perf/steps_per_s": (ctx.step - step) / max(now - then, 1e-9)}
        if self.scaler.is_enabled():
            out["amp/scale"] = self.scaler.get_scale()
        return out


class EvalProbe(Probe):
    """Loss and accuracy on the whole test set, on eval steps (after the update)."""

    name = "eval"
    _task: ClassVar[dict[str, Any]] = {
        "section": "task", "kind": "scalar", "summary": True, "when": "eval steps"
    }  # fmt: skip
    ACC_TEST = Quantity("acc/test", doc="accuracy on the whole test set", chart=ACC_CHART, **_task)
    declares = (
        Quantity(
            "loss/test", doc="loss on the whole test set (eval mode)", chart=LOSS_CHART, **_task
        ),
        ACC_TEST,
    )

    def __init__(self, evaluate: Callable[[], torch.Tensor], regression: bool) -> None:
        self.evaluate = evaluate
        self.quantities = [q for q in self.declares if not (regression and q is self.ACC_TEST)]

    def active(self, plan: StepPlan) -> bool:
        return plan.eval

    def after_update(self, ctx: StepContext) -> Stats:
        return {"eval": self.evaluate()}

    def read(self, host: dict[str, list[float]], record: StepRecord) -> None:
        if "eval" in host:
            loss, acc = host["eval"]
            record.scalars["loss/test"] = loss
            if not math.isnan(acc):  # NaN: a regression task
                record.scalars["acc/test"] = acc


class GradNormProbe(Probe):
    """Each layer's gradient norm before clipping (and after, when clipping), and the
    total norm: the core of the gradient-flow picture."""

    name = "grad_norm"
    _total: ClassVar[dict[str, Any]] = {
        "kind": "scalar", "chart": "total gradient norm", "section": "clipping", "log_scale": True
    }  # fmt: skip
    CLIPPED = (
        Quantity(
            "grad_norm_clipped",
            doc="‖∂L/∂W‖ after clipping",
            when="log steps, clip != none",
            log_scale=True,
        ),
        Quantity(
            "grad/norm_post_clip",
            doc="total gradient norm after clipping",
            when="log steps, clip != none",
            **_total,
        ),
    )
    declares = (
        Quantity(
            "grad_norm",
            doc="‖∂L/∂W‖ of the layer's parameters, before clipping",
            chart="gradient norm per layer",
            log_scale=True,
            summary=True,
        ),
        relative("grad_norm", "grad_norm", GRAD_REL_CHART),
        Quantity("grad/norm_pre_clip", doc="total gradient norm before clipping", **_total),
        Quantity(
            "flow/grad_norm_ratio",
            "scalar",
            summary=True,
            doc="grad_norm of the first layer / the last",
        ),
        *CLIPPED,
    )

    def __init__(self, layers: LayerMap, clipping: bool) -> None:
        self.layers = layers
        self.clipping = clipping
        self.quantities = [q for q in self.declares if clipping or q not in self.CLIPPED]

    def after_backward(self, ctx: StepContext) -> Stats:
        assert ctx.grad_sq is not None
        return {"grad_norm": ctx.grad_sq.sqrt(), "grad/norm_pre_clip": ctx.grad_sq.sum().sqrt()}

    def after_clip(self, ctx: StepContext) -> Stats:
        if not self.clipping:
            return {}
        post = self.layers.layer_sq_norms(ctx.grads)
        return {"grad_norm_clipped": post.sqrt(), "grad/norm_post_clip": post.sum().sqrt()}

    def read(self, host: dict[str, list[float]], record: StepRecord) -> None:
        super().read(host, record)
        norms = host["grad_norm"]
        record.layers["log10_rel/grad_norm"] = log10_relative(norms)
        record.scalars["flow/grad_norm_ratio"] = _ratio(norms[0], norms[-1])


def _ratio(first: float, last: float) -> float:
    """For TensorBoard: first / last, NaN where it is not a number (see record.ratio)."""
    r = ratio(first, last)
    return math.nan if r is None else r


class ParamNormProbe(Probe):
    """trainer.per_param=true: every parameter's gradient norm.

    A vanished gradient (entries below ~1e-19) has a float32 norm of exactly 0; such
    norms are taken again in float64, as the per-layer ones are.
    """

    name = "param_norm"
    declares = (
        Quantity(
            "grad_norm_param",
            "param",
            "each parameter's gradient norm",
            when="trainer.per_param=true",
        ),
    )

    def after_backward(self, ctx: StepContext) -> Stats:
        return {"grad_norm_param": telemetry.tensor_norms(ctx.grads)}


class HistogramProbe(Probe):
    """Histograms of log10 |entry| of each layer's gradient (hist steps), and how many
    entries were not finite (counted apart: a histogram holds finite values only)."""

    name = "histogram"
    declares = (
        # In decades: a starved layer's card reads 1e-8 where the head's reads 1e-2
        # (TensorBoard scales each card's axis apart; raw entries are a spike at 0).
        Quantity(
            "grad_log10",
            "hist",
            "histogram of log10 |entry| of the layer's gradient (finite, non-zero entries)",
            when="hist steps",
        ),
        # One scalar, not one always-zero card per layer: the first non-finite layer is
        # named by summary.json's nonfinite and the verdicts.
        Quantity(
            "grad/nonfinite",
            "scalar",
            "count of non-finite gradient entries over all layers",
            when="hist steps",
        ),
    )

    def __init__(self, layers: LayerMap) -> None:
        self.layers = layers

    def active(self, plan: StepPlan) -> bool:
        return plan.hist

    def after_backward(self, ctx: StepContext) -> Stats:
        grads = self.layers.flat_layer_grads(ctx.grads)
        return {"grad_log10": torch.stack([histogram_stats(g, log10_abs=True) for g in grads])}

    def read(self, host: dict[str, list[float]], record: StepRecord) -> None:
        flat = host["grad_log10"]
        width = len(flat) // len(self.layers)
        rows = [flat[i * width : (i + 1) * width] for i in range(len(self.layers))]
        record.scalars["grad/nonfinite"] = sum(row[0] for row in rows)
        record.hists["grad_log10"] = [histogram_from_stats(row) for row in rows]


class SignalProbe(Probe):
    """Each layer's forward signal RMS(h) and backward signal, the per-example RMS of
    dl/dh (see telemetry.SignalProbe): hooks on log steps only."""

    name = "signal"
    declares = (
        Quantity(
            "signal_bwd",
            doc="backward signal: per-example RMS of ∂ℓ/∂h",
            chart="backward signal per layer",
            log_scale=True,
            summary=True,
        ),
        relative("signal_bwd", "backward signal (signal_bwd)", SIGNAL_REL_CHART),
        Quantity(
            "signal_fwd",
            doc="forward signal: RMS of the layer output h",
            chart="forward signal per layer",
            log_scale=True,
            summary=True,
        ),
        Quantity(
            "flow/signal_bwd_ratio",
            "scalar",
            summary=True,
            doc="signal_bwd of the first layer / the last",
        ),
        Quantity("flow/signal_fwd_ratio", "scalar", "signal_fwd of the first layer / the last"),
    )

    def __init__(self, layers: LayerMap, scaler: torch.amp.GradScaler, device: torch.device):
        self.layers, self.scaler, self.device = layers, scaler, device
        self.probe: telemetry.SignalProbe | None = None

    def hooks(self) -> contextlib.AbstractContextManager:
        self.probe = telemetry.SignalProbe(self.layers.modules)
        return self.probe

    def after_backward(self, ctx: StepContext) -> Stats:
        assert self.probe is not None
        fwd, bwd = self.probe.result(self.device)
        if self.scaler.is_enabled():
            bwd = bwd / self.scaler.get_scale()  # tensor hooks saw the scaled loss
        self.probe = None
        return {"signal_fwd": fwd, "signal_bwd": bwd}

    def read(self, host: dict[str, list[float]], record: StepRecord) -> None:
        super().read(host, record)
        record.layers["log10_rel/signal_bwd"] = log10_relative(host["signal_bwd"])
        for key in ("signal_bwd", "signal_fwd"):
            values = host[key]
            record.scalars[f"flow/{key}_ratio"] = _ratio(values[0], values[-1])


class TimeProbe(Probe):
    """||dL/dh_t||, the gradient that reaches each sampled time step t, for every
    recurrent layer unrolled in Python (see telemetry.TimeProbe)."""

    name = "time"
    declares = (
        Quantity(
            "time_grad",
            "time",
            "‖∂L/∂h_t‖ at trainer.time_samples time steps",
            when="log steps, recurrent models",
            chart="||dL/dh_t|| per time step",
            section="gradient through time",
        ),
        # In log10 over the last time step's: TensorBoard's smoothing cannot smear a 5e6
        # at step 0 into a neat decay, nor its data table round 1e-5 to 0.
        Quantity(
            f"{RELATIVE_PREFIX}time_grad",
            "time",
            "log10 of ‖∂L/∂h_t‖ over the last time step's (0: as strong; -2: 1% of it; not"
            " logged where either is zero)",
            when="log steps, recurrent models",
            sparse=True,
            chart="log10 ||dL/dh_t|| / the last time step's (-2: 1% of it)",
            section=RELATIVE_SECTION,
        ),
        Quantity(
            "flow/time_grad_ratio",
            "scalar",
            summary=True,
            doc="‖∂L/∂h_0‖ / ‖∂L/∂h_{T-1}‖ of the recurrent layer nearest the loss",
        ),
    )

    def __init__(self, layers: LayerMap, samples: int) -> None:
        self.traced = [
            (name, tag, m)
            for name, tag, m in zip(layers.names, layers.tags, layers.modules)
            if getattr(m, "traceable", False)
        ]
        self.steps: dict[str, list[int]] = {}  # layer name -> the sampled time steps
        self.samples = samples
        self.probe: telemetry.TimeProbe | None = None

    def hooks(self) -> contextlib.AbstractContextManager:
        self.probe = telemetry.TimeProbe([m for _, _, m in self.traced], self.samples)
        return self.probe

    def after_backward(self, ctx: StepContext) -> Stats:
        assert self.probe is not None
        out: Stats = {}
        for (name, _, _), (steps, norms) in zip(self.traced, self.probe.result()):
            self.steps[name] = steps
            out[f"time:{name}"] = norms
        self.probe = None
        return out

    def read(self, host: dict[str, list[float]], record: StepRecord) -> None:
        for name, _, _ in self.traced:
            norms = host.get(f"time:{name}")
            if norms:
                record.time[name] = (self.steps[name], norms)
                # The last recurrent layer (nearest the loss) is the one reported.
                record.scalars["flow/time_grad_ratio"] = _ratio(norms[0], norms[-1])


class WeightProbe(Probe):
    """Each layer's weight norm, and the size of the step's update relative to it.

    ``buffers``: for heavy-ball SGD, whose update is -lr * momentum buffer, a function
    that reads the buffers after the step; None for any other optimizer (or a skipping
    fp16 scaler), whose update needs the parameters copied before the step and
    subtracted after it.
    """

    name = "weight"
    declares = (
        Quantity(
            "weight_norm",
            doc="‖W‖ of the layer's parameters",
            chart="weight norm per layer",
            log_scale=True,
            summary=True,
        ),
        Quantity(
            "update_ratio",
            doc="‖ΔW‖ / ‖W‖ of the step's update",
            chart="update/weight ratio per layer",
            log_scale=True,
            summary=True,
        ),
    )

    def __init__(
        self, layers: LayerMap, buffers: Callable[[], list[torch.Tensor] | None] | None = None
    ) -> None:
        self.layers = layers
        self.buffers = buffers
        self.snapshot: list[torch.Tensor] | None = None
        self.weight = torch.zeros(len(layers))
        self.lr = 0.0
        self.read_buffers = False

    def before_update(self, ctx: StepContext) -> Stats:
        params = [p.detach() for p in self.layers.params]
        self.weight = self.layers.layer_sq_norms(params).sqrt()
        self.lr = ctx.lr
        # The optimizer decides (None: not heavy-ball SGD, e.g. one swapped in after setup).
        self.read_buffers = self.buffers is not None and self.buffers() is not None
        if not self.read_buffers:
            if self.snapshot is None:
                self.snapshot = [p.clone() for p in params]
            else:
                torch._foreach_copy_(self.snapshot, params)
        return {"weight_norm": self.weight}

    def after_update(self, ctx: StepContext) -> Stats:
        if self.read_buffers:
            buffers = self.buffers()  # type: ignore[misc]
            assert buffers is not None
            update_sq = self.layers.layer_sq_norms(buffers) * self.lr**2
        else:
            assert self.snapshot is not None
            torch._foreach_sub_(self.snapshot, [p.detach() for p in self.layers.params])
            update_sq = self.layers.layer_sq_norms(self.snapshot)
        ratio = torch.where(self.weight > 0, update_sq.sqrt() / self.weight, math.nan)
        return {"update_ratio": ratio}


class ActivationHealthProbe(Probe):
    """Activation health per layer: mean, std, saturated share (sigmoid, tanh) and dead
    units (see telemetry.ActivationProbe), and which units are dead for good (its state,
    saved in checkpoints)."""

    name = "activation_health"
    declares = tuple(
        Quantity(key, doc=doc, sparse=True, chart=title, section="activation health", summary=True)
        for key, (title, doc) in {
            "act_mean": ("activation mean per layer", "mean of the layer's activation outputs"),
            "act_std": ("activation std per layer", "std of the layer's activation outputs"),
            "sat_frac": (
                "saturated share of units per layer (sigmoid, tanh)",
                "share of sigmoid/tanh outputs in the flat regions",
            ),
            "dead_frac": ("dead units per layer", "share of the layer's units dead in the batch"),
            "gate_sat_frac": (
                "saturated share of gates per layer (LSTM, GRU)",
                "share of an LSTM/GRU cell's sigmoid gate values in the flat regions",
            ),
        }.items()
    )

    def __init__(self, layers: LayerMap, sustain: int, device: torch.device) -> None:
        self.acts = telemetry.activation_modules(layers.modules)
        self.n = len(layers)
        self.device = device
        self.dead_units = telemetry.DeadUnits(self.acts, self.n, sustain)
        self.probe: telemetry.ActivationProbe | None = None
        # A chart only for what the model's activations have (no saturation without
        # sigmoid/tanh); the values stay declared, NaN where a layer has none.
        has = set(telemetry.health_quantities(self.acts))
        self.quantities = [q if q.name in has else replace(q, chart=None) for q in self.declares]

    def hooks(self) -> contextlib.AbstractContextManager:
        self.probe = telemetry.ActivationProbe(self.acts, self.n)
        return self.probe

    def after_backward(self, ctx: StepContext) -> Stats:
        assert self.probe is not None
        stats = self.probe.result(self.device)
        self.dead_units.update(self.probe.dead_masks())
        self.probe = None
        return dict(stats)

    def result(self) -> list[dict[str, float] | None]:
        """Per layer, the shares of units that ever died / came back / never recovered."""
        return self.dead_units.result()

    def state_dict(self) -> dict[str, Any]:
        return self.dead_units.state()

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.dead_units.load_state(state, device)


class ClipProbe(Probe):
    """The clip mode's own statistics, as it declares them (clipping.ClipMode.stats)."""

    name = "clip"

    @classmethod
    def declared(cls) -> tuple[Quantity, ...]:
        """Every registered clip mode's statistics (clipping.ClipMode.stats)."""
        from gradexp.clipping import CLIP_MODES

        return tuple(
            dict.fromkeys(
                q for name in CLIP_MODES.names() for q in CLIP_MODES.get(name).stats.values()
            )
        )

    def __init__(self, mode: ClipMode) -> None:
        self.declared = dict(mode.stats)
        self.quantities = list(dict.fromkeys(self.declared.values()))

    def after_clip(self, ctx: StepContext) -> Stats:
        undeclared = set(ctx.clip) - set(self.declared)
        if undeclared:  # never dropped silently
            raise KeyError(f"clip statistics {sorted(undeclared)} are not declared in .stats")
        return {self.declared[k].name: v for k, v in ctx.clip.items()}


HF_WHEN = "log steps, optim=hessian_free"


def _hf(name: str, doc: str, chart: str | None = None, log_scale: bool = False) -> Quantity:
    return Quantity(name, "scalar", doc, sparse=True, chart=chart, section="hessian-free",
                    log_scale=log_scale, when=HF_WHEN)  # fmt: skip


class HessianFreeProbe(Probe):
    """What each Hessian-free step did (gradexp.hessian_free.HFStats): on log steps to
    TensorBoard, every step into the run's summary (``result``)."""

    name = "hessian_free"
    declares = (
        _hf("hf/cg_iters", "CG iterations the step took", "CG iterations: taken, chosen"),
        _hf(
            "hf/chosen_iter",
            "the backtracked CG iterate the step took (0: none lowered the loss)",
            "CG iterations: taken, chosen",
        ),  # fmt: skip
        _hf(
            "hf/damping", "lambda, the Levenberg-Marquardt damping the step used", log_scale=True
        ),  # fmt: skip
        _hf(
            "hf/rho",
            "reduction ratio: actual over predicted reduction (not logged when"
            " no iterate lowered the loss)",
        ),  # fmt: skip
        _hf(
            "hf/rate", "the line search's step along the CG direction (0: rejected, no update)"
        ),  # fmt: skip
        _hf(
            "hf/predicted",
            "q(d) - q(0): the damped quadratic model's predicted change of the loss",
            "predicted vs actual change of the loss",
        ),  # fmt: skip
        _hf(
            "hf/actual",
            "f(theta + d) - f(theta): the loss's change at the chosen iterate",
            "predicted vs actual change of the loss",
        ),  # fmt: skip
        _hf("hf/curvature_batch", "examples the curvature products were taken on"),
    )

    def __init__(self, optimizer: HessianFree, curvature_batch: int) -> None:
        self.optimizer = optimizer
        self.curvature_batch = curvature_batch
        self.steps: dict[str, list[float]] = {k: [] for k in RESULT_KEYS}
        self.stopped: dict[str, int] = {}  # steps by why CG stopped

    def active(self, plan: StepPlan) -> bool:
        return True  # every step's statistics go into the summary

    def after_update(self, ctx: StepContext) -> Stats:
        s = self.optimizer.last
        if s is None:  # the step was skipped (a non-finite gradient): no HF step
            return {}
        for key in RESULT_KEYS:
            self.steps[key].append(float(getattr(s, key)))
        self.stopped[s.cg_stopped] = self.stopped.get(s.cg_stopped, 0) + 1
        if not ctx.plan.log:
            return {}
        rho = s.rho if math.isfinite(s.rho) else math.nan
        return {"hf/cg_iters": float(s.cg_iters), "hf/chosen_iter": float(s.chosen_iter),
                "hf/damping": s.damping, "hf/rho": rho, "hf/rate": s.rate,
                "hf/predicted": s.predicted, "hf/actual": s.actual,
                "hf/curvature_batch": float(self.curvature_batch)}  # fmt: skip

    def result(self) -> dict[str, Any] | None:
        """summary.json's ``hessian_free``: CG iterations, damping, rho and the line search
        over every step, the rejected steps, the curvature products and loss evaluations."""
        steps = self.steps
        n = len(steps["cg_iters"])
        if not n:
            return None

        def median(values: list[float]) -> float | None:
            finite = sorted(v for v in values if math.isfinite(v))
            return finite[len(finite) // 2] if finite else None

        return {
            "steps": n,
            "curvature_batch": self.curvature_batch,
            "cg_iters": {
                "median": median(steps["cg_iters"]),
                "max": int(max(steps["cg_iters"])),
                "total": int(sum(steps["cg_iters"])),
            },  # fmt: skip
            "damping": {
                "first": steps["damping"][0],
                "last": self.optimizer.param_groups[0]["damping"],
                "min": min(steps["damping"]),
                "max": max(steps["damping"]),
            },  # fmt: skip
            "rho_median": median(steps["rho"]),
            "rate_median": median(steps["rate"]),
            "rejected_steps": sum(1 for r in steps["rate"] if r == 0),
            "cg_stopped": dict(sorted(self.stopped.items())),
            "products": int(sum(steps["products"])),
            "evaluations": int(sum(steps["evaluations"])),
        }

    def state_dict(self) -> dict[str, Any]:
        return {**{k: list(v) for k, v in self.steps.items()}, "stopped": dict(self.stopped)}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.steps = {k: list(state.get(k, [])) for k in RESULT_KEYS}
        self.stopped = dict(state.get("stopped", {}))


RESULT_KEYS = ("cg_iters", "damping", "rho", "rate", "products", "evaluations")


@contextlib.contextmanager
def hooks(probes: list[Probe]) -> Iterator[None]:
    """Every probe's hooks, while entered; all are removed on exit, on every path."""
    with contextlib.ExitStack() as stack:
        for probe in probes:
            stack.enter_context(probe.hooks())
        yield


def collect(probes: list[Probe], phase: str, ctx: StepContext) -> Stats:
    """What the probes measure in ``phase`` (after_backward, after_clip, ...)."""
    out: Stats = {}
    for probe in probes:
        out.update(getattr(probe, phase)(ctx))
    return out


def to_host(stats: Stats) -> dict[str, list[float]]:
    """A step's values on the host, in one transfer: every tensor as float64 (tiny
    squared norms, a vanished gradient, are not representable in float32)."""
    tensors = {k: v for k, v in stats.items() if isinstance(v, torch.Tensor)}
    flat = (
        torch.cat([v.detach().double().flatten() for v in tensors.values()]).tolist()
        if tensors
        else []
    )
    host: dict[str, list[float]] = {}
    offset = 0
    for k, v in tensors.items():
        host[k] = flat[offset : offset + v.numel()]
        offset += v.numel()
    host.update({k: [float(v)] for k, v in stats.items() if not isinstance(v, torch.Tensor)})
    return host


# Every kind of probe a run can have (default_probes), in its order.
PROBES: tuple[type[Probe], ...] = (
    TaskProbe,
    EvalProbe,
    GradNormProbe,
    SignalProbe,
    WeightProbe,
    ActivationHealthProbe,
    HistogramProbe,
    ClipProbe,
    TimeProbe,
    ParamNormProbe,
    HessianFreeProbe,
)


def default_probes(
    *,
    layers: LayerMap,
    data: Dataset,
    scaler: torch.amp.GradScaler,
    clip: ClipMode,
    evaluate: Callable[[], torch.Tensor],
    buffers: Callable[[], list[torch.Tensor] | None] | None,
    device: torch.device,
    start_step: int,
    per_param: bool,
    time_samples: int,
    sustain: int,
    optimizer: torch.optim.Optimizer | None = None,
    curvature_batch: int = 0,
) -> list[Probe]:
    """Every instrument of a run, in the order their quantities are listed."""
    probes: list[Probe] = [
        TaskProbe(data, scaler, start_step),
        EvalProbe(evaluate, data.spec.regression),
        GradNormProbe(layers, clipping=clip.cfg.name != "none"),
        SignalProbe(layers, scaler, device),
        WeightProbe(layers, buffers),
        ActivationHealthProbe(layers, sustain, device),
        HistogramProbe(layers),
        ClipProbe(clip),
    ]
    time_probe = TimeProbe(layers, time_samples)
    if time_probe.traced:
        probes.append(time_probe)
    if per_param:
        probes.append(ParamNormProbe())
    if isinstance(optimizer, HessianFree):
        probes.append(HessianFreeProbe(optimizer, curvature_batch))
    return probes
