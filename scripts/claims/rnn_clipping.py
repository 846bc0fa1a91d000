"""rnn_clipping: an RNN whose recurrent matrix has spectral radius above 1 hits exploding
steps; clipping the gradient norm tames them (Pascanu, Mikolov & Bengio 2013).

Read from every logged step (the preset logs each one) of ``grad/norm_pre_clip`` (the
total gradient norm before clipping) and ``loss/train``:

- a gradient spike: the step's total norm over the median of the (up to) WINDOW logged
  steps before it; the run's largest ratio (inf once the norm is non-finite);
- a loss jump: the step's training loss over the median of the WINDOW logged steps
  before it; the run's largest ratio (inf once the loss is non-finite);
- an exploding step: a spike of at least SPIKE followed by a jump of at least JUMP
  within FOLLOW steps (the momentum carries the step on: the loss peaks a few steps
  after the gradient).

The claim's parts: the unclipped run hits an exploding step on most seeds (more than
half); with norm clipping no seed's loss jumps by JUMP or more or goes non-finite; and on
every seed where the unclipped run exploded, the norm-clipped run ends with the lower
test loss. Value and AGC clipping are measured beside it, not judged.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from claims.common import (
    Result,
    group,
    judge,
    markdown_table,
    metric,
    pyplot,
    save,
    scalars,
    spread,
)
from gradexp.report import RunRow, setting

PRESET = "rnn_clipping"
PAPER = (
    "Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural "
    "networks (ICML), Section 3 and Figure 6 (the exploding gradient as a wall in the "
    "error surface; norm clipping, Algorithm 1)"
)
CLAIM = (
    "When the recurrent matrix's spectral radius exceeds 1 the gradient can explode "
    "through time: an SGD step hits a gradient spike and the loss jumps; rescaling the "
    "gradient when its norm exceeds a threshold keeps the step bounded and training goes on."
)
SHORT = ["trainer.steps=20", "data.n_train=512", "data.n_test=128", "trainer.eval_every=10"]

WINDOW = 20  # a spike is measured against the median of this many logged steps before it
SPIKE = 10.0  # a gradient spike: the total norm at least 10x that median
JUMP = 10.0  # a loss jump: the training loss at least 10x that median
FOLLOW = 10  # the loss jumps within this many steps of the spike
BASELINE = 1.0 / 6.0  # the adding problem's input-blind loss

ARMS = ("none", "value", "norm", "agc")


def _rises(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Each value over the median of the (up to) WINDOW values before it, by step, up to
    and including the first non-finite value (inf)."""
    out: list[tuple[int, float]] = []
    for i in range(1, len(points)):
        step, value = points[i]
        if not math.isfinite(value):
            out.append((step, math.inf))
            break
        before = [v for _, v in points[max(0, i - WINDOW) : i] if math.isfinite(v)]
        ref = statistics.median(before) if before else 0.0
        if ref > 0:
            out.append((step, value / ref))
    return out


def _largest(rises: list[tuple[int, float]]) -> tuple[float | None, int | None]:
    if not rises:
        return None, None
    step, ratio = max(rises, key=lambda sr: sr[1])
    return ratio, step


def spike(run: RunRow) -> tuple[float | None, int | None]:
    """The run's largest gradient spike (total norm before clipping over the median of
    the WINDOW logged steps before it) and its step; inf at the first non-finite norm."""
    return _largest(_rises(scalars(run, "grad/norm_pre_clip")))


def _loss_rises(run: RunRow) -> list[tuple[int, float]]:
    rises = _rises(scalars(run, "loss/train"))
    if run.status == "diverged" and not any(math.isinf(r) for _, r in rises):
        # the non-finite step itself went unlogged: it ends the run
        rises.append(((run.summary or {}).get("steps") or 0, math.inf))
    return rises


def jump(run: RunRow) -> tuple[float | None, int | None]:
    """The run's largest loss jump (training loss over the median of the WINDOW logged
    steps before it) and its step; inf at the first non-finite loss."""
    return _largest(_loss_rises(run))


def exploding_step(run: RunRow) -> int | None:
    """The first step whose gradient spikes by SPIKE or more with the loss jumping by JUMP
    or more within FOLLOW steps (from two steps before: the spike's batch is the jump's);
    None if the run has none."""
    jumps = [step for step, ratio in _loss_rises(run) if ratio >= JUMP]
    for step, ratio in _rises(scalars(run, "grad/norm_pre_clip")):
        if ratio >= SPIKE and any(step - 2 <= j <= step + FOLLOW for j in jumps):
            return step
    return None


def exploded(run: RunRow) -> bool:
    return exploding_step(run) is not None


def tamed(run: RunRow) -> bool:
    """No loss jump of JUMP or more, nothing non-finite."""
    j, _ = jump(run)
    return run.status == "completed" and j is not None and j < JUMP


def _ratio_text(values: list[float | None]) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    n_inf = sum(1 for v in values if v is not None and math.isinf(v))
    text = spread(finite) + "x" if finite else ""
    if n_inf:
        text = (text + ", " if text else "") + f"non-finite {n_inf}/{len(values)}"
    return text or "-"


def _steps_text(steps: list[int | None]) -> str:
    return ", ".join("-" if s is None else str(s) for s in steps)


def _figure(by_clip: dict[str, list[RunRow]], out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    arms = list(by_clip)
    if not arms:
        return None
    fig, axes = plt.subplots(2, len(arms), figsize=(3.2 * len(arms), 5.4), sharex=True)
    if len(arms) == 1:
        axes = [[axes[0]], [axes[1]]]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for col, clip in enumerate(arms):
        for tag, row, label in (
            ("grad/norm_pre_clip", 0, "total gradient norm (before clipping)"),
            ("loss/train", 1, "training loss"),
        ):
            ax = axes[row][col]
            for i, run in enumerate(by_clip[clip]):
                pts = [(s, v) for s, v in scalars(run, tag) if math.isfinite(v) and v > 0]
                if pts:
                    drawn = True
                    seed = setting(run, "seed")
                    ax.plot(*zip(*pts), lw=0.8, color=colors[i % len(colors)], label=f"seed {seed}")
                if run.status == "diverged" and pts:
                    ax.plot(*pts[-1], "x", color=colors[i % len(colors)], ms=7)
            ax.set_yscale("log")
            if row == 0:
                ax.set_title(f"clip={clip}")
                ax.axhline(1.0, color="grey", lw=0.6, ls=":")  # clip=norm's max_norm
            else:
                ax.axhline(BASELINE, color="grey", lw=0.6, ls="--")
                ax.set_xlabel("step")
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    if not drawn:
        plt.close(fig)
        return None
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        "tanh RNN, radius 1.5, adding T=50: every step (x: went non-finite; dashed: 1/6)",
        fontsize=9,
    )
    return save(fig, out, "rnn_clipping_spikes.png")


def evaluate(runs: list[RunRow], out: Path) -> Result:
    by_clip = group(runs, "clip", order=ARMS)
    by_seed = {clip: {str(setting(r, "seed")): r for r in arm} for clip, arm in by_clip.items()}
    rows = []
    for clip, arm in by_clip.items():
        spikes = [spike(r) for r in arm]
        jumps = [jump(r) for r in arm]
        statuses = [r.status for r in arm]
        rows.append(
            [
                clip,
                str(len(arm)),
                f"{sum(map(exploded, arm))}/{len(arm)}",
                _ratio_text([s for s, _ in spikes]),
                _ratio_text([j for j, _ in jumps]),
                _steps_text([exploding_step(r) for r in arm]),
                spread([metric(r, "loss/test") for r in arm], missing="non-finite"),
                ", ".join(f"{s} {statuses.count(s)}/{len(arm)}" for s in sorted(set(statuses))),
            ]
        )
    table = markdown_table(
        [
            "clip",
            "seeds",
            "exploding step",
            f"largest gradient spike (x median of {WINDOW} steps before)",
            f"largest loss jump (x median of {WINDOW} steps before)",
            "exploding step at (per seed)",
            "final test loss (1/6 input-blind)",
            "status",
        ],
        rows,
    )

    none = by_clip.get("none", [])
    norm = by_clip.get("norm", [])
    n_exploded = sum(map(exploded, none))
    n_tamed = sum(map(tamed, norm))
    part_explodes = bool(none) and n_exploded > len(none) / 2
    part_tamed = bool(norm) and n_tamed == len(norm)
    paired = []
    for seed, run in by_seed.get("none", {}).items():
        other = by_seed.get("norm", {}).get(seed)
        if exploded(run) and other is not None:
            a, b = metric(run, "loss/test"), metric(other, "loss/test")
            paired.append(b is not None and (a is None or b < a))
    part_lower = bool(paired) and all(paired)

    notes = [
        f"unclipped: an exploding step (a gradient spike >= {SPIKE:g}x and a loss jump "
        f">= {JUMP:g}x) on {n_exploded}/{len(none)} seeds",
        f"norm clipping: no loss jump >= {JUMP:g}x and nothing non-finite on "
        f"{n_tamed}/{len(norm)} seeds",
        f"norm clipping ends below the unclipped test loss on {sum(paired)}/{len(paired)} "
        "seeds where the unclipped run exploded",
    ]
    for clip in ("value", "agc"):
        if clip in by_clip:
            arm = by_clip[clip]
            notes.append(
                f"{clip} (not judged): exploding step on {sum(map(exploded, arm))}/{len(arm)}, "
                f"tamed on {sum(map(tamed, arm))}/{len(arm)}"
            )
    verdict = judge([part_explodes, part_tamed, part_lower])
    result = (
        f"Without clipping an exploding step on {n_exploded}/{len(none)} seeds; norm "
        f"clipping tamed {n_tamed}/{len(norm)} (final test loss "
        f"{spread([metric(r, 'loss/test') for r in none], missing='non-finite')} unclipped, "
        f"{spread([metric(r, 'loss/test') for r in norm], missing='non-finite')} norm-clipped)."
    )
    figures = [p for p in [_figure(by_clip, out)] if p is not None]
    return Result(verdict, result, "; ".join(notes) + ".", table, figures)
