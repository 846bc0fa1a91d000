"""batchnorm: Ioffe & Szegedy 2015 (Section 4.2, and Figure 1's sigmoid MNIST net):
BatchNorm lets a deep saturating (sigmoid) net train that does not train without it; its
batch statistics are noisy at small batches (Ioffe 2017; Wu & He 2018, Figure 1).

Judged on every seed: without BN the net never leaves the initial plateau (loss/train <
PLATEAU x ln C), at either batch size; with BN at batch 128 it does. Noisy at batch 4: the
BN net's training-mode loss (batch statistics; the mean of the last TAIL logged batches)
is more than MISMATCH x its eval-mode test loss (running averages) at batch 4 on every
seed, and not at batch 128. Every batch is drawn fresh from the same distribution as the
test set (at most half an epoch at batch 4), so without BN noise the two agree.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from claims.common import (
    Result,
    by_keys,
    judge,
    markdown_table,
    metric,
    pyplot,
    save,
    scalars,
    spread,
)
from claims.init_depth import PLATEAU, WINDOW, _classes, _steps, leave_step
from gradexp.report import RunRow

PRESET = "batchnorm"
PAPER = (
    "Ioffe & Szegedy 2015, Section 4.2 and Figure 1; small batches: Ioffe 2017, Wu & He "
    "2018 (Figure 1)"
)
CLAIM = (
    "BatchNorm lets a deep sigmoid net train that does not train without it; with small "
    "batches its batch statistics are noisy."
)
SHORT = ["trainer.steps=20", "data.n_train=512", "data.n_test=128", "trainer.eval_every=10"]

TAIL = 20  # the training-mode loss: mean of the last TAIL logged batches
MISMATCH = 1.1  # "noisy": training-mode loss above this x the eval-mode test loss


def train_mode_loss(run: RunRow) -> float | None:
    points = [v for _, v in scalars(run, "loss/train")][-TAIL:]
    finite = [v for v in points if math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def mismatch(run: RunRow) -> float | None:
    train, test = train_mode_loss(run), metric(run, "loss/test")
    return None if train is None or not test else train / test


def _label(norm: str, batch: str) -> str:
    return f"{'BN' if norm == 'batch' else norm}, batch {batch}"


def _figure(arms: dict[tuple[str, str], list[RunRow]], out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    styles = {
        ("none", "4"): ("tab:gray", ":"),
        ("none", "128"): ("tab:gray", "-"),
        ("batch", "4"): ("tab:orange", "-"),
        ("batch", "128"): ("tab:blue", "-"),
    }
    bar = None
    for (norm, batch), runs in arms.items():
        color, ls = styles.get((norm, batch), ("k", "--"))
        for i, run in enumerate(runs):
            pts = scalars(run, "loss/test", finite=True)
            if pts:
                bar = PLATEAU * math.log(_classes(run))
                ax.plot(*zip(*pts), color=color, ls=ls, lw=1.2, marker=".",
                        label=_label(norm, batch) if i == 0 else None)  # fmt: skip
    if bar is None:
        plt.close(fig)
        return None
    ax.axhline(bar, color="k", ls="--", lw=0.8, label=f"{PLATEAU} ln C")
    ax.set_ylim(0, bar / PLATEAU * 1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss/test (eval mode)")
    ax.set_title("20-layer sigmoid MLP, N(0, 1) weights (one line per seed)")
    ax.legend(fontsize=8)
    return save(fig, out, "batchnorm_test_loss.png")


def evaluate(runs: list[RunRow], out: Path) -> Result:
    arms = by_keys(runs, ("norm", "trainer.batch_size"), order=["none"])
    budget = max((_steps(r) for r in runs), default=0)
    rows = []
    for (norm, batch), arm in arms.items():
        left = [leave_step(r) for r in arm]
        n_left = sum(s is not None for s in left)
        cell = spread([float(s) for s in left if s is not None]) if n_left else "-"
        rows.append(
            [
                norm,
                batch,
                str(len(arm)),
                f"{n_left}/{len(arm)}: {cell}" if n_left else f"0/{len(arm)} within {budget}",
                spread([train_mode_loss(r) for r in arm]),
                spread([metric(r, "loss/test") for r in arm]),
                spread([mismatch(r) for r in arm]),
                spread([metric(r, "acc/test") for r in arm]),
                ", ".join(sorted({r.status for r in arm})),
            ]
        )
    table = markdown_table(
        [
            "norm",
            "batch",
            "seeds",
            f"left the plateau (loss/train < {PLATEAU} ln C, mean of {WINDOW} logged): seeds, step",
            f"train-mode loss (last {TAIL} logged)",
            "loss/test (eval mode)",
            "train-mode / test loss",
            "acc/test",
            "status",
        ],
        rows,
    )

    def count(key: tuple[str, str], test) -> tuple[int, int]:
        arm = arms.get(key, [])
        return sum(1 for r in arm if test(r)), len(arm)

    stalls = [count((("none"), b), lambda r: leave_step(r) is None) for b in ("4", "128")]
    trains = count(("batch", "128"), lambda r: leave_step(r) is not None)
    noisy4 = count(("batch", "4"), lambda r: (mismatch(r) or 0) > MISMATCH)
    clean128 = count(("batch", "128"), lambda r: (m := mismatch(r)) is not None and m <= MISMATCH)
    parts = [
        all(n and k == n for k, n in stalls),
        bool(trains[1]) and trains[0] == trains[1],
        bool(noisy4[1]) and noisy4[0] == noisy4[1] and clean128[0] == clean128[1],
    ]
    verdict = judge(parts)
    result = (
        f"Without BN the net stayed on the plateau on {stalls[0][0]}/{stalls[0][1]} seeds at "
        f"batch 4 and {stalls[1][0]}/{stalls[1][1]} at batch 128; with BN at batch 128 it "
        f"left it on {trains[0]}/{trains[1]}. BN's training-mode loss exceeded {MISMATCH}x "
        f"its eval-mode test loss on {noisy4[0]}/{noisy4[1]} seeds at batch 4 and "
        f"{clean128[1] - clean128[0]}/{clean128[1]} at batch 128."
    )
    why = (
        f"Criteria, on every seed within {budget} steps: (1) no BN: no run leaves the plateau "
        f"({'held' if parts[0] else 'did not hold'}); (2) BN at batch 128: every run does "
        f"({'held' if parts[1] else 'did not hold'}); (3) BN at batch 4 is noisy: its "
        f"training-mode loss is above {MISMATCH}x its eval-mode test loss, and not at batch "
        f"128 ({'held' if parts[2] else 'did not hold'})."
    )
    figures = [p for p in [_figure(arms, out)] if p is not None]
    return Result(verdict=verdict, result=result, why=why, table=table, figures=figures)
