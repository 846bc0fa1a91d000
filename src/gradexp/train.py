"""The one training loop: ``Trainer(cfg, output_dir).train() -> summary``.

Per step: a plan (log? histograms? evaluate? figure? checkpoint?), a batch, forward and
backward inside the active probes' hooks, the probes after backward, clipping, the
probes after clipping, the finite guard's decision, the probes before the update, the
optimizer step (with a closure when the optimizer re-evaluates the loss), the probes
after it, and on log steps one record. Statistics stay on the device; a logging step
brings them to the host in one transfer, and a step that does not log runs no probe
and never waits for the device (on CUDA).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from gradexp import figures
from gradexp.checkpoint import CHECKPOINT_FORMAT, StopOnSignal, resume_state, sweep_stop_file
from gradexp.checkpoint import save as save_checkpoint
from gradexp.clipping import Clipper
from gradexp.config import Amp, Config, OnNonfinite, flat
from gradexp.data import Dataset, load_data
from gradexp.device import check_writable, resolve_device
from gradexp.display import ProgressReporter, print_summary, status_line, summary_markdown
from gradexp.errors import RunError
from gradexp.guard import Decision, FiniteGuard
from gradexp.hessian_free import Curvature, HessianFree, batch_statistics, model_curvature
from gradexp.init import init_weights, weights_and_biases
from gradexp.metrics import (
    MetricLogger,
    Tags,
    TensorBoardLogger,
    hparams_metrics,
    hparams_of,
    log_data,
    run_hparams,
    theory_markdown,
    verdict_markdown,
)
from gradexp.models import create_model
from gradexp.optim import create_optimizer, create_scheduler, momentum_buffers
from gradexp.probes import (
    ActivationHealthProbe,
    HessianFreeProbe,
    Probe,
    StepContext,
    StepPlan,
    TimeProbe,
    collect,
    default_probes,
    hooks,
    to_host,
)
from gradexp.record import CONFIG_DATA, SUMMARY_DATA, History, StepRecord
from gradexp.resources import check_memory
from gradexp.rundir import (
    CHECKPOINT_FILE,
    FIGURE_FILE,
    SUMMARY_FILE,
    disk_full,
    disk_full_error,
    free_reserve,
    minimal_summary,
    reserve_space,
    summary_text,
    write_text_atomic,
)
from gradexp.telemetry import LayerMap
from gradexp.theory import TheoryUnavailable, jacobian_spectrum, mean_field
from gradexp.verdicts import judge, outcome, where_and_when

OPTION_GROUPS = ("model", "data", "activation", "init", "norm", "clip", "optim")
log = logging.getLogger(__name__)
# The run's own log file (train.log) only: the terminal already shows the table and status.
file_log = logging.getLogger("gradexp.runlog")


def out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: the host's (MemoryError, torch's CPU allocator) or the
    GPU's (torch.OutOfMemoryError)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "not enough memory" in text or "can't allocate memory" in text
    )


def as_run_error(exc: BaseException, run_dir: Path, what: str) -> RunError | None:
    """A failure the machine caused (a full disk, too little memory), as the one line the
    run ends with; None for anything else (a bug: it keeps its traceback)."""
    if isinstance(exc, RunError):
        return exc
    if disk_full(exc):
        return disk_full_error(run_dir, what)
    if out_of_memory(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return RunError(
            f"out of memory {what} ({first}); choose a smaller model.width/depth,"
            " trainer.batch_size or task"
        )
    return None


@contextlib.contextmanager
def quiet_writer_threads() -> Any:
    """TensorBoard writes from a thread of its own: when the disk fills, that thread's
    error reaches the run through the next write (one line, see as_run_error) and its
    traceback is kept out of the terminal (train.log has it)."""
    previous = threading.excepthook

    def hook(args: Any) -> None:
        if disk_full(args.exc_value):
            file_log.warning("TensorBoard's writer: %s", args.exc_value)
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


class NonFiniteError(RuntimeError):
    """on_nonfinite=raise: a loss or gradient went non-finite."""


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Dataset, amp: Any) -> torch.Tensor:
    """(loss, accuracy) on the whole test set in eval mode, as a device tensor.

    Per prediction, as in training (the copy task makes several per example); the
    accuracy is NaN for a regression task.
    """
    x, y = data.x_test, data.y_test
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for xb, yb in zip(x.split(4096), y.split(4096)):
        with amp():
            out = model(xb).float()
        loss += data.loss(out, yb, reduction="sum")
        hits = data.correct(out, yb)
        correct += hits if hits is not None else math.nan
    model.train()
    return torch.stack([loss, correct]) / y.numel()


def default_console() -> Console:
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough for the per-layer table
        console = Console(width=max(console.width, 120))
    return console


class Trainer:
    """One run: its components, its loop, its state.

    Args:
        cfg: the validated config.
        output_dir: the run directory (TensorBoard events, summary.json, checkpoint.pt).
        logger: where the numbers go (default: TensorBoard in ``output_dir``).
        console: where the table and progress go.
        probes: extra instruments, measured and logged like the built-in ones.
    """

    def __init__(
        self,
        cfg: Config,
        output_dir: Path,
        logger: MetricLogger | None = None,
        console: Console | None = None,
        probes: list[Probe] | None = None,
    ) -> None:
        t = cfg.trainer
        self.cfg = cfg
        self.device = device = resolve_device(t.device)
        self.output_dir = output_dir = Path(output_dir)
        check_writable(output_dir)
        reserve_space(output_dir)  # room for the summary when the disk fills
        self.console = console or default_console()
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)

        self.data = load_data(cfg.data, device)
        check_memory(cfg, device, self.data.spec)  # before the model takes it
        self.model = create_model(cfg, self.data.spec).to(device)
        self.notes = init_weights(self.model, cfg.init, cfg.activation)
        self.layers = layers = LayerMap.of(self.model)
        self.optimizer = create_optimizer(cfg.optim, layers.params)
        self.scheduler = create_scheduler(cfg.optim, self.optimizer, t.steps)
        self.clipper = Clipper(
            cfg.clip, layers.params, layers.param_names, layers.layer_of, len(layers)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=t.amp == Amp.fp16)
        self.amp_dtype = torch.bfloat16 if t.amp == Amp.bf16 else torch.float16
        # L1 acts on the Linear/Conv/RNN weights only, not on norm gains or PReLU slopes.
        self.l1_weights = [w for _, ws, _ in weights_and_biases(self.model) for w in ws]
        self.batches = torch.Generator(device=device).manual_seed(cfg.seed)

        self.checkpoint = output_dir / CHECKPOINT_FILE
        resumed = resume_state(self.checkpoint, cfg) if t.resume else None
        self.resumed = resumed is not None
        self.step = resumed["step"] if resumed else 0  # steps done
        self.status, self.error = "completed", None
        self.theory: dict[str, Any] | None = None
        self.jacobian: dict[str, Any] | None = None
        self.theory_logged = self.resumed
        self.fold: dict[str, Any] | None = None

        skip = t.on_nonfinite == OnNonfinite.skip
        self.guard = FiniteGuard(
            layers,
            device,
            skip=skip,
            # CPU "synchronization" is free: decide every step there; on CUDA on log steps.
            every_step=device.type != "cuda" or skip,
            scaler=self.scaler.is_enabled(),
        )
        self.probes = default_probes(
            layers=layers,
            data=self.data,
            scaler=self.scaler,
            clip=self.clipper,
            evaluate=lambda: evaluate(self.model, self.data, self.amp),
            # A skipping fp16 scaler breaks update = -lr * buffer.
            buffers=None
            if self.scaler.is_enabled()
            else lambda: momentum_buffers(self.optimizer, layers.params),
            device=device,
            start_step=self.step,
            per_param=t.per_param,
            time_samples=t.time_samples,
            sustain=cfg.diagnose.sustain,
            optimizer=self.optimizer,
            curvature_batch=getattr(cfg.optim, "curvature_batch", 0) or t.batch_size,
        ) + list(probes or [])
        names = [p.name for p in self.probes]
        if len(set(names)) != len(names):
            raise ValueError(f"probe names must differ (they key the checkpoint): {names}")
        self.quantities = [q for p in self.probes for q in p.quantities]
        self.tags = Tags(self.quantities, layers.tags, layers.names, layers.param_names)
        self.history = History(layers.names)
        self.time_layers = [
            name for p in self.probes if isinstance(p, TimeProbe) for name, _, _ in p.traced
        ]
        if resumed:
            self.load_state_dict(resumed)
            file_log.info("resumed at step %d from %s", self.step, self.checkpoint)
        # Resuming: TensorBoard drops what the earlier writers logged from this step on;
        # a sweep's job started again from step 0 (its run left no checkpoint): all of it.
        stale = not self.resumed and any(output_dir.glob("events.out.tfevents.*"))
        purge = self.step if self.resumed else (0 if stale else None)
        self.logger = logger or TensorBoardLogger(
            output_dir, self.tags.layout(self.time_layers), purge_step=purge
        )
        if not self.resumed:
            # The composed config, for the gradexp tab ({"model.depth": 20, ...}).
            log_data(self.logger, CONFIG_DATA, flat(cfg), 0)
            for note in self.notes:
                self.logger.text("run/notes", note, 0)
        self.figure_missing: str | None = None
        if figures.missing_dependency():
            self.no_figures()
        file_log.info("start: %s on %s, writing to %s", hparams_of(cfg), device, output_dir)

    # --- the loop --------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train to ``trainer.steps`` (or a stop), write summary.json and the rest; return
        the summary. A run that goes non-finite with on_nonfinite=stop ends ``diverged``:
        in this tool divergence is a result, not an error."""
        t = self.cfg.trainer
        self.progress = ProgressReporter(t.progress, t.steps, self.console)
        self.start = time.perf_counter()
        self.loop_time: float | None = None  # the loop's wall time, once it has ended
        # Between two steps the state is whole: a signal stops the loop there (and is saved).
        self.stopper = StopOnSignal().__enter__()
        self.sweep_stop = sweep_stop_file()  # a sweep's driver stops its jobs through it
        consistent = True
        with quiet_writer_threads():
            try:
                if not self.resumed:
                    self.theory = initial_theory(self.cfg, self.data, self.logger)
                    self.jacobian = initial_jacobian(self.cfg, self.model, self.data, self.logger)
                self.loop()
                self.loop_time = time.perf_counter() - self.start  # not the folding after it
                self.fold = self.fold_batchnorm()
            except KeyboardInterrupt:  # a second Ctrl-C: mid-step, nothing consistent to save
                self.status, consistent = "interrupted", False
            except Exception as e:
                self.status, consistent = "failed", False
                error = as_run_error(e, self.output_dir, f"at step {self.step}")
                self.error = str(error) if error else f"{type(e).__name__}: {e}"
                if error is None:
                    raise
                # A full disk or too little memory: one line, and the last checkpoint kept.
                raise error from e
            except BaseException:  # SystemExit mid-step (a launcher's signal handler): not whole
                self.status, consistent = "interrupted", False
                raise
            finally:
                self.stopper.__exit__()
                self.progress.close()
                try:
                    if consistent:
                        self.save()
                except Exception as e:
                    if (error := as_run_error(e, self.output_dir, "writing checkpoint.pt")) is None:
                        raise
                    self.status, self.error = "failed", str(error)
                result = self.summary()
                self.finish(result)
        if self.status == "failed":  # the checkpoint or summary at the end ran out of space
            raise RunError(self.error or "failed")
        if self.status == "diverged" and t.on_nonfinite == OnNonfinite["raise"]:
            nf = result["nonfinite"]
            raise NonFiniteError(
                f"non-finite loss or gradient at step {nf['step']} (layer {nf['layer']})"
            )
        print_summary(result, self.console)
        file_log.info(status_line(result))
        return result

    def loop(self) -> None:
        t = self.cfg.trainer
        for step in range(self.step, t.steps):
            if self.stop_requested(step):
                break
            plan = StepPlan.of(step, t)
            probes = [p for p in self.probes if p.active(plan)]
            x, y = self.data.batch(t.batch_size, self.batches)
            with hooks(probes):
                loss, out = self.forward(x, y)
                if self.guard.previous_step_bad(step, loss):
                    return self.diverged()
                self.backward(loss)
            ctx = self.context(step, plan, loss, out, y)
            stats = collect(probes, "after_backward", ctx)
            ctx.clip = self.clipper(measure=plan.log)
            stats |= collect(probes, "after_clip", ctx)
            decision = self.guard.decide(step, loss, ctx.grad_sq, plan.log)
            if decision != Decision.ok:
                if plan.log:  # show the bad step rather than leave a gap
                    self.record(step, plan, probes, stats)
                if decision == Decision.stop:
                    return self.diverged()
                self.optimizer.zero_grad(set_to_none=True)  # skip: no update
                self.step = step + 1
                continue
            stats |= collect(probes, "before_update", ctx)
            self.update(x, y)
            self.step = step + 1
            stats |= collect(probes, "after_update", ctx)
            if plan.log:
                self.record(step, plan, probes, stats)
            if plan.checkpoint:
                self.save()

    def stop_requested(self, step: int) -> bool:
        signum = self.stopper.signum
        if signum is None and not (self.sweep_stop is not None and self.sweep_stop.exists()):
            return False
        self.status = "interrupted"
        why = f"signal {signum}" if signum else "the sweep was stopped"
        file_log.info("%s: stopping before step %d", why, step)
        return True

    def amp(self) -> contextlib.AbstractContextManager:
        enabled = self.cfg.trainer.amp != Amp.off
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.amp():
            out = self.model(x)
            loss = self.data.loss(out.float(), y)
        return loss, out

    def objective(self, loss: torch.Tensor) -> torch.Tensor:
        """What training minimizes: the loss, and optim.l1 times sum |w|."""
        l1 = self.cfg.optim.l1
        return loss + l1 * sum(w.abs().sum() for w in self.l1_weights) if l1 else loss

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """The objective's gradients into .grad (unscaled); returns the objective."""
        total = self.objective(loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)  # a no-op without fp16: probes see true gradients
        return total.detach()

    def context(
        self, step: int, plan: StepPlan, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor
    ) -> StepContext:
        # Gradient norms on log steps (and every step when the guard judges each update
        # on them); a step that does not log only checks its loss.
        grads = self.layers.grads() if plan.log or self.guard.needs_grad_norms else []
        grad_sq = self.layers.layer_sq_norms(grads) if grads else None
        lr = self.optimizer.param_groups[0]["lr"]
        return StepContext(step, plan, loss.detach(), out.detach(), y, grads, grad_sq, lr)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The optimizer step; an optimizer that re-evaluates the loss (``needs_closure``,
        or torch's LBFGS) gets a closure that recomputes loss and gradients at the
        current parameters, and Hessian-free the network on its curvature batch too."""
        if isinstance(self.optimizer, HessianFree):  # no scaler: AMP is refused with it
            with batch_statistics(self.model):  # updated once, by the step's forward pass
                self.optimizer.step(self.closure(x, y), self.curvature(x, y))
        elif getattr(
            self.optimizer, "needs_closure", isinstance(self.optimizer, torch.optim.LBFGS)
        ):
            self.scaler.step(self.optimizer, self.closure(x, y))
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def closure(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The objective (the loss and its L1 term) at the current parameters, and its
        gradients; with gradients disabled (a line search's trial), the objective alone."""

        def closure() -> torch.Tensor:
            loss, _ = self.forward(x, y)
            if not torch.is_grad_enabled():
                return self.objective(loss).detach()
            return self.backward(loss)

        return closure

    def curvature(self, x: torch.Tensor, y: torch.Tensor) -> Curvature:
        """optim=hessian_free: the network on the curvature batch (the batch's first
        ``optim.curvature_batch`` examples), with the recurrent layers' hidden states for
        structural damping, and per-example gradients for the preconditioner."""
        hf, spec = self.cfg.optim, self.data.spec
        k = hf.curvature_batch or len(x)
        return model_curvature(
            self.model,
            self.layers.params,
            x[:k],
            classes=None if spec.regression else spec.num_classes,
            states=hf.structural_damping > 0,
            per_example=(x, y, self.data.loss) if hf.precondition else None,
        )

    def diverged(self) -> None:
        nonfinite = self.guard.nonfinite
        assert nonfinite is not None
        self.step, self.status = nonfinite["step"], "diverged"

    def record(self, step: int, plan: StepPlan, probes: list[Probe], stats: dict) -> None:
        """A logging step: its values to the host in one transfer, into one record, to
        TensorBoard, the progress line, and the figure when due."""
        host = to_host(stats)
        rec = StepRecord(step)
        for probe in probes:
            probe.read(host, rec)
        self.history.append(rec)
        self.logger.scalars(self.tags.values(rec), step)
        for tag, hist in self.tags.histograms(rec):
            self.logger.histogram(tag, hist, step)
        if "perf/steps_per_s" in rec.scalars:
            grad = rec.scalars.get("grad/norm_pre_clip", math.nan)
            self.progress.update(
                step, rec.scalars["loss/train"], grad, rec.scalars["perf/steps_per_s"]
            )
        if plan.figure and (fig := self.figure(step)) is not None:
            self.logger.image("flow/gradient_flow", figures.to_image(fig), step)
        if self.theory is not None and not self.theory_logged:  # the first log step: step 0
            first = self.history.records[0]
            table = theory_markdown(self.layers.names, self.theory, first)
            self.logger.text("theory/vs_measured", table, first.step)
            self.theory_logged = True

    def fold_batchnorm(self) -> dict[str, Any] | None:
        """norm=batch, once trained: fold each BatchNorm into the layer before it and
        measure the folded model (see gradexp.fold.fold_report); logged at the last step."""
        if self.cfg.norm.name != "batch" or self.status != "completed":
            return None
        from gradexp.fold import fold_report

        def evaluate_folded(model: torch.nn.Module) -> tuple[float, float]:
            loss, acc = evaluate(model, self.data, self.amp).tolist()
            return loss, acc

        report = fold_report(self.model, self.data.x_test, evaluate_folded)
        if report is not None:
            scalars = {f"fold/{k.replace('/', '_')}": float(v) for k, v in report.items()}
            scalars = {k: v for k, v in scalars.items() if not math.isnan(v)}
            self.logger.scalars(scalars, max(self.step - 1, 0))
        return report

    # --- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on (see gradexp.checkpoint)."""
        device = self.device
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": flat(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "batches": self.batches.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "history": self.history.state_dict(),
            "guard": self.guard.state_dict(),
            "probes": {p.name: p.state_dict() for p in self.probes},
            "theory": self.theory,
            "jacobian": self.jacobian,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.batches.set_state(state["batches"].to(self.batches.get_state().device))
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.history.load_state_dict(state["history"])
        self.guard.load_state_dict(state["guard"])
        for probe in self.probes:
            probe.load_state_dict(state["probes"].get(probe.name, {}), self.device)
        self.theory, self.jacobian = state["theory"], state["jacobian"]

    def save(self) -> None:
        save_checkpoint(self.checkpoint, self.state_dict())

    # --- the end -----------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        wall = self.loop_time or time.perf_counter() - self.start
        health = next((p for p in self.probes if isinstance(p, ActivationHealthProbe)), None)
        hf = next((p for p in self.probes if isinstance(p, HessianFreeProbe)), None)
        dead = health.result() if health else [None] * len(self.layers)
        summarized = [q for q in self.quantities if q.kind == "layer" and q.summary]
        per_layer = self.history.layer_summary(summarized)
        for entry, layer_dead in zip(per_layer, dead):
            entry["dead_units"] = layer_dead
        nonfinite = self.guard.first()
        verdicts = judge(
            self.layers.names,
            self.history.records,
            self.cfg.diagnose,
            nonfinite=nonfinite,
            skipped=self.guard.skipped,
            dead=dead,
            tbptt=self.cfg.trainer.tbptt,
            sizes=self.layers.sizes(),
            # A model may say which layers form its depth (a recurrent net: its stack).
            stack=getattr(self.model, "depth_stack", lambda: None)(),
        )
        finals = {k: self.history.final(k) for k in self.tags.metric_tags()}
        cfg = self.cfg
        return {
            "status": self.status,
            "error": self.error,
            "steps": self.step,
            # Each group's option as resolved (an alias such as init=xavier shows its option).
            "options": {g: getattr(cfg, g).name for g in OPTION_GROUPS},
            "verdicts": verdicts,
            # Learned or not, beside the verdicts: "vanishing, but learned".
            "outcome": outcome(finals, cfg.diagnose, self.data.chance),
            "metrics": {k: v for k, v in finals.items() if v is not None},
            "layers": per_layer,
            "time": self.history.time_summary(),
            "theory": self.theory,
            "jacobian": self.jacobian,
            "nonfinite": nonfinite,
            "skipped_steps": self.guard.skipped,
            "wall_time_s": round(wall, 3),
            "steps_per_s": round(self.step / wall, 2) if wall > 0 else None,
            "device": str(self.device),
            "fold": self.fold,
            "hessian_free": hf.result() if hf else None,
            "notes": self.notes,
        }

    def draw(self, step: int | None = None, judged: list[dict[str, Any]] | None = None) -> Any:
        """The gradient-flow figure of the logging steps so far (None: nothing to draw),
        titled with the verdicts at the end."""
        records = self.history.records
        if self.figure_missing or not records:
            return None
        cfg = self.cfg
        step = records[-1].step if step is None else step
        title = (
            f"{cfg.model.name}, {cfg.activation.name}, init={cfg.init.name},"
            f" norm={cfg.norm.name}, clip={cfg.clip.name}: step {step}"
        )
        if judged:
            title += "; " + ", ".join(dict.fromkeys(v["kind"] for v in judged))
        # Where and until when, in words: "hidden.0-hidden.7 below 1% of the head's ...".
        if headline := where_and_when(self.layers.names, records, cfg.diagnose):
            title += "\n" + headline
        diagnose = cfg.diagnose
        return figures.flow_figure(
            self.layers.names,
            records,
            self.theory,
            title,
            verdicts=judged or (),
            thresholds=(diagnose.vanishing_ratio, diagnose.exploding_ratio),
        )

    def no_figures(self) -> None:
        """matplotlib is missing (or cannot be imported): say so once, go on without."""
        self.figure_missing = figures.MISSING
        self.console.print(
            f"note: {self.figure_missing}; the run goes on without it",
            markup=False,
            highlight=False,
        )
        self.logger.text("run/notes", self.figure_missing, self.step)

    def figure(self, step: int | None = None, judged: list[dict[str, Any]] | None = None) -> Any:
        """``draw``, or None when matplotlib turns out not to import."""
        try:
            return self.draw(step, judged)
        except ImportError:
            self.no_figures()
            return None

    def finish(self, result: dict[str, Any]) -> None:
        """Write hparams, verdicts, the figure and summary.json, close TensorBoard: on
        every way out of a run. A full disk on the way fails the run (``result`` says so)
        but not its summary: the last checkpoint is kept and the run can be resumed."""
        try:
            self.write_views(result)
        except Exception as e:
            if (
                error := as_run_error(e, self.output_dir, "writing the TensorBoard events")
            ) is None:
                raise
            if result["status"] != "failed":
                self.status, self.error = "failed", str(error)
                result.update(status="failed", error=str(error))
        finally:
            self.write_summary(result)

    def write_views(self, result: dict[str, Any]) -> None:
        """hparams, verdicts and the figure to TensorBoard (and the figure's PNG)."""
        try:
            metric_tags = self.tags.metric_tags()
            hparams = run_hparams(
                self.cfg, result["status"], result["verdicts"], result.get("outcome")
            )
            self.logger.hparams(hparams, metric_tags)
            # What the HParams tab reads as each metric: finite, the same tags in every run.
            self.logger.scalars(hparams_metrics(result["metrics"], metric_tags), result["steps"])
            verdicts = verdict_markdown(result["verdicts"], result.get("outcome"))
            self.logger.text("run/verdicts", verdicts, result["steps"])
            self.logger.text("run/summary", summary_markdown(result), result["steps"])
            log_data(self.logger, SUMMARY_DATA, result, result["steps"])  # the gradexp tab's
            try:
                fig = self.figure(judged=result["verdicts"])
                if fig is not None:
                    image = figures.save_png(fig, self.output_dir / FIGURE_FILE)
                    self.logger.image("flow/gradient_flow", image, result["steps"])
            except Exception as e:  # the figure is a view of the run, never worth losing it
                if disk_full(e):
                    raise
                log.warning("the gradient-flow figure failed: %s: %s", type(e).__name__, e)
        finally:
            self.logger.close()

    def write_summary(self, result: dict[str, Any]) -> None:
        """summary.json, whole; on a full disk, into the space held back since the start
        (rundir.reserve_space), else the few bytes that say what happened."""
        path = self.output_dir / SUMMARY_FILE
        free_reserve(self.output_dir)  # the last write of the run: the held-back room is for it
        try:
            write_text_atomic(path, summary_text(result))
        except OSError as e:
            if not disk_full(e):
                raise
            error = str(disk_full_error(self.output_dir, f"writing {SUMMARY_FILE}"))
            self.status, self.error = "failed", error
            short = {**minimal_summary("failed", error), "steps": result["steps"]}
            try:
                write_text_atomic(path, summary_text(short))
            except OSError:
                file_log.warning("%s: not written (%s)", path, error)


def run(
    cfg: Config,
    output_dir: Path,
    logger: MetricLogger | None = None,
    console: Console | None = None,
    probes: list[Probe] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` and write its TensorBoard run and summary.json into ``output_dir``;
    return the summary (see Trainer)."""
    try:
        trainer = Trainer(cfg, output_dir, logger, console, probes)
    except Exception as e:
        free_reserve(Path(output_dir))  # the run never began: nothing to hold room for
        if (error := as_run_error(e, Path(output_dir), "while building the run")) is None:
            raise
        raise error from e
    return trainer.train()


def initial_theory(cfg: Config, data: Dataset, logger: MetricLogger) -> dict[str, Any] | None:
    """The mean-field prediction for this net at init (MLPs without norm), logged as text."""
    try:
        theory = mean_field(
            cfg,
            float(data.x_train.square().mean(dtype=torch.float64)),
            math.prod(data.spec.input_shape),
            data.spec.out_features,
        )
    except TheoryUnavailable as e:
        logger.text("theory/mean_field", f"not available: {e}", 0)
        return None
    logger.scalars({f"theory/{k}": theory[k] for k in ("signal_fwd_ratio", "signal_bwd_ratio")}, 0)
    return theory


def initial_jacobian(
    cfg: Config, model: torch.nn.Module, data: Dataset, logger: MetricLogger
) -> dict[str, Any] | None:
    """diagnose.jacobian: singular values of the input-output Jacobian at init."""
    if not cfg.diagnose.jacobian:
        return None
    spectrum = jacobian_spectrum(model, data.x_train[:64])
    logger.scalars({f"jacobian/sv_{k}": spectrum[k] for k in ("mean", "std", "min", "max")}, 0)
    return spectrum
