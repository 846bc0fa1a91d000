"""``gradexp report``: one table, and optionally one figure, comparing many finished runs.
Runs that differ only in their seed (or the --by key) share a row: medians and counts.

Reads only what the runs left on disk (summary.json, .hydra/overrides.yaml): no torch,
and matplotlib only for ``--png``, so a report over a large sweep takes a moment. A run
that was killed half-way or left a damaged summary still gets its row and a note.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import statistics
import sys
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gradexp import figures
from gradexp.config import EXECUTION_KEYS
from gradexp.display import VERDICT_STYLE, _fmt
from gradexp.record import ratio
from gradexp.rundir import FIGURE_FILE, SUMMARY_FILE, write_text_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
EVENTS_PREFIX = "events.out.tfevents."

NO_SUMMARY = "no summary"
CORRUPT_SUMMARY = "corrupt summary"

# Hydra's own overrides change where a run is written, not what it measures: never a
# column (nor are config.EXECUTION_KEYS).
IGNORED_PREFIX = "hydra."

METRICS = ("loss/train", "loss/test", "acc/train", "acc/test")
# Column -> (per-layer quantity, "first" or "last"): first layer over last (the head),
# at step 0 and at the last logged step. Short names: they are headers and --sort keys.
RATIOS = {
    "grad/0": ("grad_norm", "first"),
    "grad/last": ("grad_norm", "last"),
    "bwd/0": ("signal_bwd", "first"),
    "bwd/last": ("signal_bwd", "last"),
}
# Recurrent runs: the first unrolled layer's ||dL/dh_t|| at its first sampled time step
# over its last (summary.json's time[0].ratio), at step 0 and at the last logged step.
TIME_RATIOS = {"time/0": "first", "time/last": "last"}
CAPTION = (
    "grad, bwd: first layer / last layer of the parameter-gradient norm and of the backward"
    " signal, at step 0 and at the last logged step"
)
TIME_CAPTION = "; time: ||dL/dh|| at the first time step / at the last (recurrent runs)"
# A run name folded to fit a terminal keeps at least this many characters a line.
MIN_NAME_WIDTH = 12

NUMERIC = ("steps", *METRICS, *RATIOS, *TIME_RATIOS)
# --by: runs whose settings differ only in this key are repeats of one setting, a row
# together; "none" gives every run its own row.
DEFAULT_BY = "seed"
NO_GROUPS = "none"
# A grouped report's column of runs per group; its CSV adds, per number column, these.
COUNT = "n"
SPREAD_COLUMNS = ("min", "max", "n")
GROUP_CAPTION = (
    "; a group of runs: each number the median (min-max) over its runs, n=K when only"
    " K of them have one"
)
# Keys a summary has beyond its status, except a failed run's (that stopped before training).
EXPECTED_KEYS = ("steps", "metrics", "layers", "verdicts")

STATUS_STYLE = {
    "completed": "green",
    "diverged": "bold red",
    "failed": "bold red",
    "interrupted": "yellow",
    NO_SUMMARY: "yellow",
    CORRUPT_SUMMARY: "bold red",
}

# The --png grid: panels per row, inches per panel, the legend strip under the panels.
PANELS_PER_ROW = 4
PANEL_WIDTH, PANEL_HEIGHT, LEGEND_HEIGHT, DPI = 4.0, 3.5, 0.5, 100
# Table rows (runs, or groups of runs) drawn a panel each at most (6 rows of panels:
# 1600 x 2150 px). A panel costs ~0.1 s of matplotlib layout and text, and the pixels grow
# with the panels: 200 runs took 20-50 s and ~550 MB for a 1600 x 17550 px grid. More
# get one summary figure instead.
MAX_PANELS = 24
# The summary figure, inches, whatever the number of runs: 2 x 2 panels (quantity x
# step), a line per run in each.
SUMMARY_SIZE = (12.0, 9.0)
# Values of the summary's colour key named in a legend at most; more get a colour bar,
# with at most MAX_COLORBAR_LABELS of them labelled.
MAX_LEGEND_VALUES = 10
MAX_COLORBAR_LABELS = 12
TITLE_CHARS = 48
# Line style per quantity, color per step (viridis ends, as in the per-run figure).
FLOW_LINES = (("signal_bwd", "-", "backward signal"), ("grad_norm", "--", "‖∂L/∂W‖"))
# Both quantities are drawn relative to the run's head (the last layer) at the same step:
# dimensionless, so they share one log axis, and every panel shares it.
RELATIVE_LABEL = "÷ the head's (log scale)"
RELATIVE_DEPTH = "relative depth (first layer 0 → head 1)"
FLOW_STEPS = (("first", 0.0, "step 0"), ("last", figures.CMAP_TOP, "last step"))


@dataclass
class RunRow:
    """One run directory, as the report reads it.

    Attributes:
        name: the run's path relative to the report's common root.
        path: the run directory.
        overrides: the run's command-line overrides, key -> value, in their order.
        summary: summary.json; None when it is missing or unreadable.
        status: the summary's status, or "no summary" / "corrupt summary".
        problem: what is wrong with, or notable about, the run in one line; None if nothing.
    """

    name: str
    path: Path
    overrides: dict[str, str]
    summary: dict[str, Any] | None
    status: str
    problem: str | None


@dataclass
class Group:
    """Runs whose settings are equal but for one key (--by): one row of the report.

    Attributes:
        name: the group's overrides and ``<by>=*``, under the runs' common folder; a
            group of one run has the run's name.
        runs: the runs, in path order.
        by: the pooled key.
    """

    name: str
    runs: list[RunRow]
    by: str


# A row of the report: a run, or a group of runs (which shows as its run when alone).
Row = RunRow | Group


def _runs(row: Row) -> list[RunRow]:
    return row.runs if isinstance(row, Group) else [row]


def _is_run(filenames: list[str], dirnames: list[str]) -> bool:
    return (
        SUMMARY_FILE in filenames
        or ".hydra" in dirnames
        or any(f.startswith(EVENTS_PREFIX) for f in filenames)
    )


def find_runs(paths: Iterable[Path | str]) -> list[Path]:
    """Every run directory at or below the paths: one with summary.json, .hydra/ or events.

    Args:
        paths: run directories, sweep directories or whole ``outputs/`` trees.

    Returns:
        The run directories as absolute paths, each once, sorted.

    Raises:
        ValueError: a path is not a directory, or no path holds any run.
    """
    paths = [Path(p) for p in paths]
    found: set[Path] = set()
    for path in paths:
        if not path.is_dir():
            raise ValueError(f"{path}: {'not a directory' if path.exists() else 'no such path'}")
        for dirpath, dirnames, filenames in os.walk(path):
            if _is_run(filenames, dirnames):
                found.add(Path(os.path.abspath(dirpath)))
                dirnames.clear()  # a run holds no other run
            else:
                # Hidden folders (.git, caches) hold no runs and may be large.
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    if not found:
        where = ", ".join(map(str, paths))
        raise ValueError(
            f"no runs under {where} (a run directory holds summary.json, .hydra/"
            " or a TensorBoard event file)"
        )
    return sorted(found)


def common_root(runs: Sequence[Path]) -> Path:
    """The directory the run names are relative to: the runs' common ancestor."""
    root = Path(os.path.commonpath(runs))
    # A single run (or one nested in another) would be named "."; name it by its folder.
    return root.parent if root in runs else root


def read_overrides(run: Path) -> dict[str, str]:
    """The run's overrides from .hydra/overrides.yaml, key -> value; {} when there is none.

    Raises:
        ValueError: the file exists but is not a YAML list of strings.
    """
    path = run / OVERRIDES_FILE
    if not path.exists():
        return {}
    try:
        items = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # OSError or any YAML error: a damaged file is a note, not a crash
        raise ValueError(f"unreadable {OVERRIDES_FILE.as_posix()}: {type(e).__name__}") from e
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"{OVERRIDES_FILE.as_posix()} is not a list of key=value")
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        overrides[key.lstrip("+")] = value  # +key=value and ++key=value add or force a key
    return overrides


CONFIG_FILE = Path(".hydra") / "config.yaml"


@functools.lru_cache(maxsize=4096)
def _job_config(run: Path) -> dict[str, Any] | None:
    """The run's composed config (.hydra/config.yaml), None when missing or unreadable.
    Read only for a key a run did not set on its command line (a sweep whose runs all
    set the same keys reads none)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        loaded = yaml.load((run / CONFIG_FILE).read_text(), Loader=loader)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _as_override(value: Any) -> str:
    """A config value written as an override would write it: true, 0.01, [1, 2]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_as_override(v) for v in value) + "]"
    return str(value)


def setting(row: RunRow, key: str) -> str | None:
    """The run's value of ``key``: its override, else what its composed config says (the
    effective default: init=normal for a run that did not set init), else None (the run
    has no such key: an LSTM's model.depth)."""
    if key in row.overrides:
        return row.overrides[key]
    config = _job_config(row.path)
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, dict):  # a config group: its option's name (init -> normal)
        node = node.get("name")
    return None if node is None else _as_override(node)


def _describe(summary: dict[str, Any]) -> str | None:
    """The note for a run with a readable summary, or None when it needs none."""
    status = summary["status"]
    if status == "failed":
        return f"failed: {summary.get('error') or 'no error recorded'}"
    if status == "interrupted" and summary.get("steps") == 0 and summary.get("error"):
        return f"not started: {summary['error']}"  # a job of a stopped sweep
    missing = [k for k in EXPECTED_KEYS if k not in summary]
    if missing:
        return f"summary.json lacks {', '.join(missing)}"
    if status == "diverged":
        where = summary.get("nonfinite") or {}
        return (
            f"diverged: non-finite at step {where.get('step', '?')}"
            f" in layer {where.get('layer') or '?'}"
        )
    if status == "interrupted":
        return f"interrupted after {summary['steps']} steps"
    return None


def load_run(path: Path, root: Path | None = None) -> RunRow:
    """Read one run directory; never raises for what a run left behind.

    Args:
        path: the run directory.
        root: the directory its name is relative to; None names it by its folder.

    Returns:
        The run's row. ``problem`` says what is wrong: no summary.json (killed or still
        running), a summary that is not JSON or has no status, a failed, diverged or
        interrupted run, missing keys, a damaged overrides file.
    """
    path = Path(path)
    name = path.name if root is None else path.relative_to(root).as_posix()
    problems = []
    try:
        overrides = read_overrides(path)
    except ValueError as e:
        overrides = {}
        problems.append(str(e))
    summary, status = None, NO_SUMMARY
    file = path / SUMMARY_FILE
    if not file.exists():
        problems.insert(0, "no summary.json: the run was killed, or is still running")
    else:
        status = CORRUPT_SUMMARY
        try:
            loaded = json.loads(file.read_text())
        except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
            problems.insert(0, f"summary.json unreadable: {type(e).__name__}: {e}")
        else:
            if isinstance(loaded, dict) and isinstance(loaded.get("status"), str):
                summary, status = loaded, loaded["status"]
                note = _describe(summary)
                if note:
                    problems.insert(0, note)
            else:
                problems.insert(0, "summary.json has no status")
    return RunRow(name, path, overrides, summary, status, "; ".join(problems) or None)


def load_runs(paths: Iterable[Path | str]) -> list[RunRow]:
    """find_runs, then load_run of each, named relative to their common root."""
    runs = find_runs(paths)
    root = common_root(runs)
    return [load_run(run, root) for run in runs]


def varying(rows: Sequence[RunRow]) -> list[str]:
    """The override keys whose value is not the same in all runs: a run that did not set
    the key counts with its effective value (see ``setting``), one without the key as
    missing.

    Returns:
        The keys in the order they first appear; never hydra.* or execution-only keys.
    """
    keys = dict.fromkeys(k for row in rows for k in row.overrides)
    return [
        k
        for k in keys
        if k not in EXECUTION_KEYS
        and not k.startswith(IGNORED_PREFIX)
        and len({setting(row, k) for row in rows}) > 1
    ]


def group_runs(rows: Sequence[RunRow], by: str) -> list[Group]:
    """The runs in groups whose settings are equal but for ``by``: the same effective
    value (see ``setting``) of every varying override except ``by``.

    Returns:
        The groups, in the order of their first run.
    """
    keys = [k for k in varying(rows) if k != by]
    members: dict[tuple[str | None, ...], list[RunRow]] = {}
    for row in rows:
        members.setdefault(tuple(setting(row, k) for k in keys), []).append(row)
    return [Group(_group_name(runs, keys, by), runs, by) for runs in members.values()]


def _group_name(runs: list[RunRow], keys: Sequence[str], by: str) -> str:
    """A group's name: ``init=normal,seed=*`` under its runs' common folder, if any."""
    if len(runs) == 1:
        return runs[0].name
    shown = [f"{k}={v}" for k in keys if (v := setting(runs[0], k)) is not None]
    # Common folders, compared whole: sweep/0_a and sweep/1_a share sweep, not sweep/.
    folder = os.path.commonprefix([row.name.split("/")[:-1] for row in runs])
    return "/".join([*folder, ",".join([*shown, f"{by}=*"])])


def table_columns(rows: Sequence[RunRow], by: str | None = None) -> list[str]:
    """The report's columns: run, the varying overrides, status, steps, metrics, ratios,
    the time ratios (when a run is recurrent), verdicts, outcome (learned or not).
    Grouped by ``by`` (see group_runs): without that key, and with n (runs a group has)
    before status."""
    recurrent = any(_field(row.summary, "time", 0) is not None for row in rows)
    time = list(TIME_RATIOS) if recurrent else []
    keys = [k for k in varying(rows) if k != by]
    count = [] if by is None else [COUNT]
    return [
        "run", *keys, *count, "status", "steps", *METRICS, *RATIOS, *time, "verdicts", "outcome"
    ]  # fmt: skip


def _field(obj: Any, *keys: str | int) -> Any:
    """obj[k1][k2]..., or None where a key is missing or a value has the wrong type."""
    for key in keys:
        if isinstance(key, int):
            if not isinstance(obj, list) or not -len(obj) <= key < len(obj):
                return None
        elif not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _number(x: Any) -> int | float | None:
    # bool is an int to Python but never a measurement; NaN and inf are stored as null.
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return x if math.isfinite(x) else None


def verdict_kinds(summary: dict[str, Any] | None) -> list[str]:
    """The kinds of the run's verdicts, each once, in order."""
    verdicts = _field(summary, "verdicts")
    if not isinstance(verdicts, list):
        return []
    return list(dict.fromkeys(k for v in verdicts if isinstance(k := _field(v, "kind"), str)))


def row_values(row: RunRow, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Every column's value for the run: str, int, float or None (missing).

    ``keys``: the override columns shown; a key the run did not set gets its effective
    value from the run's composed config. Keys the run does not have at all are absent
    from the dict, i.e. missing.
    """
    s = row.summary
    values: dict[str, Any] = {"run": row.name, **row.overrides}
    values["status"] = row.status
    values["steps"] = _number(_field(s, "steps"))
    for metric in METRICS:
        values[metric] = _number(_field(s, "metrics", metric))
    for column, (quantity, when) in RATIOS.items():
        first = _number(_field(s, "layers", 0, quantity, when))
        last = _number(_field(s, "layers", -1, quantity, when))
        values[column] = ratio(first, last)
    for column, when in TIME_RATIOS.items():
        values[column] = _number(_field(s, "time", 0, "ratio", when))
    values["verdicts"] = ",".join(verdict_kinds(s)) or None
    kind = _field(s, "outcome", "kind")
    values["outcome"] = kind if isinstance(kind, str) else None
    for key in keys or ():
        if key not in values and (value := setting(row, key)) is not None:
            values[key] = value  # the effective value of a key the run did not set
    return values


@dataclass(frozen=True)
class Spread:
    """A number column over a group's runs: the median, min and max of the values there
    are (a diverged run has no loss/test), how many there are, of how many runs."""

    median: float
    low: float
    high: float
    count: int
    runs: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread | None:
        present = [v for v in values if v is not None]
        if not present:
            return None
        median = statistics.median(present)
        return cls(median, min(present), max(present), len(present), len(values))


@dataclass(frozen=True)
class Counts:
    """A text column over a group's runs: how many runs have each value, most first."""

    counts: tuple[tuple[str, int], ...]
    runs: int

    @classmethod
    def of(cls, values: Iterable[str], runs: int) -> Counts | None:
        # most_common keeps the order of first appearance among equal counts
        counts = tuple(Counter(values).most_common())
        return cls(counts, runs) if counts else None

    def parts(self) -> list[tuple[str, str]]:
        """(value, "value k/n") for each value."""
        return [(value, f"{value} {k}/{self.runs}") for value, k in self.counts]

    def __str__(self) -> str:
        return ", ".join(text for _, text in self.parts())


def group_values(group: Group, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Every column's value for a group: its run's own (row_values) and n=1 when alone,
    else the runs' shared overrides, the group's name, n, a Spread per number column, and
    Counts of the statuses, verdict kinds (each counted once a run) and outcomes."""
    runs = [row_values(row, keys) for row in group.runs]
    if len(runs) == 1:
        return {**runs[0], COUNT: 1}
    values = {**runs[0], "run": group.name, COUNT: len(runs)}
    values.pop(group.by, None)  # differs between the runs: not one value
    values["status"] = Counts.of((r["status"] for r in runs), len(runs))
    for column in NUMERIC:
        values[column] = Spread.of([r[column] for r in runs])
    kinds = (kind for row in group.runs for kind in verdict_kinds(row.summary))
    values["verdicts"] = Counts.of(kinds, len(runs))
    values["outcome"] = Counts.of((r["outcome"] for r in runs if r["outcome"]), len(runs))
    return values


def _values(row: Row, keys: Sequence[str] | None = None) -> dict[str, Any]:
    return group_values(row, keys) if isinstance(row, Group) else row_values(row, keys)


def _sort_key(value: Any) -> tuple[int, float, str]:
    # Numbers by value, override values that read as numbers too (lr=0.01 < lr=0.1,
    # model.depth=5 < model.depth=20), then text; a group's numbers by their median.
    if isinstance(value, Spread):
        return (0, value.median, "")
    if isinstance(value, Counts):
        return (1, 0.0, str(value))
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return (1, 0.0, value)
        return (0, number, "") if math.isfinite(number) else (1, 0.0, value)
    return (0, value, "")


def sort_rows(rows: Sequence[Row], key: str, descending: bool = False) -> list[Row]:
    """The rows sorted by one column; ties keep their order, missing values go last.

    Args:
        rows: the runs, or groups of runs (sorted by their median, for a number).
        key: a column name (see table_columns).
        descending: largest first (missing values still last).
    """
    present, missing = [], []
    for row in rows:
        value = _values(row, [key]).get(key)
        (missing if value is None else present).append((value, row))
    present.sort(key=lambda pair: _sort_key(pair[0]), reverse=descending)
    return [row for _, row in present + missing]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Spread):
        return " ".join(filter(None, _spread_text(value)))
    return _fmt(value) if isinstance(value, float) else str(value)


def _spread_text(value: Spread) -> tuple[str, str]:
    """The median; "(min-max)" (none when they read the same) and "n=K" when only K of
    the group's runs have a value."""
    median, low, high = (_cell(v) for v in (value.median, value.low, value.high))
    spread = [] if low == high else [f"({low}-{high})"]
    if value.count < value.runs:
        spread.append(f"n={value.count}")
    return median, " ".join(spread)


def _rich_counts(counts: Counts, styles: dict[str, str], default: str) -> Text:
    return Text(", ").join(Text(text, style=styles.get(v, default)) for v, text in counts.parts())


def _rich_cell(column: str, value: Any) -> Text:
    if isinstance(value, Spread):
        # The range under the median: the column only as wide as the range.
        median, spread = _spread_text(value)
        return Text("\n").join(
            [Text(median), Text(spread, style="dim")] if spread else [Text(median)]
        )
    if isinstance(value, Counts) and column in ("status", "verdicts"):
        style = STATUS_STYLE if column == "status" else VERDICT_STYLE
        return _rich_counts(value, style, "" if column == "status" else "bold")
    if column == "status":
        return Text(_cell(value), style=STATUS_STYLE.get(value, ""))
    if column == "verdicts" and value is not None:
        kinds = value.split(",")
        parts = [(k, VERDICT_STYLE.get(k, "bold")) for k in kinds]
        return Text(",").join(Text(k, style=style) for k, style in parts)
    # Text, not markup: an override value like model.blocks=[2,2] is not a style.
    return Text(_cell(value))


def _grouped(rows: Sequence[Row]) -> bool:
    return any(isinstance(row, Group) for row in rows)


def rich_table(
    rows: Sequence[Row], columns: Sequence[str], title: str = "", width: int | None = None
) -> Table:
    """The report as a rich table, one row per run or group, numbers as in the per-layer
    table.

    Args:
        rows: the runs, or groups of runs, in the order to show.
        columns: the columns (see table_columns); the first is the run's name.
        title: the table's title; none when empty.
        width: the width to fit in, if any: the run names are folded first (the
            override columns say what each run is), then every column shrinks.
    """
    grouped = _grouped(rows)
    caption = CAPTION + (TIME_CAPTION if "time/0" in columns else "")
    table = Table(title=title or None, caption=caption + (GROUP_CAPTION if grouped else ""))
    for column in columns:
        # Headers broken at "/" and "." ("acc/" over "test"): columns as narrow as
        # their values.
        header = column.replace("/", "/\n").replace(".", ".\n")
        if column in NUMERIC or column == COUNT:
            table.add_column(header, justify="right", no_wrap=True)
        else:
            table.add_column(header, overflow="fold")
    for row in rows:
        values = _values(row, columns)
        table.add_row(*(_rich_cell(c, values.get(c)) for c in columns))
    if width is not None:
        excess = natural_width(table) - width
        longest = max((len(row.name) for row in rows), default=0)
        if excess > 0 and longest > MIN_NAME_WIDTH:
            table.columns[0].max_width = max(MIN_NAME_WIDTH, longest - excess)
    return table


def natural_width(table: Table) -> int:
    """How wide the table is when nothing is folded."""
    console = Console(width=10**4)
    return console.measure(table).maximum


def _spread_cells(value: Any) -> list[Any]:
    """A number column's CSV cells in a grouped report: median, min, max, values."""
    if value is None:
        return ["", "", "", 0]
    if isinstance(value, Spread):
        return [value.median, value.low, value.high, value.count]
    return [value, value, value, 1]  # a group of one run


def write_csv(path: Path, rows: Sequence[Row], columns: Sequence[str]) -> None:
    """The report as CSV: a header, one line per run, numbers at full precision, missing
    values empty. Grouped (rows of Group), each number column ``c`` is four: ``c`` (the
    median), ``c_min``, ``c_max`` and ``c_n`` (the runs with a value). Makes parent
    directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spread = [c for c in columns if c in NUMERIC] if _grouped(rows) else []
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    header = []
    for c in columns:
        header += [c, *(f"{c}_{s}" for s in SPREAD_COLUMNS)] if c in spread else [c]
    writer.writerow(header)
    for row in rows:
        values = _values(row, columns)
        cells = []
        for c in columns:
            value = values.get(c)
            cells += _spread_cells(value) if c in spread else ["" if value is None else value]
        writer.writerow(cells)
    write_text_atomic(path, text.getvalue())  # a reader never sees half a table


def markdown_table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """The report as a Markdown table, numbers formatted as in the rich table."""

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    numeric = (*NUMERIC, COUNT)
    align = "|" + "".join("---:|" if c in numeric else "---|" for c in columns)
    body = [line(_cell(_values(row, columns).get(c)) for c in columns) for row in rows]
    return "\n".join([line(columns), align, *body])


def write_markdown(path: Path, rows: Sequence[Row], columns: Sequence[str]) -> None:
    """markdown_table written to a file, making parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, markdown_table(rows, columns) + "\n")


def panel_title(row: RunRow, keys: Sequence[str]) -> str:
    """A run's --png panel title: its varying overrides (else its name), then status and
    verdict kinds."""
    shown = " ".join(f"{k}={v}" for k in keys if (v := setting(row, k)) is not None)
    learned = _field(row.summary, "outcome", "kind")
    kinds = ",".join(verdict_kinds(row.summary)) + (
        f"; {learned}" if isinstance(learned, str) else ""
    )
    outcome = ": ".join([row.status, *filter(None, [kinds])])
    return "\n".join([textwrap.fill(shown or row.name, TITLE_CHARS), outcome])


def group_title(group: Group, keys: Sequence[str]) -> str:
    """A group's --png panel title: its overrides (else its name); n and the status
    counts; the verdict and outcome counts. A group of one run: the run's (panel_title)."""
    if len(group.runs) == 1:
        return panel_title(group.runs[0], keys)
    values = group_values(group)
    first = group.runs[0]
    shown = " ".join(
        f"{k}={v}" for k in keys if k != group.by and (v := setting(first, k)) is not None
    )
    counts = "; ".join(str(values[c]) for c in ("verdicts", "outcome") if values[c] is not None)
    lines = [shown or group.name, f"n={values[COUNT]} over {group.by}: {values['status']}", counts]
    return "\n".join(textwrap.fill(line, TITLE_CHARS) for line in lines if line)


def grid_shape(panels: int) -> tuple[int, int]:
    """(rows, columns) of the --png grid for this many panels."""
    columns = min(max(panels, 1), PANELS_PER_ROW)
    return math.ceil(max(panels, 1) / columns), columns


def _to_head(values: list[float | None]) -> list[float | None]:
    """Each layer's value over the head's (the last layer's); None where either is
    missing or the head's is not positive."""
    head = values[-1] if values else None
    if head is None or not head > 0 or not math.isfinite(head):
        return [None] * len(values)
    return [None if v is None else v / head for v in values]


def _layer_names(layers: list[Any]) -> list[str]:
    return [str(_field(layer, "name") or i) for i, layer in enumerate(layers)]


def _relative_depth(n: int) -> list[float]:
    # first layer 0, head 1: nets of different depths end together
    return [i / (n - 1) if n > 1 else 1.0 for i in range(n)]


def flow_grid_figure(rows: Sequence[Row], keys: Sequence[str]) -> Figure:
    """Every run's gradient flow, a small panel per run (or group of runs, each of its
    runs drawn in it), in the rows' order.

    Each panel: x = layer in depth order (the relative depth for a group of nets of
    different depths); y = the backward signal (solid) and the parameter-gradient norm
    (dashed), each over the head's, at step 0 and at the last logged step (summary.json's
    ``layers``), on one log axis shared by every panel. A run or group without layers gets
    an empty panel saying so.

    Args:
        rows: the runs, or groups of runs.
        keys: the override keys to title the panels with (see varying).

    Returns:
        A matplotlib Figure on an Agg canvas: PANEL_WIDTH x PANEL_HEIGHT inches a panel,
        PANELS_PER_ROW to a row, plus LEGEND_HEIGHT, at DPI.

    Raises:
        ImportError: matplotlib is missing or broken.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = grid_shape(len(rows))
    size = (PANEL_WIDTH * n_cols, PANEL_HEIGHT * n_rows + LEGEND_HEIGHT)
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).flatten()
    cmap = colormaps["viridis"]
    for ax, row in zip(axes, rows):
        title = group_title(row, keys) if isinstance(row, Group) else panel_title(row, keys)
        ax.set_title(title, fontsize=8)
        drawn = []
        for run in _runs(row):
            layers = _field(run.summary, "layers")
            if isinstance(layers, list) and layers:
                drawn.append(layers)
        if not drawn:
            ax.set_axis_off()
            status = _values(row)["status"]
            ax.text(0.5, 0.5, f"no layers ({status})", ha="center", va="center")
            continue
        names = {tuple(_layer_names(layers)) for layers in drawn}
        for layers in drawn:
            x = range(len(layers)) if len(names) == 1 else _relative_depth(len(layers))
            for quantity, style, label in FLOW_LINES:
                for when, shade, step_label in FLOW_STEPS:
                    ys = _to_head([_number(_field(layer, quantity, when)) for layer in layers])
                    ax.plot(
                        x,
                        figures._positive(ys),
                        style,
                        color=cmap(shade),
                        lw=1.3,
                        # a group's runs: where they agree, their lines read darker
                        alpha=1.0 if len(drawn) == 1 else 0.6,
                        marker=figures._marker(len(layers)),
                        ms=2,
                        label=f"{label}, {step_label}",
                    )
        if len(names) == 1:
            figures._layer_ticks(ax, list(names.pop()))
        else:
            ax.set_xlim(-0.02, 1.02)
            ax.set_xlabel(RELATIVE_DEPTH)
        ax.xaxis.label.set_fontsize(7)
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    with_lines = [ax for ax in axes[: len(rows)] if ax.get_lines()]
    figures.finish_log_axes(with_lines)  # one range: the panels compare
    for i, ax in enumerate(axes[: len(rows)]):
        if ax in with_lines and i % n_cols == 0:
            ax.set_ylabel(RELATIVE_LABEL, fontsize=8)
    for ax in axes[len(rows) :]:
        ax.remove()
    handles = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            handles.setdefault(line.get_label(), line)
    if handles:
        fig.legend(handles=list(handles.values()), loc="outside lower center", ncols=4, fontsize=8)
    return fig


def flow_grid_png(rows: Sequence[Row], keys: Sequence[str], path: Path) -> None:
    """flow_grid_figure written as a PNG, making parent directories.

    Raises:
        ImportError: matplotlib is missing or broken.
    """
    figures.save_png(flow_grid_figure(rows, keys), path)


def color_key(keys: Sequence[str], sort: str | None = None) -> str | None:
    """The override key the --png summary colours its lines by: the --sort key when it is
    one of the varying keys, else the first of them; None (colour by status) when none."""
    if sort in keys:
        return sort
    return keys[0] if keys else None


def _color_value(row: RunRow, key: str | None) -> str | None:
    return row.status if key is None else setting(row, key)


def _value_order(value: str | None) -> tuple[int, tuple[int, float, str]]:
    # As the table sorts: numbers by value, then text, missing last.
    return (1, (0, 0.0, "")) if value is None else (0, _sort_key(value))


def flow_summary_figure(rows: Sequence[RunRow], color_by: str | None) -> Figure:
    """Every run's gradient flow in one figure of a fixed size: the --png of a large tree.

    Four panels: the backward signal and the parameter-gradient norm (rows) at step 0 and
    at the last logged step (columns), each with one line per run (summary.json's
    ``layers``), each over the run's head's, on one log y range shared by the four. x
    is the layer index when every run has the same layers, else
    the relative depth (first layer 0, head 1), so runs of different depths end
    together. Lines are coloured by the run's value of ``color_by``: a legend for up to
    MAX_LEGEND_VALUES values, a colour bar beyond. Each line's gid is its run's name.
    Runs without layers (failed, killed) are counted in the title, by status.

    Args:
        rows: the runs, drawn in this order (later ones on top).
        color_by: the override key to colour by (see color_key); None colours by status.

    Returns:
        A matplotlib Figure on an Agg canvas, SUMMARY_SIZE inches at DPI.

    Raises:
        ImportError: matplotlib is missing or broken.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    drawn = []
    for row in rows:
        layers = _field(row.summary, "layers")
        if isinstance(layers, list) and layers:
            drawn.append((row, layers))
    names = [_layer_names(layers) for _, layers in drawn]
    same_layers = len({tuple(n) for n in names}) <= 1

    values = sorted({_color_value(row, color_by) for row, _ in drawn}, key=_value_order)
    if len(values) <= MAX_LEGEND_VALUES:
        palette = colormaps["tab10"].colors
        colors = {v: palette[i] for i, v in enumerate(values)}
    else:
        viridis = colormaps["viridis"]
        top = len(values) - 1
        colors = {v: viridis(figures.CMAP_TOP * i / top) for i, v in enumerate(values)}
    # Many lines: fainter, so that where they pile up reads darker.
    alpha = min(0.9, max(0.25, 8 / math.sqrt(max(len(drawn), 1))))

    fig = Figure(figsize=SUMMARY_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(FLOW_LINES), len(FLOW_STEPS), squeeze=False)
    titles = {key: title for key, title, _ in figures.PANELS}
    for r, (quantity, _, _) in enumerate(FLOW_LINES):
        for c, (when, _, step_label) in enumerate(FLOW_STEPS):
            ax = grid[r][c]
            for row, layers in drawn:
                n = len(layers)
                x = range(n) if same_layers else _relative_depth(n)
                ys = _to_head([_number(_field(layer, quantity, when)) for layer in layers])
                ax.plot(
                    x,
                    figures._positive(ys),
                    color=colors[_color_value(row, color_by)],
                    lw=0.9,
                    alpha=alpha,
                    marker="o" if n == 1 else None,
                    ms=3,
                    gid=row.name,
                )
            ax.set_title(f"{titles[quantity]}, {step_label}", fontsize=10)
            if drawn and same_layers:
                figures._layer_ticks(ax, names[0])
            else:
                ax.set_xlim(-0.02, 1.02)
                ax.set_xlabel(RELATIVE_DEPTH)
            if r < len(FLOW_LINES) - 1:
                ax.tick_params(axis="x", labelbottom=False)
                ax.set_xlabel("")
            if c == 0:
                ax.set_ylabel(RELATIVE_LABEL)
            ax.grid(True, which="major", alpha=0.3)
    # One log y range for the four panels: both quantities are ratios to the head.
    figures.finish_log_axes([ax for ax in grid.flatten() if ax.get_lines()])

    def label(value: str | None) -> str:
        shown = "-" if value is None else value
        return shown if color_by is None else f"{color_by}={shown}"

    if len(values) <= MAX_LEGEND_VALUES:
        handles = [Line2D([], [], color=colors[v], lw=2, label=label(v)) for v in values]
        if handles:
            fig.legend(
                handles=handles,
                loc="outside lower center",
                ncols=min(len(handles), 5),
                fontsize=9,
            )
    else:
        cmap = ListedColormap([colors[v] for v in values])
        norm = BoundaryNorm(range(len(values) + 1), len(values))
        bar = fig.colorbar(ScalarMappable(norm, cmap), ax=grid.ravel().tolist(), aspect=40)
        stride = math.ceil(len(values) / MAX_COLORBAR_LABELS)
        shown = list(range(0, len(values), stride))
        if shown[-1] != len(values) - 1:  # the last value always labelled, as the head is
            if len(values) - 1 - shown[-1] < stride / 2:
                shown.pop()
            shown.append(len(values) - 1)
        labels = ["-" if values[i] is None else values[i] for i in shown]
        bar.set_ticks([i + 0.5 for i in shown], labels=labels)
        bar.minorticks_off()
        bar.ax.tick_params(labelsize=8)
        bar.set_label("status" if color_by is None else color_by)

    by = "status" if color_by is None else color_by
    title = f"{len(rows)} runs: one line per run, coloured by {by}"
    if not same_layers:
        depths = [len(ls) for _, ls in drawn]
        title += f" (depths {min(depths)} to {max(depths)} layers)"
    with_layers = {id(row) for row, _ in drawn}
    missing = [row.status for row in rows if id(row) not in with_layers]
    if missing:
        counts = ", ".join(f"{n} {s}" for s, n in Counter(missing).items())
        title += f"\n{len(missing)} not drawn, no per-layer data: {counts}"
    fig.suptitle(title, fontsize=11)
    return fig


def flow_png(
    rows: Sequence[Row], keys: Sequence[str], path: Path, sort: str | None = None
) -> str | None:
    """``--png``: the grid (flow_grid_png) for up to MAX_PANELS rows, else the summary.

    Args:
        rows: the runs, or groups of runs, in the table's order.
        keys: the varying override keys (see varying), a grouped report's without the
            pooled key: the summary colours by one of them, the same for a group's runs.
        path: the PNG to write; parent directories are made.
        sort: the --sort key, if any: the summary colours by it when it is in ``keys``.

    Returns:
        None for the grid; for the summary, the line to tell the user what was drawn.

    Raises:
        ImportError: matplotlib is missing or broken.
    """
    if len(rows) <= MAX_PANELS:
        flow_grid_png(rows, keys, path)
        return None
    runs = [run for row in rows for run in _runs(row)]
    by = color_key(keys, sort)
    figures.save_png(flow_summary_figure(runs, by), path)
    how = "status" if by is None else f"{by} (--sort KEY colours by another override)"
    what = f"{len(rows)} groups of {len(runs)} runs" if _grouped(rows) else f"{len(runs)} runs"
    return (
        f"{path}: {what}, more than {MAX_PANELS}: one summary figure, a line per run"
        f" coloured by {how}; each run's own figure is its {FIGURE_FILE}"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradexp report",
        description="Compare finished runs: one row per run (runs that differ only in"
        " their seed: one row, see --by), the overrides that differ between them, status,"
        " steps, final loss and accuracy, the first-layer/head ratios of gradient norm and"
        " backward signal at step 0 and at the last logged step, and the verdicts.",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="a run directory, a sweep (multirun) directory, or a whole outputs/ tree",
    )
    parser.add_argument(
        "--by",
        metavar="KEY",
        help="one row for each group of runs whose settings differ only in this override"
        " key: n, each number as the median (min-max) over the group's runs, status,"
        f" verdicts and outcome as counts; {NO_GROUPS}: a row per run (default:"
        f" {DEFAULT_BY})",
    )
    parser.add_argument(
        "--sort",
        metavar="KEY",
        help="sort by this column: any column name, e.g. acc/test, status, or an override"
        " key such as init; numbers by value (a group's by its median), missing values"
        " last (default: by path)",
    )
    parser.add_argument(
        "--desc", action="store_true", help="sort in descending order (missing values last)"
    )
    parser.add_argument(
        "--csv", type=Path, metavar="FILE", help="also write the table as CSV (full precision)"
    )
    parser.add_argument(
        "--markdown", type=Path, metavar="FILE", help="also write the table as Markdown"
    )
    parser.add_argument(
        "--png",
        type=Path,
        metavar="FILE",
        help="also draw every run's gradient flow (needs matplotlib): up to"
        f" {MAX_PANELS} rows, one panel each (a group's runs together), {PANELS_PER_ROW} to"
        f" a row; more rows, one {SUMMARY_SIZE[0] * DPI:.0f} x {SUMMARY_SIZE[1] * DPI:.0f}"
        " px summary instead,"
        " whatever their number: a line per run in each panel, coloured by the --sort key"
        " when it is an override that differs, else by the first such override (a line"
        " after the table says which)",
    )
    return parser


def _error(message: str) -> int:
    print(f"gradexp: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """``gradexp report``: print the table, write the files asked for.

    Args:
        argv: the arguments after ``report``; None reads sys.argv.

    Returns:
        The exit status: 0, or 2 for bad input (no runs, a missing path, an unknown
        --by or --sort key, a file that cannot be written), with one line on stderr.
    """
    args = _parser().parse_args(argv)
    try:
        rows = load_runs(args.paths)
    except ValueError as e:
        return _error(str(e))
    by = DEFAULT_BY if args.by is None else args.by
    if args.by not in (None, NO_GROUPS) and all(setting(row, by) is None for row in rows):
        choices = ", ".join([*varying(rows), NO_GROUPS])
        return _error(f"--by {by}: no run has this key; choose from {choices}")
    groups = [] if by == NO_GROUPS else group_runs(rows, by)
    # Nothing pooled: a row per run, as without --by.
    pooled = any(len(group.runs) > 1 for group in groups)
    shown: Sequence[Row] = groups if pooled else rows
    columns = table_columns(rows, by if pooled else None)
    if args.sort is not None and args.sort not in columns:
        if pooled and args.sort == by:
            return _error(
                f"--sort {by}: the runs are grouped over {by}, one row a group;"
                f" --by {NO_GROUPS} shows a row per run"
            )
        return _error(f"--sort {args.sort}: unknown column; choose from {', '.join(columns)}")
    if args.sort is not None or args.desc:
        shown = sort_rows(shown, args.sort or "run", args.desc)

    root = common_root([row.path for row in rows])
    title = f"{len(rows)} run(s) in {root}"
    if pooled:
        title += f", {len(groups)} group(s) over {by}"
    console = Console()
    if console.is_terminal:
        table = rich_table(shown, columns, title, width=console.width)
    else:  # a log or a pipe: the whole table, never folded
        table = rich_table(shown, columns, title)
        console = Console(width=max(console.width, natural_width(table)))
    console.print(table)
    for row in shown:
        for run in _runs(row):
            if run.problem:
                console.print(Text(f"note: {run.name}: {run.problem}"))

    try:
        if args.csv:
            write_csv(args.csv, shown, columns)
        if args.markdown:
            write_markdown(args.markdown, shown, columns)
    except OSError as e:
        return _error(f"cannot write {e.filename}: {e.strerror}")
    if args.png:
        keys = [k for k in varying(rows) if not pooled or k != by]
        # Found is not enough: a broken install is found and fails to import.
        missing = figures.missing_dependency()
        try:
            if not missing and (told := flow_png(shown, keys, args.png, args.sort)):
                print(told)
        except ImportError:
            missing = figures.MISSING
        except OSError as e:
            return _error(f"cannot write {e.filename}: {e.strerror}")
        if missing:
            print(missing, file=sys.stderr)
    return 0
