"""What every claim module under scripts/claims/ shares: reading a preset's runs back and
judging a paper's claim on them (scripts/reproduce.py runs the presets and writes the
pages).

A claim module, ``scripts/claims/<preset>.py`` (one per experiment preset), defines:

    PRESET: the experiment's name (configs/experiment/<PRESET>.yaml).
    PAPER: authors, year, title, and the figure or table the claim comes from.
    CLAIM: the claim in one sentence.
    SHORT: overrides that make every job of the preset's sweep tiny (the shortened
        mode the tests run: seconds per job, the same jobs and seeds).
    evaluate(runs: list[RunRow], out: Path) -> Result: reads the runs (summary.json,
        event files) and judges the claim from the measurements; may draw figures
        under ``out`` (their paths go in Result.figures).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradexp.report import RunRow, setting

VERDICTS = ("reproduced", "partly", "not reproduced")


@dataclass
class Result:
    """A claim judged on a preset's runs.

    Attributes:
        verdict: one of VERDICTS.
        result: what was measured, across seeds, in a sentence or two (Markdown): the
            row of docs/reproductions.md.
        why: why the verdict: which of the claim's parts held, which did not.
        table: the page's results table (Markdown), each cell across seeds.
        figures: figures drawn for the page (PNG paths).
    """

    verdict: str
    result: str
    why: str
    table: str = ""
    figures: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r}: choose from {', '.join(VERDICTS)}")


def judge(parts: Sequence[bool]) -> str:
    """reproduced when every part of a claim held, not reproduced when none did, else
    partly."""
    if all(parts):
        return "reproduced"
    return "not reproduced" if not any(parts) else "partly"


@functools.cache
def _events(path: Path) -> Any:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(path), size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    return acc


def scalars(run: RunRow, tag: str, finite: bool = False) -> list[tuple[int, float]]:
    """A scalar tag's (step, value) pairs from the run's event files, in step order (a
    resumed run's files are read together; a repeated step keeps its last value);
    ``finite``: only the finite values."""
    points: dict[int, float] = {}
    for events in sorted(run.path.glob("events.out.tfevents.*")):
        acc = _events(events)
        if tag in acc.Tags()["scalars"]:
            points.update((e.step, e.value) for e in acc.Scalars(tag))
    return sorted((s, v) for s, v in points.items() if not finite or math.isfinite(v))


def timed(run: RunRow, tag: str) -> list[tuple[int, float, float]]:
    """A scalar tag's (step, seconds, value), seconds counted from the run's first logged
    training loss (step 0's), read from the events' wall times: what "at equal
    wall-clock time" compares. A run resumed from a checkpoint has a gap; not one of a
    preset's."""
    points: dict[int, tuple[float, float]] = {}
    start = math.inf
    for events in sorted(run.path.glob("events.out.tfevents.*")):
        acc = _events(events)
        names = acc.Tags()["scalars"]
        if "loss/train" in names:
            start = min(start, min(e.wall_time for e in acc.Scalars("loss/train")))
        if tag in names:
            points.update((e.step, (e.wall_time, e.value)) for e in acc.Scalars(tag))
    return [(s, t - start, v) for s, (t, v) in sorted(points.items())]


def metric(run: RunRow, key: str) -> float | None:
    """A final metric of summary.json (loss/test, acc/test, ...); None when absent."""
    value = ((run.summary or {}).get("metrics") or {}).get(key)
    return None if value is None or not math.isfinite(value) else float(value)


def natural(value: str) -> tuple[bool, int, str]:
    """Sort key: numbers by size, before any other value (by name)."""
    return (not value.isdigit(), int(value) if value.isdigit() else 0, value)


def _rank(value: str, order: Sequence[str]) -> tuple[int, tuple[bool, int, str]]:
    return (order.index(value) if value in order else len(order), natural(value))


def group(
    runs: Iterable[RunRow], key: str, order: Sequence[str] | None = None
) -> dict[str, list[RunRow]]:
    """The runs by their value of ``key`` (an override, or the composed default), in the
    order the values first appear; with ``order``, the values it lists first, in that
    order, then the others (numbers by size, then by name)."""
    groups: dict[str, list[RunRow]] = {}
    for run in runs:
        groups.setdefault(str(setting(run, key)), []).append(run)
    if order is None:
        return groups
    return dict(sorted(groups.items(), key=lambda kv: _rank(kv[0], order)))


def by_keys(
    runs: Iterable[RunRow], keys: Sequence[str], order: Sequence[str] = ()
) -> dict[tuple[str, ...], list[RunRow]]:
    """The runs by their values of several keys (an arm: one value of each), sorted key by
    key: the values ``order`` lists first, in that order, then the others (numbers by
    size, then by name)."""
    found: dict[tuple[str, ...], list[RunRow]] = {}
    for run in runs:
        found.setdefault(tuple(str(setting(run, k)) for k in keys), []).append(run)
    return dict(sorted(found.items(), key=lambda kv: tuple(_rank(v, order) for v in kv[0])))


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files, no display); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig: Any, out: Path, name: str, dpi: int = 110) -> Path:
    """Lays the figure out, writes it to ``out/name`` (PNG) and closes it; its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def first_step(points: Sequence[tuple[int, float]], test: Callable[[float], bool]) -> int | None:
    """The first step whose value passes ``test``; None if none does."""
    return next((step for step, value in points if test(value)), None)


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    return f"{x:.2e}"


def spread(values: Sequence[float | None], unit: str = "", missing: str = "-") -> str:
    """median (min-max) over the values that exist, with n when some are missing; a
    single value alone; ``missing`` for each absent value counted as such."""
    present = [v for v in values if v is not None]
    if not present:
        return f"{missing} (n=0/{len(values)})" if values else missing
    med = statistics.median(present)
    text = f"{fmt(med)}{unit}"
    if len(present) > 1:
        low, high = min(present), max(present)
        dash = " to " if low < 0 else "-"  # -0.002 to -5e-05, not -0.002--5e-05
        text += f" ({fmt(low)}{dash}{fmt(high)})"
    if len(present) < len(values):
        text += f", {len(values) - len(present)}/{len(values)} {missing}"
    return text


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; a | inside a cell (|g|) is escaped so that it stays one cell."""

    def line(cells: Iterable[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])
