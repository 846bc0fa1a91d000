"""init_depth: He et al. 2015, Figure 3 (a 30-layer ReLU net: Xavier stalls, theirs trains).

The claim is judged by when each run leaves the initial plateau: the first logged step at
which the training loss (the event file's ``loss/train``, one batch per logged step),
averaged over the last WINDOW logged steps, is below PLATEAU x ln C, C the task's classes
(a net that predicts nothing sits at ln C). He's init must leave it
on every seed at every width, Xavier's on none, within the run's steps.
"""

from __future__ import annotations

import math
from pathlib import Path

from claims.common import (
    Result,
    by_keys,
    judge,
    markdown_table,
    metric,
    natural,
    pyplot,
    save,
    scalars,
    spread,
)
from gradexp.report import RunRow, setting

PRESET = "init_depth"
PAPER = 'He et al. 2015, "Delving deep into rectifiers", Figure 3'
CLAIM = (
    "A 30-layer ReLU net initialized with Xavier's init does not converge (its gradients "
    "diminish); initialized with theirs (Var(W) = 2/fan_in) it does."
)
SHORT = ["trainer.steps=20", "data.n_train=512", "data.n_test=128", "trainer.eval_every=10"]

PLATEAU = 0.9  # the plateau is left when loss/train < PLATEAU * ln C
WINDOW = 5  # ... averaged over this many consecutive logged steps (50 steps by default)
HE, XAVIER = "kaiming_normal", "xavier_normal"
TAIL = 10  # the final training loss: the mean of the last TAIL logged batches


def _classes(run: RunRow) -> int:
    value = setting(run, "data.classes")
    return int(value) if value is not None and str(value).isdigit() else 10


def _steps(run: RunRow) -> int:
    return int((run.summary or {}).get("steps") or 0)


def leave_step(run: RunRow) -> int | None:
    """The first logged step at which the mean of the last WINDOW logged training losses
    (one batch each) is below PLATEAU x ln C; None if none is. A single batch can dip
    below the line on the plateau (a batch of 4 does, measured); a non-finite loss never
    counts."""
    bar = PLATEAU * math.log(_classes(run))
    points = scalars(run, "loss/train")
    for i in range(WINDOW - 1, len(points)):
        window = [v for _, v in points[i - WINDOW + 1 : i + 1]]
        if all(math.isfinite(v) for v in window) and sum(window) / WINDOW < bar:
            return points[i][0]
    return None


def final_train_loss(run: RunRow) -> float | None:
    """The mean of the last TAIL logged training losses (one batch each), finite ones."""
    points = [v for _, v in scalars(run, "loss/train")][-TAIL:]
    finite = [v for v in points if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def bwd_ratio_at_init(run: RunRow) -> float | None:
    """The first hidden layer's backward signal over the head's at step 0."""
    layers = (run.summary or {}).get("layers") or []
    if len(layers) < 2:
        return None
    first, head = (layers[0].get("signal_bwd") or {}), (layers[-1].get("signal_bwd") or {})
    a, b = first.get("first"), head.get("first")
    if a is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _plateau_cell(runs: list[RunRow]) -> str:
    steps = [leave_step(r) for r in runs]
    left = [s for s in steps if s is not None]
    budget = max((_steps(r) for r in runs), default=0)
    if not left:
        return f"not within {budget} steps (0/{len(runs)})"
    text = spread([float(s) for s in left])
    if len(left) < len(runs):
        text += f"; {len(runs) - len(left)}/{len(runs)} not within {budget}"
    return text


def plateau_table(
    arms: dict[tuple[str, str], list[RunRow]],
    header: tuple[str, str],
    labels: dict[str, str] | None = None,
) -> str:
    """The results table: one row per arm, named by its two keys (``header``; the first
    key's value shown as ``labels`` names it)."""
    rows = [
        [
            (labels or {}).get(first, first),
            second,
            str(len(arm)),
            _plateau_cell(arm),
            spread([final_train_loss(r) for r in arm]),
            spread([metric(r, "acc/test") for r in arm]),
            spread([bwd_ratio_at_init(r) for r in arm]),
            ", ".join(sorted({r.status for r in arm})),
        ]
        for (first, second), arm in arms.items()
    ]
    return markdown_table(
        [
            *header,
            "seeds",
            f"steps to loss/train < {PLATEAU} ln C (mean of {WINDOW} logged)",
            f"final loss/train (last {TAIL} logged)",
            "acc/test",
            "bwd first/head at step 0",
            "status",
        ],
        rows,
    )


def plateau_figure(
    arms: dict[tuple[str, str], list[RunRow]],
    out: Path,
    name: str,
    *,
    title: str,
    colors: dict[str, str],
    labels: dict[str, str] | None = None,
    alpha: float | None = None,
) -> Path | None:
    """Each run's loss/train against the step with the PLATEAU x ln C line, one panel per
    arm's second key (``title`` formatted with it), one color per its first key."""
    plt = pyplot()
    if plt is None:
        return None
    panels = sorted({p for _, p in arms}, key=natural)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        bar = None
        for (line, p), runs in arms.items():
            if p != panel:
                continue
            for i, run in enumerate(runs):
                pts = scalars(run, "loss/train", finite=True)
                if not pts:
                    continue
                bar = PLATEAU * math.log(_classes(run))
                ax.plot(
                    *zip(*pts),
                    color=colors.get(line, "tab:gray"),
                    lw=1,
                    alpha=alpha,
                    label=(labels or {}).get(line, line) if i == 0 else None,
                )
        if bar is not None:
            ax.axhline(bar, color="k", ls="--", lw=0.8, label=f"{PLATEAU} ln C")
            ax.set_ylim(0, bar / PLATEAU * 1.2)  # a spike above it is cut off
        ax.set_title(title.format(panel))
        ax.set_xlabel("step")
        ax.set_ylabel("loss/train (one batch)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not any(ax.lines for ax in axes[0]):
        plt.close(fig)
        return None
    return save(fig, out, name)


def evaluate(runs: list[RunRow], out: Path) -> Result:
    by_arm = by_keys(runs, ("init", "model.width"), order=[XAVIER, HE])
    table = plateau_table(by_arm, ("init", "width"))

    widths = sorted({w for _, w in by_arm}, key=natural)
    parts: list[bool] = []
    names: list[str] = []
    notes: list[str] = []
    budget = max((_steps(r) for r in runs), default=0)
    for width in widths:
        he, xa = by_arm.get((HE, width), []), by_arm.get((XAVIER, width), [])
        he_left = [leave_step(r) for r in he]
        xa_left = [leave_step(r) for r in xa]
        he_ok = bool(he) and all(s is not None for s in he_left)
        xa_ok = bool(xa) and all(s is None for s in xa_left)
        parts += [he_ok, xa_ok]
        names += [f"He's init trains at width {width}", f"Xavier's stalls at width {width}"]
        n_he = sum(s is not None for s in he_left)
        n_xa = sum(s is not None for s in xa_left)
        note = f"width {width}: He's init left the plateau on {n_he}/{len(he)} seeds"
        note += f", Xavier's on {n_xa}/{len(xa)}"
        he_by_seed = {setting(r, "seed"): leave_step(r) for r in he}
        pairs = [(he_by_seed.get(setting(r, "seed")), leave_step(r)) for r in xa]
        both = [(h, x) for h, x in pairs if h is not None and x is not None]
        if both:
            slower = [x / max(h, 1) for h, x in both]
            note += f" ({spread(slower)}x later than He's, seed for seed)"
        notes.append(note)
    if not parts:
        parts, notes = [False], ["no runs of both inits"]
    verdict = judge(parts)
    result = (
        f"Steps to leave the plateau (loss/train, mean of {WINDOW} logged steps, < {PLATEAU} "
        f"ln C) within {budget} steps: " + "; ".join(notes) + "."
    )
    held = [name for name, ok in zip(names, parts) if ok]
    failed = [name for name, ok in zip(names, parts) if not ok]
    why = (
        "Criteria: He's init leaves the plateau on every seed, and Xavier's on none, at each "
        f"width. Held: {', '.join(held) or 'none'}. Did not hold: {', '.join(failed) or 'none'}."
    )
    figure = plateau_figure(
        by_arm,
        out,
        "init_depth_loss.png",
        title="30-layer ReLU MLP, width {} (one line per seed)",
        colors={HE: "tab:red", XAVIER: "tab:blue"},
        alpha=0.8,
    )
    figures = [figure] if figure is not None else []
    return Result(verdict=verdict, result=result, why=why, table=table, figures=figures)
