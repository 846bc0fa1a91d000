"""nfnet_agc: adaptive gradient clipping (AGC) lets a normalizer-free ResNet train at a
learning rate where the unclipped one is unstable (Brock et al. 2021, Figure 2a).

Judged per seed on the preset's three arms (batch 128, SGD lr 1.0):

- a run is **unstable** when it ends non-finite (status ``diverged``), gradexp judges it
  ``diverged`` (a finite blow-up), or its training loss at a logged step reaches SPIKE
  times max(its step-0 loss, the input-blind baseline);
- a run **trains** when it completes, is not unstable, and ends with a test accuracy of at
  least TRAINS (chance is 0.1 on the 10 classes).

The claim holds when the unclipped NF-ResNet is unstable on most seeds and the one with
AGC trains on most seeds. The BatchNorm ResNet's row is shown, not judged.
"""

from __future__ import annotations

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
from gradexp.report import RunRow

PRESET = "nfnet_agc"
PAPER = (
    "Brock, De, Smith & Simonyan 2021, High-Performance Large-Scale Image Recognition "
    "Without Normalization, Figure 2a"
)
CLAIM = (
    "Adaptive gradient clipping lets a normalizer-free ResNet train at the large batch sizes "
    "and learning rates where it is unstable without clipping (a BatchNorm ResNet trains there "
    "too)."
)
SHORT = [
    "trainer.steps=6",
    "trainer.log_every=2",
    "trainer.eval_every=3",
    "data.n_train=256",
    "data.n_test=64",
    "model.width=4",
    "model.blocks=[1,1]",
]

SPIKE = 1.5  # a loss spike: loss/train at a logged step >= SPIKE x max(step-0 loss, baseline)
TRAINS = 0.9  # trains: final acc/test at least this (chance 0.1)
UNCLIPPED, AGC, BN = "nf_resnet", "nf_resnet_agc", "bn_resnet"
LABELS = {
    UNCLIPPED: "NF-ResNet, no clipping",
    AGC: "NF-ResNet + AGC",
    BN: "BN-ResNet, no clipping",
}


def peak_loss_ratio(run: RunRow) -> float | None:
    """The highest logged training loss after step 0 over max(step-0 loss, baseline)."""
    losses = scalars(run, "loss/train", finite=True)
    if len(losses) < 2:
        return None
    baseline = metric(run, "loss/baseline")
    ref = max(v for v in (losses[0][1], baseline) if v is not None)
    return max(v for _, v in losses[1:]) / ref if ref > 0 else None


def nonfinite_step(run: RunRow) -> int | None:
    """The step a run that ended non-finite stopped at; None when it did not."""
    if run.status != "diverged":
        return None
    return (run.summary or {}).get("steps")


def judged_diverged(run: RunRow) -> bool:
    return any(v.get("kind") == "diverged" for v in (run.summary or {}).get("verdicts") or [])


def unstable(run: RunRow) -> bool | None:
    """Non-finite, judged diverged, or a loss spike; None when the run has no summary or
    failed (an error, not a measurement)."""
    if run.summary is None or run.status == "failed":
        return None
    if run.status == "diverged" or judged_diverged(run):
        return True
    peak = peak_loss_ratio(run)
    return peak is not None and peak >= SPIKE


def trains(run: RunRow) -> bool:
    acc = metric(run, "acc/test")
    return (
        run.status == "completed" and unstable(run) is False and acc is not None and acc >= TRAINS
    )


def peak_of(run: RunRow, tag: str) -> float | None:
    values = [v for _, v in scalars(run, tag, finite=True)]
    return max(values) if values else None


def final_acc(run: RunRow) -> float | None:
    """The final test accuracy; None for a run that ended non-finite (its last evaluation
    is from before the blow-up)."""
    return None if run.status == "diverged" else metric(run, "acc/test")


def _steps(steps: list[int | None]) -> str:
    if all(s is None for s in steps):
        return "none"
    return spread([float(s) if s is not None else None for s in steps], missing="finite")


def _count(flags: list[bool | None]) -> str:
    known = [f for f in flags if f is not None]
    text = f"{sum(known)}/{len(flags)}"
    return text if len(known) == len(flags) else f"{text} ({len(flags) - len(known)} unknown)"


def _most(flags: list[bool]) -> bool:
    return bool(flags) and sum(flags) > len(flags) / 2


def _figure(arms: dict[str, list[RunRow]], out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {UNCLIPPED: "tab:red", AGC: "tab:blue", BN: "tab:gray"}
    drawn = False
    for arm, runs in arms.items():
        color = colors.get(arm)
        for i, run in enumerate(runs):
            label = LABELS.get(arm, arm) if i == 0 else None
            losses = scalars(run, "loss/train", finite=True)
            if losses:
                drawn = True
                wide = arm == UNCLIPPED  # two or three logged points: drawn on top
                ax_loss.plot(
                    *zip(*losses), color=color, lw=2 if wide else 1, zorder=3 if wide else 2,
                    label=label,
                )  # fmt: skip
                if run.status == "diverged":  # the last finite point, then non-finite
                    ax_loss.plot(*losses[-1], "x", color=color, ms=9, mew=2, zorder=4)
                    step = nonfinite_step(run)
                    if step is not None:
                        ax_loss.axvline(step, color=color, ls=":", lw=1)
            accs = scalars(run, "acc/test", finite=True)
            if accs:
                ax_acc.plot(*zip(*accs), "o-", color=color, lw=1, ms=3, label=label)
    if not drawn:
        plt.close(fig)
        return None
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (batch)")
    ax_loss.set_title("training loss; x: last logged, dotted: non-finite", fontsize=10)
    ax_acc.axhline(TRAINS, color="k", ls=":", lw=1, label=f"bar {TRAINS}")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_title("test accuracy (one line per seed)", fontsize=10)
    ax_acc.legend(fontsize=8, loc="lower right")
    ax_loss.legend(fontsize=8, loc="lower left")
    return save(fig, out, "nfnet_agc_training.png")


def evaluate(runs: list[RunRow], out: Path) -> Result:
    arms = group(runs, "arm", order=[UNCLIPPED, AGC, BN])
    rows = []
    for arm, arm_runs in arms.items():
        flags = [unstable(r) for r in arm_runs]
        steps = [nonfinite_step(r) for r in arm_runs]
        clipped = [peak_of(r, "clip/frac") for r in arm_runs] if arm == AGC else []
        rows.append(
            [
                LABELS.get(arm, arm),
                str(len(arm_runs)),
                _count(flags),
                _steps(steps),
                spread([peak_loss_ratio(r) for r in arm_runs], "x"),
                spread([peak_of(r, "grad/norm_pre_clip") for r in arm_runs]),
                spread([final_acc(r) for r in arm_runs], missing="non-finite"),
                _count([trains(r) for r in arm_runs]),
                spread([100 * c if c is not None else None for c in clipped], "%")
                if arm == AGC
                else "-",
            ]
        )
    table = markdown_table(
        [
            "arm",
            "seeds",
            "unstable",
            "non-finite at step",
            "peak loss / start",
            "peak gradient norm",
            "acc/test at the end",
            f"trains (acc/test >= {TRAINS})",
            "units AGC clips (peak share)",
        ],
        rows,
    )
    plain, clipped_runs, bn = arms.get(UNCLIPPED, []), arms.get(AGC, []), arms.get(BN, [])
    plain_unstable = [unstable(r) is True for r in plain]
    agc_trains = [trains(r) for r in clipped_runs]
    bn_trains = [trains(r) for r in bn]
    parts = [_most(plain_unstable), _most(agc_trains)]
    result = (
        f"Unclipped NF-ResNet unstable on {sum(plain_unstable)}/{len(plain)} seeds "
        f"({sum(s is not None for s in map(nonfinite_step, plain))} non-finite); with AGC it "
        f"trains on {sum(agc_trains)}/{len(clipped_runs)} (acc/test "
        f"{spread([final_acc(r) for r in clipped_runs], missing='non-finite')}); BN-ResNet "
        f"trains on {sum(bn_trains)}/{len(bn)} (acc/test "
        f"{spread([final_acc(r) for r in bn], missing='non-finite')})."
    )
    why = (
        "Criteria, per seed: unstable = ends non-finite, judged diverged, or a logged "
        f"training loss at {SPIKE}x max(step-0 loss, baseline) or above; trains = completes, "
        f"not unstable, acc/test >= {TRAINS}. The claim holds when the unclipped NF-ResNet "
        f"is unstable on most seeds ({'yes' if parts[0] else 'no'}) and the one with AGC "
        f"trains on most seeds ({'yes' if parts[1] else 'no'}); the BN row is not judged."
    )
    figures = [p for p in [_figure(arms, out)] if p is not None]
    return Result(verdict=judge(parts), result=result, why=why, table=table, figures=figures)
