"""truncated_bptt: a dependency longer than the truncation cannot be learned from the
gradient (Williams & Peng 1990; Elman 1990's truncation is the usual practice).

The copy task (gradexp.data.copy_task): symbols at steps 0..L-1, ``delay`` blank steps,
then the L symbols recalled at steps L+delay..2L+delay-1, so symbol i is recalled
LAG = L + delay steps after it was shown. ``trainer.tbptt=k`` detaches the state at steps
k, 2k, ...: the gradient of recall i reaches symbol i only when both lie in one chunk,
floor(i/k) == floor((i+LAG)/k). If the learnable symbols are recalled perfectly and the
rest at chance, acc/test = chance + (1 - chance) * fits / L: the prediction column.

Judged on every seed, from acc/test (the test accuracy per recalled symbol):
- full BPTT learns: acc >= LEARNED;
- a k whose chunks hold no symbol's dependency (every k shorter than the delay, and any
  k up to the lag) stays near chance: acc <= chance + NEAR;
- a k whose chunks hold some symbols' dependencies learns those and no more: acc >
  chance + NEAR and acc <= the prediction + NEAR.
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
from gradexp.report import RunRow, setting

PRESET = "truncated_bptt"
PAPER = (
    "Williams & Peng 1990, An efficient gradient-based algorithm for on-line training of "
    "recurrent network trajectories (Neural Computation 2(4)): truncated BPTT"
)
CLAIM = (
    "Truncated back-propagation through time (the state detached every k steps) cannot "
    "learn a dependency longer than its chunk: on the copy task full BPTT learns to "
    "recall the symbols, truncation shorter than the delay stays at chance."
)
SHORT = ["trainer.steps=20", "data.n_train=512", "data.n_test=128", "trainer.eval_every=10"]

LEARNED = 0.5  # full BPTT learns: test accuracy per recalled symbol at least this
NEAR = 0.15  # near chance / near the prediction: within this much accuracy above it


def _int(run: RunRow, key: str, default: int) -> int:
    value = setting(run, key)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def task(run: RunRow) -> tuple[int, int, int]:
    """The run's copy task: symbols, length (L), delay."""
    return _int(run, "data.symbols", 8), _int(run, "data.length", 5), _int(run, "data.delay", 20)


def fits(k: int, length: int, delay: int) -> int:
    """How many of the L symbols share a chunk with their recall under truncation k."""
    total = 2 * length + delay
    chunk = k or total
    lag = length + delay
    return sum(1 for i in range(length) if i // chunk == (i + lag) // chunk)


def prediction(k: int, symbols: int, length: int, delay: int) -> float:
    chance = 1.0 / symbols
    return chance + (1.0 - chance) * fits(k, length, delay) / length


def _figure(by_k: dict[int, list[RunRow]], out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    chance = None
    for n, (k, arm) in enumerate(by_k.items()):
        for i, run in enumerate(arm):
            pts = scalars(run, "acc/train")
            if pts:
                drawn = True
                label = ("full BPTT" if k == 0 else f"k={k}") if i == 0 else None
                ax.plot(*zip(*pts), lw=0.9, color=colors[n % len(colors)], label=label)
            symbols, length, delay = task(run)
            chance = 1.0 / symbols
            if i == 0:
                ax.axhline(
                    prediction(k, symbols, length, delay),
                    color=colors[n % len(colors)],
                    lw=0.7,
                    ls=":",
                )
    if not drawn:
        plt.close(fig)
        return None
    if chance is not None:
        ax.axhline(chance, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("training accuracy per recalled symbol")
    ax.set_title(
        "copy task, LSTM + Adam: one line per seed (dotted: the chunk prediction)", fontsize=9
    )
    ax.legend(fontsize=8, loc="upper left")
    return save(fig, out, "truncated_bptt_accuracy.png")


def evaluate(runs: list[RunRow], out: Path) -> Result:
    found = group(runs, "trainer.tbptt", order=["0"])  # full BPTT, then k by size
    by_k = {int(k): arm for k, arm in found.items() if k.isdigit()}
    rows = []
    parts: list[bool] = []
    notes: list[str] = []
    for k, arm in by_k.items():
        symbols, length, delay = task(arm[0])
        chance = 1.0 / symbols
        n_fit = fits(k, length, delay)
        pred = prediction(k, symbols, length, delay)
        accs = [metric(r, "acc/test") for r in arm]
        name = "full BPTT" if k == 0 else f"k={k}"
        relation = (
            "-" if k == 0 else ("shorter" if k < delay else "longer" if k > delay else "equal")
        )
        rows.append(
            [
                "0 (full BPTT)" if k == 0 else str(k),
                relation,
                f"{n_fit}/{length}",
                f"{pred:.3g}",
                spread(accs),
                spread([metric(r, "loss/test") for r in arm]),
                str(len(arm)),
            ]
        )
        present = [a for a in accs if a is not None]
        complete = len(present) == len(arm) and bool(arm)
        if k == 0:
            ok = complete and all(a >= LEARNED for a in present)
            notes.append(
                f"full BPTT reached acc >= {LEARNED:g} on "
                f"{sum(a >= LEARNED for a in present)}/{len(arm)} seeds"
            )
        elif n_fit == 0:
            ok = complete and all(a <= chance + NEAR for a in present)
            notes.append(
                f"{name} ({relation} than the delay {delay}, no dependency within a chunk) "
                f"stayed within {NEAR:g} of chance {chance:.3g} on "
                f"{sum(a <= chance + NEAR for a in present)}/{len(arm)} seeds"
            )
        else:
            good = [chance + NEAR < a <= pred + NEAR for a in present]
            ok = complete and all(good)
            notes.append(
                f"{name} ({n_fit}/{length} dependencies within a chunk) learned those and no "
                f"more (chance + {NEAR:g} < acc <= {pred:.3g} + {NEAR:g}) on "
                f"{sum(good)}/{len(arm)} seeds"
            )
        parts.append(ok)
    table = markdown_table(
        [
            "trainer.tbptt",
            "k vs the delay",
            "symbols whose dependency fits a chunk",
            "predicted acc",
            "acc/test (chance 1/8)",
            "loss/test (ln 8 = 2.08)",
            "seeds",
        ],
        rows,
    )
    verdict = judge(parts) if parts else "not reproduced"
    result = "; ".join(
        f"{'full' if k == 0 else f'k={k}'} acc {spread([metric(r, 'acc/test') for r in arm])}"
        for k, arm in by_k.items()
    )
    figures = [p for p in [_figure(by_k, out)] if p is not None]
    return Result(verdict, result + ".", "; ".join(notes) + ".", table, figures)
