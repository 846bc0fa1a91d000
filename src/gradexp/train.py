"""The one training loop: ``run(cfg, output_dir) -> summary``.

Per step: forward, backward, (AMP unscale), gradient statistics before
clipping, clip, statistics after clipping, finite check, optimizer step.
Statistics stay on the device; a logging step brings them to the host in one
transfer, and a step that does not log never waits for the device (on CUDA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from gradexp import figures
from gradexp.checkpoint import CHECKPOINT_FILE, StopOnSignal, resume_state, sweep_stop_file
from gradexp.checkpoint import save as save_checkpoint
from gradexp.clipping import Clipper
from gradexp.config import Amp, Config, OnNonfinite, flat
from gradexp.data import Dataset, load_data
from gradexp.device import check_writable, resolve_device
from gradexp.display import ProgressReporter, print_summary, status_line
from gradexp.init import init_weights, weights_and_biases
from gradexp.metrics import MetricLogger, TensorBoardLogger
from gradexp.models import create_model
from gradexp.optim import create_optimizer, create_scheduler, momentum_buffers
from gradexp.rundir import FIGURE_FILE, SUMMARY_FILE, record_failure  # noqa: F401
from gradexp.telemetry import (
    ActivationProbe,
    DeadUnits,
    LayerMap,
    SignalProbe,
    TimeProbe,
    activation_modules,
    health_quantities,
    histogram_from_stats,
    histogram_stats,
)
from gradexp.theory import TheoryUnavailable, jacobian_spectrum, mean_field
from gradexp.verdicts import KINDS, Record, describe, judge

log = logging.getLogger(__name__)
# The run's own log file (train.log) only: the terminal already shows the table and status.
file_log = logging.getLogger("gradexp.runlog")

PER_LAYER = ("grad_norm", "signal_bwd", "signal_fwd")
ACTIVATION_HEALTH = ("act_mean", "act_std", "sat_frac", "dead_frac")
# Per-layer quantities not every layer has: NaN values are not logged.
SPARSE = ("clip_frac", *ACTIVATION_HEALTH)
# Scalars whose final values go into summary.json and the HParams tab.
FINAL_METRICS = (
    "loss/train",
    "loss/baseline",
    "acc/train",
    "loss/test",
    "acc/test",
    "flow/grad_norm_ratio",
    "flow/signal_bwd_ratio",
    "flow/time_grad_ratio",
)


class NonFiniteError(RuntimeError):
    """on_nonfinite=raise: a loss or gradient went non-finite."""


def custom_scalars_layout(
    time_tags: list[str] | None = None, health: list[str] | None = None
) -> dict[str, Any]:
    """TensorBoard's Custom Scalars tab: every layer of a quantity on one chart, and for a
    recurrent layer every logged time step's gradient on one chart.

    ``health``: the activation-health quantities the run has (telemetry.health_quantities).
    """

    def chart(tag: str) -> list[Any]:
        return ["Multiline", [rf"^{tag}/\d+_"]]

    titles = {
        "sat_frac": "saturated share of units per layer (sigmoid, tanh)",
        "dead_frac": "dead units per layer",
        "act_mean": "activation mean per layer",
        "act_std": "activation std per layer",
    }
    health_charts = {titles[key]: chart(key) for key in health or []}
    through_time = {
        f"||dL/dh_t|| per time step, {tag}": ["Multiline", [rf"^time_grad/{re.escape(tag)}/"]]
        for tag in time_tags or []
    }
    return {
        **({"gradient through time": through_time} if through_time else {}),
        "task": {
            "loss (train, test) and the input-blind baseline": ["Multiline", [r"^loss/"]],
            "accuracy (train, test)": ["Multiline", [r"^acc/"]],
        },
        "gradient flow": {
            "gradient norm per layer": chart("grad_norm"),
            "backward signal per layer": chart("signal_bwd"),
            "forward signal per layer": chart("signal_fwd"),
            "update/weight ratio per layer": chart("update_ratio"),
            "weight norm per layer": chart("weight_norm"),
        },
        **({"activation health": health_charts} if health_charts else {}),
        "clipping": {
            "total gradient norm": ["Multiline", [r"^grad/norm_"]],
            "AGC clipped units per layer": chart("clip_frac"),
        },
    }


def hparams_of(cfg: Config) -> dict[str, Any]:
    """The run's choices for TensorBoard's HParams tab: every group, the model's sizes."""
    model = {
        key: str(list(value)) if isinstance(value, list) else value
        for key, value in vars(cfg.model).items()
        if key != "name"
    }
    return {
        "model": cfg.model.name,
        **model,
        "data": cfg.data.name,
        "activation": cfg.activation.name,
        "init": cfg.init.name,
        "norm": cfg.norm.name,
        "clip": cfg.clip.name,
        "optim": cfg.optim.name,
        "lr": cfg.optim.lr,
        "batch_size": cfg.trainer.batch_size,
        "tbptt": cfg.trainer.tbptt,
        "seed": cfg.seed,
    }


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


class History:
    """The first and last logged value of each per-layer quantity, for summary.json."""

    def __init__(self, tags: list[str]) -> None:
        self.tags = tags
        self.first: dict[str, list[float]] = {}
        self.last: dict[str, list[float]] = {}
        # Recurrent layers: the time steps whose gradient is logged (values as "time:<tag>").
        self.time_steps: dict[str, list[int]] = {}
        # Every logging step, for the verdicts and the gradient-flow figure.
        self.records: list[Record] = []

    def time(self) -> list[dict[str, Any]]:
        """The gradient that reached each logged time step, per recurrent layer."""
        out = []
        for tag, steps in self.time_steps.items():
            first, last = self.first[f"time:{tag}"], self.last[f"time:{tag}"]
            out.append(
                {
                    "layer": tag.split("_", 1)[1],
                    "steps": steps,
                    "grad_norm": {"first": first, "last": last},
                    "ratio": {"first": _ratio(first), "last": _ratio(last)},
                }
            )
        return out

    def add(self, key: str, values: list[float]) -> None:
        self.first.setdefault(key, values)
        self.last[key] = values

    def layers(self) -> list[dict[str, Any]]:
        def pick(store: dict[str, list[float]], key: str, i: int) -> float | None:
            v = store.get(key)
            return None if v is None or math.isnan(v[i]) else v[i]

        out = []
        for i, tag in enumerate(self.tags):
            entry: dict[str, Any] = {"index": i, "name": tag.split("_", 1)[1]}
            for key in (*PER_LAYER, "weight_norm", "update_ratio", *ACTIVATION_HEALTH):
                entry[key] = {"first": pick(self.first, key, i), "last": pick(self.last, key, i)}
            out.append(entry)
        return out

    def names(self) -> list[str]:
        return [tag.split("_", 1)[1] for tag in self.tags]

    def state(self) -> dict[str, Any]:
        """For a checkpoint: plain containers only."""
        records = [dataclasses.asdict(r) for r in self.records]
        return {"first": self.first, "last": self.last, "time_steps": self.time_steps,
                "records": records}  # fmt: skip

    def load_state(self, state: dict[str, Any]) -> None:
        self.first, self.last = state["first"], state["last"]
        self.time_steps = state["time_steps"]
        self.records = [Record(**r) for r in state["records"]]


def _ratio(values: list[float]) -> float:
    return values[0] / values[-1] if values[-1] else math.nan


def run(
    cfg: Config,
    output_dir: Path,
    logger: MetricLogger | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` and write its TensorBoard run and summary.json into ``output_dir``.

    Returns the summary (also written to ``output_dir/summary.json``). A run that
    goes non-finite with on_nonfinite=stop ends with status ``diverged``: in this
    tool divergence is a result, not an error.
    """
    t = cfg.trainer
    device = resolve_device(t.device)
    output_dir = Path(output_dir)
    check_writable(output_dir)
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: wide enough for the per-layer table
            console = Console(width=max(console.width, 120))
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)

    data: Dataset = load_data(cfg.data, device)
    model = create_model(cfg, data.spec).to(device)
    notes = init_weights(model, cfg.init, cfg.activation)
    layers = LayerMap.of(model)
    # Recurrent layers unrolled in Python report the gradient reaching each time step.
    traced = [(tag, m) for tag, m in zip(layers.tags, layers.modules) if getattr(m, "traceable", 0)]
    acts = activation_modules(layers.modules)
    dead_units = DeadUnits(acts, len(layers), cfg.diagnose.sustain)
    optimizer = create_optimizer(cfg.optim, layers.params)
    scheduler = create_scheduler(cfg.optim, optimizer, t.steps)
    clipper = Clipper(cfg.clip, layers.params, layers.param_names, layers.layer_of, len(layers))
    use_amp = t.amp != Amp.off
    amp_dtype = torch.bfloat16 if t.amp == Amp.bf16 else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp == Amp.fp16)

    def amp() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp)

    # L1 acts on the Linear/Conv/RNN weights only, not on norm gains or PReLU slopes.
    weights = [w for _, ws, _ in weights_and_biases(model) for w in ws]
    batches = torch.Generator(device=device).manual_seed(cfg.seed)
    checkpoint = output_dir / CHECKPOINT_FILE
    resumed = resume_state(checkpoint, cfg) if t.resume else None
    start_step = resumed["step"] if resumed else 0
    if logger is None:
        layout = custom_scalars_layout([tag for tag, _ in traced], health_quantities(acts))
        # Resuming: TensorBoard drops what the first writer logged from start_step on.
        logger = TensorBoardLogger(output_dir, layout, purge_step=start_step or None)
    for note in notes if not resumed else []:
        logger.text("run/notes", note, 0)
    theory: dict[str, Any] | None = None
    jacobian: dict[str, Any] | None = None
    theory_logged = False
    figure_missing = figures.missing_dependency()
    if figure_missing:
        console.print(
            f"note: {figure_missing}; the run goes on without it", markup=False, highlight=False
        )
        logger.text("run/notes", figure_missing, 0)

    def draw(step: int | None = None, judged: list[dict[str, Any]] | None = None) -> Any:
        """The gradient-flow figure of the logging steps so far (None: nothing to draw),
        titled with the verdicts at the end."""
        if figure_missing or not history.records:
            return None
        step = history.records[-1].step if step is None else step
        title = (
            f"{cfg.model.name}, {cfg.activation.name}, init={cfg.init.name},"
            f" norm={cfg.norm.name}, clip={cfg.clip.name}: step {step}"
        )
        if judged:
            title += "; " + ", ".join(dict.fromkeys(v["kind"] for v in judged))
        snapshots = [
            figures.FlowSnapshot(r.step, r.grad_norm, r.signal_bwd, r.signal_fwd, r.time)
            for r in history.records
        ]
        return figures.flow_figure(history.names(), snapshots, theory, title)

    file_log.info("start: %s on %s, writing to %s", hparams_of(cfg), device, output_dir)
    history = History(layers.tags)
    # The final metrics this run can have, for the HParams tab (no accuracy for a
    # regression task, no time ratio without an unrolled recurrent layer).
    metric_tags = [
        k
        for k in FINAL_METRICS
        if not (k.startswith("acc/") and data.spec.regression)
        and not (k == "flow/time_grad_ratio" and not traced)
    ]
    last: dict[str, float] = {}
    # Non-finite bookkeeping lives on the device so that steps need not synchronize:
    # the first bad step, and which layers' gradients were non-finite then.
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    first_bad_layers = torch.zeros(len(layers), dtype=torch.bool, device=device)
    # CPU "synchronization" is free, so check every step there; on CUDA only when
    # logging (on_nonfinite=skip must decide every step, as GradScaler does).
    skip_mode = t.on_nonfinite == OnNonfinite.skip
    check_every_step = device.type != "cuda" or skip_mode
    nonfinite: dict[str, Any] | None = None
    grads_checked = True  # whether the last step's gradients went through the finite check
    snapshot: list[torch.Tensor] | None = None
    momentum_sgd = momentum_buffers(optimizer, layers.params) is not None
    skipped = 0
    status, error, steps_done = "completed", None, start_step
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        history.load_state(resumed["history"])
        dead_units.load_state(resumed["dead_units"], device)
        last.update(resumed["last"])
        first_bad_step = resumed["first_bad_step"].to(device)
        first_bad_layers = resumed["first_bad_layers"].to(device)
        grads_checked, skipped = resumed["grads_checked"], resumed["skipped"]
        theory, jacobian = resumed["theory"], resumed["jacobian"]
        theory_logged = True
        batches.set_state(resumed["batches"].to(batches.get_state().device))
        torch.set_rng_state(resumed["torch_rng"])
        if resumed["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(resumed["cuda_rng"], device)
        file_log.info("resumed at step %d from %s", start_step, checkpoint)

    def checkpoint_state() -> dict[str, Any]:
        """Everything the next step depends on (see gradexp.checkpoint)."""
        return {
            "step": steps_done,
            "config": flat(cfg),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "batches": batches.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "history": history.state(),
            "dead_units": dead_units.state(),
            "last": dict(last),
            "first_bad_step": first_bad_step,
            "first_bad_layers": first_bad_layers,
            "grads_checked": grads_checked,
            "skipped": skipped,
            "theory": theory,
            "jacobian": jacobian,
        }

    progress = ProgressReporter(t.progress, t.steps, console)
    start = time.perf_counter()
    log_time, log_step = start, start_step - 1

    def summary() -> dict[str, Any]:
        wall = time.perf_counter() - start
        first = nonfinite
        if first is None and int(first_bad_step) >= 0:  # skipped steps: checked every step
            first = locate_nonfinite(layers, int(first_bad_step), first_bad_layers)
        dead = dead_units.result()
        per_layer = history.layers()
        for entry, layer_dead in zip(per_layer, dead):
            entry["dead_units"] = layer_dead
        verdicts = judge(
            history.names(),
            history.records,
            cfg.diagnose,
            nonfinite=first,
            skipped=skipped,
            dead=dead,
            tbptt=t.tbptt,
        )
        return {
            "status": status,
            "error": error,
            "steps": steps_done,
            "verdicts": verdicts,
            "metrics": {k: last[k] for k in FINAL_METRICS if k in last},
            "layers": per_layer,
            "time": history.time(),
            "theory": theory,
            "jacobian": jacobian,
            "nonfinite": first,
            "skipped_steps": skipped,
            "wall_time_s": round(wall, 3),
            "steps_per_s": round(steps_done / wall, 2) if wall > 0 else None,
            "device": str(device),
            "notes": notes,
        }

    # Between two steps the state is whole: a signal stops the loop there (and is saved).
    stopper = StopOnSignal().__enter__()
    sweep_stop = sweep_stop_file()  # a sweep's driver stops its jobs through this file
    consistent = True
    try:
        if not resumed:
            theory = initial_theory(cfg, data, logger)
            jacobian = initial_jacobian(cfg, model, data, logger)
        for step in range(start_step, t.steps):
            if stopper.signum is not None or (sweep_stop is not None and sweep_stop.exists()):
                status = "interrupted"
                why = f"signal {stopper.signum}" if stopper.signum else "the sweep was stopped"
                file_log.info("%s: stopping before step %d", why, step)
                break
            final = step == t.steps - 1
            hist_now = step % t.hist_every == 0
            eval_now = step % t.eval_every == 0 or final
            figure_now = bool(t.figure_every) and step % t.figure_every == 0 and not final
            # Histograms, evaluations and figures ride on log steps: they need the statistics.
            log_now = step % t.log_every == 0 or hist_now or eval_now or figure_now or final
            x, y = data.batch(t.batch_size, batches)
            probe = SignalProbe(layers.modules) if log_now else contextlib.nullcontext()
            time_probe = (
                TimeProbe([m for _, m in traced], t.time_samples)
                if log_now and traced
                else contextlib.nullcontext()
            )
            act_probe = ActivationProbe(acts, len(layers)) if log_now else contextlib.nullcontext()
            with probe, time_probe, act_probe:
                with amp():
                    out = model(x)
                    loss = data.loss(out.float(), y)
                if check_every_step and not grads_checked and bool(~torch.isfinite(loss.detach())):
                    # p.grad still holds the previous, unchecked step's gradients: if they
                    # were non-finite, that step came first (as a per-step check would say).
                    prev_bad = ~torch.isfinite(layers.layer_sq_norms(layers.grads()))
                    if not scaler.is_enabled() and bool(prev_bad.any()):
                        nonfinite = locate_nonfinite(layers, step - 1, prev_bad)
                        steps_done, status = step - 1, "diverged"
                        break
                total_loss = loss
                if cfg.optim.l1:
                    total_loss = loss + cfg.optim.l1 * sum(w.abs().sum() for w in weights)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total_loss).backward()
            scaler.unscale_(optimizer)  # a no-op without fp16: statistics see true gradients

            grads = layers.grads()
            # Gradient norms on log steps (and every step for on_nonfinite=skip, which must
            # judge each update); a step that does not log only checks its loss.
            pre_sq = layers.layer_sq_norms(grads) if log_now or skip_mode else None
            stats: dict[str, torch.Tensor] = {}
            if log_now:
                fwd, bwd = probe.result(device)
                if scaler.is_enabled():
                    bwd = bwd / scaler.get_scale()  # tensor hooks saw the scaled loss
                stats.update(act_probe.result(device))
                dead_units.update(act_probe.dead_masks())
                stats.update(
                    loss=loss.detach(),
                    baseline=torch.tensor(data.baseline, device=device),
                    grad_norm=pre_sq.sqrt(),
                    signal_fwd=fwd,
                    signal_bwd=bwd,
                    total_pre=pre_sq.sum().sqrt(),
                    weight_sq=layers.layer_sq_norms([p.detach() for p in layers.params]),
                )
                if traced:
                    for (tag, _), (steps, norms) in zip(traced, time_probe.result()):
                        stats[f"time:{tag}"] = norms
                        history.time_steps[tag] = steps
                hits = data.correct(out.detach(), y)
                if hits is not None:
                    stats["acc"] = hits / y.numel()
                if t.per_param:
                    stats["param_norm"] = torch.stack(torch._foreach_norm(grads))
                if hist_now:
                    for tag, g in zip(layers.tags, _layer_grads(layers, grads)):
                        stats[f"hist:{tag}"] = histogram_stats(g)
            clip_stats = clipper(measure=log_now)
            if log_now and cfg.clip.name != "none":
                post_sq = layers.layer_sq_norms(layers.grads())
                stats.update(grad_norm_clipped=post_sq.sqrt(), total_post=post_sq.sum().sqrt())
                stats.update({f"clip:{k}": v for k, v in clip_stats.items()})

            # Finite check, on the device. With fp16 the scaler owns gradient overflow (it
            # skips the step and lowers the scale); otherwise non-finite gradients diverge.
            bad = ~torch.isfinite(loss.detach())
            grads_checked = pre_sq is not None and not scaler.is_enabled()
            if grads_checked:
                layer_bad = ~torch.isfinite(pre_sq)
                bad = bad | layer_bad.any()
            newly = bad & (first_bad_step < 0)
            first_bad_step = torch.where(newly, step, first_bad_step)
            if grads_checked:
                first_bad_layers = torch.where(newly, layer_bad, first_bad_layers)
            if (check_every_step or log_now) and bool(first_bad_step >= 0):
                if skip_mode:
                    if bool(bad):
                        skipped += 1
                        if log_now:  # show the bad step rather than leave a gap
                            _log_step(logger, layers, stats, step, last, history, optimizer, scaler)
                        optimizer.zero_grad(set_to_none=True)
                        steps_done = step + 1
                        continue
                else:
                    nonfinite = locate_nonfinite(layers, int(first_bad_step), first_bad_layers)
                    steps_done = nonfinite["step"]
                    status = "diverged"
                    if log_now:
                        _log_step(logger, layers, stats, step, last, history, optimizer, scaler)
                    break

            # Parameters before the step, for the update ratio (not needed for heavy-ball
            # SGD, whose update is -lr * momentum buffer; a skipping fp16 scaler breaks that).
            read_buffers = log_now and momentum_sgd and not scaler.is_enabled()
            if log_now and not read_buffers:
                if snapshot is None:
                    snapshot = [p.detach().clone() for p in layers.params]
                else:
                    torch._foreach_copy_(snapshot, [p.detach() for p in layers.params])
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            steps_done = step + 1

            if log_now:
                if read_buffers:
                    buffers = momentum_buffers(optimizer, layers.params)
                    stats["update_sq"] = layers.layer_sq_norms(buffers) * lr**2
                else:
                    torch._foreach_sub_(snapshot, [p.detach() for p in layers.params])
                    stats["update_sq"] = layers.layer_sq_norms(snapshot)
                if eval_now:
                    stats["test"] = evaluate(model, data, amp)
                now = time.perf_counter()
                rate = (step - log_step) / max(now - log_time, 1e-9)
                log_time, log_step = now, step
                values = _log_step(
                    logger,
                    layers,
                    stats,
                    step,
                    last,
                    history,
                    optimizer,
                    scaler,
                    {"perf/steps_per_s": rate},
                )
                progress.update(step, values["loss/train"], values["grad/norm_pre_clip"], rate)
                if figure_now and (fig := draw(step)) is not None:
                    logger.image("flow/gradient_flow", figures.to_image(fig), step)
                if theory is not None and not theory_logged:  # the first log step: step 0
                    first = history.records[0]
                    table = theory_markdown(history.names(), theory, first)
                    logger.text("theory/vs_measured", table, first.step)
                    theory_logged = True
            if t.checkpoint_every and steps_done % t.checkpoint_every == 0:
                save_checkpoint(checkpoint, checkpoint_state())
    except KeyboardInterrupt:  # a second Ctrl-C: mid-step, nothing consistent to save
        status, consistent = "interrupted", False
    except Exception as e:
        status, error, consistent = "failed", f"{type(e).__name__}: {e}", False
        raise
    except BaseException:  # SystemExit mid-step (a launcher's signal handler): not whole
        status, consistent = "interrupted", False
        raise
    finally:
        stopper.__exit__()
        progress.close()
        if consistent:
            save_checkpoint(checkpoint, checkpoint_state())
        result = summary()
        _finish(logger, cfg, result, output_dir, metric_tags, draw)
    if status == "diverged" and t.on_nonfinite.name == "raise":
        nf = result["nonfinite"]
        raise NonFiniteError(
            f"non-finite loss or gradient at step {nf['step']} (layer {nf['layer']})"
        )
    print_summary(result, console)
    file_log.info(status_line(result))
    return result


def locate_nonfinite(layers: LayerMap, step: int, bad_layers: torch.Tensor) -> dict[str, Any]:
    """Step and layer of the first non-finite gradient, once a check has found one.

    Backprop runs output -> input, so the bad layer nearest the output is where the
    non-finite value was produced. When only the loss was checked at ``step`` (no
    per-layer record), the layers are read from the gradients present now.
    """
    hit = bad_layers.nonzero().flatten().tolist()
    if not hit:
        grads = layers.layer_sq_norms(layers.grads())
        hit = (~torch.isfinite(grads)).nonzero().flatten().tolist()
    layer = layers.tags[max(hit)].split("_", 1)[1] if hit else None
    return {"step": step, "layer": layer}


def _layer_grads(layers: LayerMap, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    per_layer: list[list[torch.Tensor]] = [[] for _ in layers.tags]
    for i, g in zip(layers.layer_of, grads):
        per_layer[i].append(g.detach().flatten())
    empty = grads[0].new_zeros(0) if grads else torch.zeros(0)
    return [torch.cat(gs) if gs else empty for gs in per_layer]


def _log_step(
    logger: MetricLogger,
    layers: LayerMap,
    stats: dict[str, torch.Tensor],
    step: int,
    last: dict[str, float],
    history: History,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scalars: dict[str, float] | None = None,
) -> dict[str, float]:
    """Bring one logging step's statistics to the host in one transfer and log them."""
    keys = list(stats)
    # float64: tiny squared norms (a vanished gradient) are not representable in float32.
    values = torch.cat([stats[k].detach().double().flatten() for k in keys]).tolist()
    host: dict[str, list[float]] = {}
    offset = 0
    for k in keys:
        n = stats[k].numel()
        host[k] = values[offset : offset + n]
        offset += n

    weight = [math.sqrt(v) for v in host["weight_sq"]]
    per_layer = {
        "grad_norm": host["grad_norm"],
        "signal_bwd": host["signal_bwd"],
        "signal_fwd": host["signal_fwd"],
        "weight_norm": weight,
    }
    if "update_sq" in host:
        per_layer["update_ratio"] = [
            math.sqrt(u) / w if w else math.nan for u, w in zip(host["update_sq"], weight)
        ]
    for key in ACTIVATION_HEALTH:
        per_layer[key] = host[key]
    if "grad_norm_clipped" in host:
        per_layer["grad_norm_clipped"] = host["grad_norm_clipped"]
    if "clip:layer_frac" in host:
        per_layer["clip_frac"] = host["clip:layer_frac"]

    values: dict[str, float] = {
        **(scalars or {}),
        "loss/train": host["loss"][0],
        "loss/baseline": host["baseline"][0],
        "grad/norm_pre_clip": host["total_pre"][0],
        "opt/lr": optimizer.param_groups[0]["lr"],
        "flow/grad_norm_ratio": _ratio(host["grad_norm"]),
        "flow/signal_bwd_ratio": _ratio(host["signal_bwd"]),
        "flow/signal_fwd_ratio": _ratio(host["signal_fwd"]),
    }
    if "total_post" in host:
        values["grad/norm_post_clip"] = host["total_post"][0]
    if "clip:coef" in host:
        values["clip/coef"] = host["clip:coef"][0]
    if "clip:frac" in host:
        values["clip/frac"] = host["clip:frac"][0]
    if scaler.is_enabled():
        values["amp/scale"] = scaler.get_scale()
    if "acc" in host:
        values["acc/train"] = host["acc"][0]
    if "test" in host:
        values["loss/test"], acc = host["test"]
        if not math.isnan(acc):  # NaN: a regression task
            values["acc/test"] = acc
    for key, per in per_layer.items():
        for tag, v in zip(layers.tags, per):
            # NaN: a layer AGC leaves out, or one without such activations.
            if not (key in SPARSE and math.isnan(v)):
                values[f"{key}/{tag}"] = v
        history.add(key, per)
    time_norms: dict[str, tuple[list[int], list[float]]] = {}
    for tag, steps in history.time_steps.items():
        norms = host.get(f"time:{tag}")
        if not norms:
            continue
        pad = len(str(steps[-1]))
        for t, v in zip(steps, norms):
            values[f"time_grad/{tag}/t{t:0{pad}d}"] = v
        history.add(f"time:{tag}", norms)
        time_norms[tag.split("_", 1)[1]] = (steps, norms)
        # First over last time step; the last recurrent layer (nearest the loss) is reported.
        values["flow/time_grad_ratio"] = _ratio(norms)
    for tag in layers.tags:
        if f"hist:{tag}" in host:
            h = host[f"hist:{tag}"]
            values[f"grad_nonfinite/{tag}"] = h[0]  # counted, kept out of the histogram
            hist = histogram_from_stats(h)
            if hist is not None:
                logger.histogram(f"grad_hist/{tag}", hist, step)
    if "param_norm" in host:
        for name, v in zip(layers.param_names, host["param_norm"]):
            values[f"grad_norm_param/{name}"] = v
    history.records.append(
        Record(
            step,
            host["grad_norm"],
            host["signal_bwd"],
            host["signal_fwd"],
            host["sat_frac"],
            host["dead_frac"],
            host["total_pre"][0],
            time_norms,
        )
    )
    logger.scalars(values, step)
    last.update(values)
    return values


def _json_safe(obj: Any) -> Any:
    """NaN and infinities as null: summary.json must be strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def verdict_hparams(verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """The verdicts as HParams columns: the kinds joined, and one flag per kind."""
    kinds = list(dict.fromkeys(v["kind"] for v in verdicts))
    return {"verdicts": ",".join(kinds), **{f"verdict/{k}": k in kinds for k in KINDS}}


def verdict_markdown(verdicts: list[dict[str, Any]]) -> str:
    rows = [
        f"| {v['kind']} | {v['layer'] or '-'} | {'-' if v['step'] is None else v['step']}"
        f" | {describe(v)} |"
        for v in verdicts
    ]
    return "\n".join(["| verdict | layer | step | evidence |", "|---|---|---|---|", *rows])


def _finish(
    logger: MetricLogger,
    cfg: Config,
    result: dict[str, Any],
    output_dir: Path,
    metric_tags: list[str],
    draw: Callable[..., Any],
) -> None:
    """Write hparams, verdicts, the figure and summary.json, flush TensorBoard: on every
    way out of a run."""
    text = json.dumps(_json_safe(result), indent=2, allow_nan=False)
    try:
        hparams = {**hparams_of(cfg), "status": result["status"]}
        logger.hparams({**hparams, **verdict_hparams(result["verdicts"])}, metric_tags)
        logger.text("run/verdicts", verdict_markdown(result["verdicts"]), result["steps"])
        logger.text("run/summary", f"```\n{text}\n```", result["steps"])
        try:
            fig = draw(judged=result["verdicts"])
            if fig is not None:
                image = figures.save_png(fig, output_dir / FIGURE_FILE)
                logger.image("flow/gradient_flow", image, result["steps"])
        except Exception as e:  # the figure is a view of the run, never worth losing it for
            log.warning("the gradient-flow figure failed: %s: %s", type(e).__name__, e)
        logger.close()
    finally:
        (output_dir / SUMMARY_FILE).write_text(text + "\n")


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


def theory_markdown(layers: list[str], theory: dict[str, Any], measured: Record) -> str:
    """The mean-field profile beside the measured one at step 0, one row per layer; the
    predicted backward signal is relative, so it is scaled to the measured head's."""
    head = measured.signal_bwd[-1]
    rows = [
        f"| {name} | {theory['signal_fwd'][i]:.3g} | {measured.signal_fwd[i]:.3g}"
        f" | {theory['signal_bwd'][i] * head:.3g} | {measured.signal_bwd[i]:.3g} |"
        for i, name in enumerate(layers)
    ]
    return "\n".join(
        [
            "| layer | fwd, theory | fwd, measured | bwd, theory | bwd, measured |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )


def initial_jacobian(
    cfg: Config, model: torch.nn.Module, data: Dataset, logger: MetricLogger
) -> dict[str, Any] | None:
    """diagnose.jacobian: singular values of the input-output Jacobian at init."""
    if not cfg.diagnose.jacobian:
        return None
    spectrum = jacobian_spectrum(model, data.x_train[:64])
    logger.scalars({f"jacobian/sv_{k}": spectrum[k] for k in ("mean", "std", "min", "max")}, 0)
    return spectrum
