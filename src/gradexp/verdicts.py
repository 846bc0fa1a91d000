"""Name what a run's gradients did: verdicts with their evidence, from the logged statistics.

Each verdict is ``{"kind", "layer", "step", "evidence"}``, ``kind`` one of KINDS. A
sound run gets exactly one, ``healthy``. The thresholds are ``cfg.diagnose``
(config.DiagnoseConfig); the rules:

- diverged: the loss or a gradient went non-finite (the step, and the layer nearest the
  output whose gradient did); with on_nonfinite=skip, the first skipped step.
- vanishing / exploding, along depth: the backward signal of the first layer over the
  last's (the head's; a recurrent net's last recurrent layer's: its depth is the stack,
  and one recurrent layer has none) below ``vanishing_ratio`` / above
  ``exploding_ratio`` at ``sustain`` consecutive logging steps. ``layer`` is the layer
  nearest the output past the threshold, so the signal is that far gone from there down
  to the first layer.
- vanishing / exploding, along time (recurrent layers): ||dL/dh_t|| at the first time
  step over the last, same thresholds; under truncated BPTT only the last chunk counts
  (before it the gradient is cut off by design, not vanished).
- exploding, past a bound: the total gradient norm above ``grad_bound`` at any logging
  step (one spike is enough); ``layer`` is the layer with the largest gradient then.
- diverged, finite: the training loss above ``loss_blowup`` times where it started (or
  the task's baseline, whichever is higher) at ``sustain`` consecutive logging steps,
  everything still finite (the run's status stays completed); ``layer`` is the layer
  whose weight norm grew most.
- exploding, weights: a layer's weight norm above ``weight_growth`` times its step-0
  value, with its entries' RMS above 1 (more than any standard init gives: Kaiming's is
  sqrt(2/fan_in); a head started at N(0, 0.001^2) may grow 30x while it learns), at
  ``sustain`` consecutive logging steps, the loss not (yet) blown up.
- saturated: a layer with at least ``saturated_frac`` of its sigmoid/tanh outputs (or
  of its LSTM/GRU gate values, ``gate_sat_frac``) in the flat regions, both tails, at
  ``sustain`` consecutive logging steps (the layer that does so first).
- dead_units: a layer with at least ``dead_frac`` of its units dead for good: dead at
  every logging step since they last died, at least ``sustain`` of them (see
  telemetry.DeadUnits).

A run that logged nothing (stopped before its first logging step) gets no verdict.

Beside the verdicts, ``outcome``: whether the run learned its task at all, from the final
test loss over the input-blind baseline's (so "vanishing, but learned" reads as such).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from gradexp.config import DiagnoseConfig
from gradexp.record import StepRecord, ratio

KINDS = ("healthy", "vanishing", "exploding", "diverged", "dead_units", "saturated")
OUTCOMES = ("learned", "partly", "not learned")


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def sustained(
    values: Sequence[tuple[int, float | None]], hit: Callable[[float], bool], sustain: int
) -> dict[str, Any] | None:
    """The first run of ``sustain`` consecutive measured logging steps that all ``hit``.

    Steps whose value is None (not measurable) are left out. A run with fewer measured
    steps than ``sustain`` needs all of them to hit. Returns the step the run starts at,
    the value there, the last step that hit, and how many of the measured steps hit.
    """
    measured = [(step, v) for step, v in values if v is not None]
    if not measured:
        return None
    need = min(sustain, len(measured))
    streak = 0
    start = None
    for k, (_, v) in enumerate(measured):
        streak = streak + 1 if hit(v) else 0
        if streak == need:
            start = k - need + 1
            break
    if start is None:
        return None
    hits = [(step, v) for step, v in measured if hit(v)]
    return {
        "step": measured[start][0],
        "value": measured[start][1],
        "until": hits[-1][0],
        "held": f"{len(hits)}/{len(measured)}",
    }


def _beyond(low: bool, threshold: float) -> Callable[[float], bool]:
    """Below the threshold (vanishing) or above it (exploding)."""
    return (lambda v: v < threshold) if low else (lambda v: v > threshold)


def _depth_ratio(
    layers: list[str], r: StepRecord, cfg: DiagnoseConfig, low: bool, stack: tuple[int, int]
) -> str | None:
    """The layer nearest the stack's top whose backward signal is past the threshold."""
    first, last = stack
    bwd = r.layer("signal_bwd", len(layers))
    top = bwd[last]
    for name, v in reversed(list(zip(layers[first:last], bwd[first:last]))):
        value = ratio(v, top)
        threshold = cfg.vanishing_ratio if low else cfg.exploding_ratio
        if value is not None and _beyond(low, threshold)(value):
            return name
    return None


def _along_depth(
    layers: list[str], records: list[StepRecord], cfg: DiagnoseConfig, stack: tuple[int, int]
) -> list[dict[str, Any]]:
    out = []
    n = len(layers)
    first, last = stack
    if first >= last:
        return out  # one recurrent layer: no depth to judge (its own scale vs the head's)
    values = [
        (r.step, ratio(r.layer("signal_bwd", n)[first], r.layer("signal_bwd", n)[last]))
        for r in records
    ]
    by_step = {r.step: r for r in records}
    for kind, low in (("exploding", False), ("vanishing", True)):
        threshold = cfg.vanishing_ratio if low else cfg.exploding_ratio
        found = sustained(values, _beyond(low, threshold), cfg.sustain)
        if found is None:
            continue
        step = found["step"]
        out.append(
            {
                "kind": kind,
                "layer": _depth_ratio(layers, by_step[step], cfg, low, stack),
                "step": step,
                "evidence": {
                    "axis": "depth",
                    "quantity": f"signal_bwd {layers[first]} / {layers[last]}",
                    "ratio": found["value"],
                    "threshold": threshold,
                    "until": found["until"],
                    "held": found["held"],
                },
            }
        )
    return out


def _along_time(records: list[StepRecord], cfg: DiagnoseConfig, tbptt: int) -> list[dict[str, Any]]:
    out = []
    names = list(dict.fromkeys(name for r in records for name in r.time))
    for name in names:
        values: list[tuple[int, float | None]] = []
        span = None
        for r in records:
            steps, norms = r.time.get(name, ([], []))
            if not steps:
                continue
            # Truncated BPTT: judge the last chunk, the one the gradient reaches.
            start = (steps[-1] // tbptt) * tbptt if tbptt else 0
            kept = [(t, v) for t, v in zip(steps, norms) if t >= start]
            if len(kept) < 2:
                continue
            span = (kept[0][0], kept[-1][0])
            values.append((r.step, ratio(kept[0][1], kept[-1][1])))
        if span is None:
            continue
        for kind, low in (("exploding", False), ("vanishing", True)):
            threshold = cfg.vanishing_ratio if low else cfg.exploding_ratio
            found = sustained(values, _beyond(low, threshold), cfg.sustain)
            if found is None:
                continue
            out.append(
                {
                    "kind": kind,
                    "layer": name,
                    "step": found["step"],
                    "evidence": {
                        "axis": "time",
                        "quantity": f"||dL/dh_t|| t={span[0]} / t={span[1]}",
                        "ratio": found["value"],
                        "threshold": threshold,
                        "until": found["until"],
                        "held": found["held"],
                    },
                }
            )
    return out


def _past_bound(layers: list[str], records: list[StepRecord], cfg: DiagnoseConfig) -> dict | None:
    for r in records:
        total = r.scalars.get("grad/norm_pre_clip")
        if _finite(total) and total > cfg.grad_bound:
            grad = r.layer("grad_norm", len(layers))
            finite = [(v, name) for v, name in zip(grad, layers) if _finite(v)]
            return {
                "kind": "exploding",
                "layer": max(finite)[1] if finite else None,
                "step": r.step,
                "evidence": {
                    "axis": "norm",
                    "quantity": "grad/norm_pre_clip",
                    "value": total,
                    "threshold": cfg.grad_bound,
                },
            }
    return None


def _weight_growth(layers: list[str], records: list[StepRecord]) -> list[tuple[int, list[float]]]:
    """Per logging step, each layer's weight norm over its value at the first step (NaN
    where not measurable)."""
    if not records:
        return []
    first = records[0].layer("weight_norm", len(layers))
    out = []
    for r in records:
        now = r.layer("weight_norm", len(layers))
        out.append(
            (
                r.step,
                [
                    v / f if _finite(v) and _finite(f) and f > 0 else math.nan
                    for v, f in zip(now, first)
                ],
            )
        )
    return out


def _blowup(
    layers: list[str], records: list[StepRecord], cfg: DiagnoseConfig, sizes: list[int] | None
) -> dict | None:
    """A finite blow-up: the loss far above where it started, or a layer's weights far
    above their start and past any init's scale, sustained (a non-finite run is judged
    ``diverged`` already)."""
    growth = _weight_growth(layers, records)

    def grown(at: int) -> tuple[float, str] | None:
        row = dict(growth).get(at, [])
        finite = [(g, name) for g, name in zip(row, layers) if _finite(g)]
        return max(finite) if finite else None

    losses = [(r.step, r.scalars.get("loss/train")) for r in records]
    start = losses[0][1] if losses else None
    baseline = records[0].scalars.get("loss/baseline") if records else None
    refs = [v for v in (start, baseline) if _finite(v) and v > 0]
    if refs:
        ref = max(refs)
        rises = [(step, v / ref if _finite(v) else None) for step, v in losses]
        found = sustained(rises, lambda v: v > cfg.loss_blowup, cfg.sustain)
        if found is not None:
            at = grown(found["until"])
            return {
                "kind": "diverged",
                "layer": at[1] if at else None,
                "step": found["step"],
                "evidence": {
                    "axis": "loss",
                    "quantity": "loss/train / max(step 0, baseline)",
                    "loss_start": start,
                    "baseline": baseline,
                    "loss": found["value"] * ref,
                    "ratio": found["value"],
                    "threshold": cfg.loss_blowup,
                    "weight_growth": at[0] if at else None,
                    "until": found["until"],
                    "held": found["held"],
                },
            }
    if sizes is None:
        return None
    by_step = {r.step: r.layer("weight_norm", len(layers)) for r in records}

    def blown(step: int, row: list[float]) -> tuple[float, str] | None:
        """The most grown layer of those past any init's scale (entry RMS > 1)."""
        norms = by_step[step]
        rms = [n / math.sqrt(k) if _finite(n) and k else math.nan for n, k in zip(norms, sizes)]
        over = [
            (g, name) for g, r, name in zip(row, rms, layers) if _finite(g) and _finite(r) and r > 1
        ]
        return max(over, default=None)

    blowups = {step: blown(step, row) for step, row in growth}
    largest = [(step, b[0] if b else None) for step, b in blowups.items()]
    found = sustained(largest, lambda v: v > cfg.weight_growth, cfg.sustain)
    if found is None:
        return None
    _, layer = blowups[found["step"]]  # type: ignore[misc]
    return {
        "kind": "exploding",
        "layer": layer,
        "step": found["step"],
        "evidence": {
            "axis": "weights",
            "quantity": "weight_norm / its step-0 value",
            "ratio": found["value"],
            "threshold": cfg.weight_growth,
            "until": found["until"],
            "held": found["held"],
        },
    }


def _saturated(layers: list[str], records: list[StepRecord], cfg: DiagnoseConfig) -> dict | None:
    """The layer whose saturated share (of its sigmoid/tanh outputs, or of its LSTM/GRU
    gates) first stays at or above the threshold."""
    found = []
    for quantity in ("sat_frac", "gate_sat_frac"):
        for i, name in enumerate(layers):
            shares = [(r.step, r.layer(quantity, len(layers))[i]) for r in records]
            values = [(step, v if _finite(v) else None) for step, v in shares]
            hit = sustained(values, lambda v: v >= cfg.saturated_frac, cfg.sustain)
            if hit is not None:
                found.append((hit["step"], -hit["value"], name, quantity, hit))
    if not found:
        return None
    step, _, name, quantity, hit = min(found)  # the earliest; of those, the most saturated
    return {
        "kind": "saturated",
        "layer": name,
        "step": step,
        "evidence": {
            "quantity": quantity,
            "fraction": hit["value"],
            "threshold": cfg.saturated_frac,
            "layers_over": len({f[2] for f in found}),
            "until": hit["until"],
            "held": hit["held"],
        },
    }


def _dead(
    layers: list[str], records: list[StepRecord], cfg: DiagnoseConfig, dead: list[dict | None]
) -> dict | None:
    never = [(d["never_recovered"], i) for i, d in enumerate(dead) if d is not None]
    over = [(v, i) for v, i in never if v >= cfg.dead_frac]
    if not over:
        return None
    fraction, i = max(over)
    # The first logging step at which that layer's dead share reached the threshold.
    step = next(
        (
            r.step
            for r in records
            if _finite(v := r.layer("dead_frac", len(layers))[i]) and v >= cfg.dead_frac
        ),
        records[-1].step if records else None,
    )
    return {
        "kind": "dead_units",
        "layer": layers[i],
        "step": step,
        "evidence": {
            "quantity": "dead units, never recovered",
            "fraction": fraction,
            "threshold": cfg.dead_frac,
            "layers_over": len(over),
            "ever": dead[i]["ever"],  # type: ignore[index]
        },
    }


def judge(
    layers: list[str],
    records: list[StepRecord],
    cfg: DiagnoseConfig,
    *,
    nonfinite: dict[str, Any] | None = None,
    skipped: int = 0,
    dead: list[dict[str, float] | None] | None = None,
    tbptt: int = 0,
    sizes: list[int] | None = None,
    stack: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """The run's verdicts from its logging steps; ``[healthy]`` when nothing is wrong,
    none when nothing was logged.

    Args:
        layers: depth layer names, input to output (the last one the head).
        records: the logging steps in order.
        cfg: the thresholds.
        nonfinite: the first non-finite step and layer (summary.json's ``nonfinite``).
        skipped: steps skipped for non-finite values (on_nonfinite=skip).
        dead: per layer, the shares of units that ever died / never recovered.
        tbptt: the truncation length (0: full BPTT).
        sizes: each layer's number of parameter entries (a weight blow-up is judged
            only with them).
        stack: the first and last layer a depth verdict compares (default: the first
            layer and the head). A recurrent net's is its recurrent stack: the head's own
            scale (an IRNN's N(0, 0.001^2) output weights) makes no depth verdict, and one
            recurrent layer has no depth to judge.
    """
    stack = stack or (0, len(layers) - 1)
    out: list[dict[str, Any]] = []
    if not records and nonfinite is None:
        return out  # nothing logged (a run stopped before its first log step): no verdict
    if nonfinite is not None:
        out.append(
            {
                "kind": "diverged",
                "layer": nonfinite.get("layer"),
                "step": nonfinite.get("step"),
                "evidence": {"quantity": "loss or gradient non-finite", "skipped_steps": skipped},
            }
        )
    if nonfinite is None and (blowup := _blowup(layers, records, cfg, sizes)) is not None:
        out.append(blowup)
    depth = _along_depth(layers, records, cfg, stack)
    exploding = [v for v in depth if v["kind"] == "exploding"]
    out.extend(exploding)
    bound = _past_bound(layers, records, cfg)
    if bound is not None and not exploding:  # a sustained depth ratio says more
        out.append(bound)
    out.extend(v for v in depth if v["kind"] == "vanishing")
    out.extend(_along_time(records, cfg, tbptt))
    for verdict in (_saturated(layers, records, cfg), _dead(layers, records, cfg, dead or [])):
        if verdict is not None:
            out.append(verdict)
    if not out:
        last = records[-1] if records else None
        bwd = last.layer("signal_bwd", len(layers)) if last else None
        value = ratio(bwd[stack[0]], bwd[stack[1]]) if bwd else None
        out.append(
            {
                "kind": "healthy",
                "layer": None,
                "step": last.step if last else None,
                "evidence": {
                    "quantity": f"signal_bwd {layers[stack[0]]} / {layers[stack[1]]}",
                    "ratio": value,
                    "logged_steps": len(records),
                },
            }
        )
    return out


def describe(verdict: dict[str, Any]) -> str:
    """The evidence in plain words, one line."""
    e = verdict["evidence"]

    def g(x: Any) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    kind = verdict["kind"]
    if e.get("axis") == "loss":
        where = (
            f"; weights of {verdict['layer']} x{g(e['weight_growth'])}" if verdict["layer"] else ""
        )
        return (
            f"loss/train rose to {g(e['loss'])} from {g(e['loss_start'])} at step 0 (baseline"
            f" {g(e['baseline'])}): x{g(e['ratio'])} > {g(e['threshold'])}, held at {e['held']}"
            f" logged steps (last at step {e['until']}), still finite{where}"
        )
    if e.get("axis") == "weights":
        return (
            f"weight norm x{g(e['ratio'])} its step-0 value > {g(e['threshold'])}, held at"
            f" {e['held']} logged steps (last at step {e['until']})"
        )
    if kind == "diverged":
        skipped = f"; {e['skipped_steps']} steps skipped" if e.get("skipped_steps") else ""
        return f"loss or gradient non-finite{skipped}"
    if kind == "healthy":
        ratio = e.get("ratio")
        return (
            f"no threshold crossed in {e['logged_steps']} logged steps; last {e['quantity']}"
            f" = {g(ratio)}"
        )
    if e.get("axis") == "norm":
        return f"{e['quantity']} = {g(e['value'])} > bound {g(e['threshold'])}"
    if kind in ("vanishing", "exploding"):
        op = "<" if kind == "vanishing" else ">"
        return (
            f"{e['quantity']} = {g(e['ratio'])} {op} {g(e['threshold'])}, held at"
            f" {e['held']} logged steps (last at step {e['until']})"
        )
    if kind == "saturated":
        what = "gate values" if e["quantity"] == "gate_sat_frac" else "units"
        return (
            f"{g(e['fraction'])} of {what} saturated (>= {g(e['threshold'])}) in"
            f" {e['layers_over']} layer(s), held at {e['held']} logged steps"
        )
    return (
        f"{g(e['fraction'])} of units dead and never recovered (>= {g(e['threshold'])}) in"
        f" {e['layers_over']} layer(s); {g(e['ever'])} ever died"
    )


def where_and_when(
    layers: Sequence[str], records: Sequence[StepRecord], cfg: DiagnoseConfig
) -> str | None:
    """Where and until when the backward signal left the verdicts' band, in words, for a
    figure's title: "hidden.0-hidden.7 below 1% of the head's backward signal, steps
    0-999, to the end" ("recovered" when it came back before the last logged step; "above
    100x" for the exploding side). None when every layer stayed within the band.

    Each logged step compares every layer's backward signal with the head's (the last
    layer's) at that step, against ``cfg.vanishing_ratio`` and ``cfg.exploding_ratio``;
    the layers named are those beyond at the first such step (with a count when they are
    not one contiguous block).
    """
    logged = [r for r in records if "signal_bwd" in r.layers]
    if not logged:
        return None
    last = logged[-1].step
    phrases = []
    for low, threshold in ((True, cfg.vanishing_ratio), (False, cfg.exploding_ratio)):
        spans = []  # (step, indices of the layers beyond)
        for r in logged:
            values = r.layer("signal_bwd", len(layers))
            head = values[-1]
            if not (_finite(head) and head > 0):
                continue
            beyond = [
                i
                for i, v in enumerate(values[:-1])
                if _finite(v) and (v / head < threshold if low else v / head > threshold)
            ]
            if beyond:
                spans.append((r.step, beyond))
        if not spans:
            continue
        first_step, at_first = spans[0]
        end = spans[-1][0]
        lo, hi = min(at_first), max(at_first)
        where = layers[lo] if lo == hi else f"{layers[lo]}-{layers[hi]}"
        if len(at_first) != hi - lo + 1:
            where += f" ({len(at_first)} of {hi - lo + 1} layers)"
        band = f"below {threshold:.0%} of" if low else f"above {threshold:g}x"
        steps = f"step {first_step}" if first_step == end else f"steps {first_step}-{end}"
        outcome = "to the end" if end == last else "recovered"
        phrases.append(f"{where} {band} the head's backward signal, {steps}, {outcome}")
    return "; ".join(phrases) or None


def outcome(
    metrics: dict[str, float], cfg: DiagnoseConfig, chance: float | None = None
) -> dict[str, Any] | None:
    """Whether the run learned its task: ``{"kind", "ratio", "loss/test", "loss/baseline",
    "acc/test", "chance"}``; None without a finite final test loss (stopped before its
    first evaluation, or diverged).

    ``kind`` (one of OUTCOMES) is read off the final test loss over the baseline's, the
    loss of the best input-blind prediction: at most ``cfg.learned_ratio``: learned; at
    most ``cfg.partly_ratio``: partly; else not learned. Classification adds the test
    accuracy beside ``chance``, the best input-blind guess's.
    """
    loss, baseline = metrics.get("loss/test"), metrics.get("loss/baseline")
    if not (_finite(loss) and _finite(baseline)) or baseline <= 0:
        return None
    value = loss / baseline
    kind = (
        "learned"
        if value <= cfg.learned_ratio
        else "partly"
        if value <= cfg.partly_ratio
        else "not learned"
    )
    out: dict[str, Any] = {
        "kind": kind,
        "ratio": value,
        "loss/test": loss,
        "loss/baseline": baseline,
    }
    if _finite(acc := metrics.get("acc/test")):
        out.update({"acc/test": acc, "chance": chance})
    return out


def describe_outcome(result: dict[str, Any] | None) -> str:
    """The outcome in words, one line ("" when there is none)."""
    if not result:
        return ""

    def g(x: Any) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    words = {"learned": "learned", "partly": "partly learned", "not learned": "not learned"}
    line = (
        f"{words[result['kind']]}: loss/test {g(result['loss/test'])} is"
        f" {g(result['ratio'])}x the input-blind baseline's {g(result['loss/baseline'])}"
    )
    if "acc/test" in result:
        chance = result.get("chance")
        line += f"; acc/test {g(result['acc/test'])}" + (
            f" (chance {g(chance)})" if chance is not None else ""
        )
    return line
