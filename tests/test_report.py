"""``gradexp report``: a table over many runs, from what they left on disk.

Most tests read a synthetic outputs tree written by hand (shaped like real runs), so
they need no training: a completed run, a diverged one, a failed one, one killed before
it wrote summary.json, and one whose summary.json is truncated. The ``--png`` of a large
tree reads a synthetic sweep of 200 runs (_large_tree).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY, describe, run_cli
from gradexp import report
from gradexp.figures import MISSING

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _layer(index: int, name: str, grad: tuple[Any, Any], bwd: tuple[Any, Any]) -> dict[str, Any]:
    def fl(pair: tuple[Any, Any]) -> dict[str, Any]:
        return {"first": pair[0], "last": pair[1]}

    return {
        "index": index,
        "name": name,
        "grad_norm": fl(grad),
        "signal_bwd": fl(bwd),
        "signal_fwd": fl((1.0, 1.0)),
        "weight_norm": fl((4.0, 4.1)),
        "update_ratio": fl((1e-3, 1e-3)),
        "act_mean": fl((0.5, 0.5)),
        "act_std": fl((0.4, 0.4)),
        "sat_frac": fl((None, None)),
        "dead_frac": fl((0.0, 0.0)),
        "dead_units": None,
    }


def _verdict(kind: str, layer: str | None = "hidden.1") -> dict[str, Any]:
    return {"kind": kind, "layer": layer, "step": 0, "evidence": {}}


def _summary(status: str, metrics: dict[str, Any], layers: list[dict], verdicts: list) -> dict:
    return {
        "status": status,
        "error": None,
        "steps": 40 if status == "completed" else 3,
        "verdicts": verdicts,
        "metrics": metrics,
        "layers": layers,
        "time": [],
        "theory": None,
        "jacobian": None,
        "nonfinite": {"step": 3, "layer": "head"} if status == "diverged" else None,
        "skipped_steps": 0,
        "wall_time_s": 0.5,
        "steps_per_s": 80.0,
        "device": "cpu",
        "notes": [],
    }


COMPLETED = _summary(
    "completed",
    {"loss/train": 1.5, "loss/baseline": 2.3, "acc/train": 0.6, "loss/test": 1.6, "acc/test": 0.5},
    [
        _layer(0, "hidden.0", (1e-4, 2e-4), (1e-3, 4e-3)),
        _layer(1, "hidden.1", (1e-3, 1e-3), (1e-2, 1e-2)),
        _layer(2, "head", (1e-2, 1e-2), (1e-1, 2e-1)),
    ],
    [_verdict("vanishing"), _verdict("dead_units"), _verdict("vanishing", "hidden.0")],
)
# Summaries written before the outcome (DIVERGED here) have none: "-".
COMPLETED["outcome"] = {
    "kind": "partly",
    "ratio": 1.6 / 2.3,
    "loss/test": 1.6,
    "loss/baseline": 2.3,
}
DIVERGED = _summary(
    "diverged",
    {"loss/train": 1e9, "loss/baseline": 2.3, "acc/train": 0.1, "loss/test": None, "acc/test": 0.1},
    [
        _layer(0, "hidden.0", (1e8, None), (1e6, None)),
        _layer(1, "hidden.1", (1e4, None), (1e3, None)),
        _layer(2, "head", (10.0, None), (0.5, None)),
    ],
    [_verdict("diverged", "head"), _verdict("exploding")],
)
FAILED = {"status": "failed", "error": "RuntimeError: out of memory", "steps": 0, "verdicts": []}

# name -> (overrides, summary.json text or None). Every run has init and activation;
# activation is the same everywhere (no column), trainer.device and hydra.* never are.
RUNS: dict[str, tuple[list[str], str | None]] = {
    "0_completed": (
        ["init=normal", "activation=relu", "trainer.device=cpu"],
        json.dumps(COMPLETED),
    ),
    "1_diverged": (
        ["init=kaiming_normal", "activation=relu", "model.depth=16", "trainer.device=cuda"],
        json.dumps(DIVERGED),
    ),
    "2_failed": (
        ["init=xavier_normal", "activation=relu", "hydra.verbose=true"],
        json.dumps(FAILED),
    ),
    "3_killed": (["init=orthogonal", "activation=relu"], None),
    "4_corrupt": (
        ["init=identity", "activation=relu", "model.depth=8"],
        json.dumps(COMPLETED)[:200],
    ),
}
STATUSES = ["completed", "diverged", "failed", "no summary", "corrupt summary"]


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """A multirun tree of the five runs above under tmp_path/outputs."""
    sweep = tmp_path / "outputs" / "multirun" / "2024-01-01" / "12-00-00"
    for name, (overrides, summary) in RUNS.items():
        run = sweep / name
        (run / ".hydra").mkdir(parents=True)
        lines = "".join(f"- {o}\n" for o in overrides)
        (run / ".hydra" / "overrides.yaml").write_text(lines)
        (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (run / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"")
        if summary is not None:
            (run / "summary.json").write_text(summary)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return tmp_path / "outputs"


def test_every_run_has_a_row_with_its_status(outputs: Path) -> None:
    rows = report.load_runs([outputs])
    # named relative to the runs' common root: the sweep directory
    assert [r.name for r in rows] == list(RUNS)
    assert [r.status for r in rows] == STATUSES
    assert [r.summary is None for r in rows] == [False, False, False, True, True]


def test_columns_are_the_varying_overrides(outputs: Path) -> None:
    rows = report.load_runs([outputs])
    assert report.varying(rows) == ["init", "model.depth"]
    columns = report.table_columns(rows)
    assert columns[:4] == ["run", "init", "model.depth", "status"]
    assert columns[-2:] == ["verdicts", "outcome"] and "activation" not in columns
    # one run alone varies in nothing
    assert report.varying(rows[:1]) == []


def test_values_of_a_completed_and_a_diverged_run(outputs: Path) -> None:
    done, diverged, failed, killed, _ = (report.row_values(r) for r in report.load_runs([outputs]))
    assert done["steps"] == 40 and done["acc/test"] == 0.5
    assert done["grad/0"] == pytest.approx(1e-2) and done["grad/last"] == pytest.approx(2e-2)
    assert done["bwd/0"] == pytest.approx(1e-2) and done["bwd/last"] == pytest.approx(2e-2)
    assert done["verdicts"] == "vanishing,dead_units" and done["outcome"] == "partly"
    assert "model.depth" not in done
    assert diverged["loss/test"] is None and diverged["bwd/last"] is None
    assert diverged["bwd/0"] == pytest.approx(2e6)
    assert diverged["verdicts"] == "diverged,exploding" and diverged["outcome"] is None
    assert failed["steps"] == 0 and failed["acc/test"] is None and failed["verdicts"] is None
    assert killed["status"] == "no summary" and killed["init"] == "orthogonal"


def test_table_and_notes_name_the_partial_runs(outputs: Path, capsys) -> None:
    assert report.main([str(outputs)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for name in RUNS:
        assert name in out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 4, out
    by_run = {n.split(": ")[1]: n for n in notes}
    assert "no summary.json" in by_run["3_killed"]
    assert "summary.json unreadable" in by_run["4_corrupt"]
    assert "RuntimeError: out of memory" in by_run["2_failed"]
    assert "step 3 in layer head" in by_run["1_diverged"]


def _names(rows: list[report.RunRow]) -> list[str]:
    return [r.name for r in rows]


def test_sorting_is_numeric_with_missing_values_last(outputs: Path) -> None:
    rows = report.load_runs([outputs])
    missing = ["2_failed", "3_killed", "4_corrupt"]
    assert _names(report.sort_rows(rows, "acc/test")) == ["1_diverged", "0_completed", *missing]
    desc = report.sort_rows(rows, "acc/test", descending=True)
    assert _names(desc) == ["0_completed", "1_diverged", *missing]
    # override values that read as numbers sort as numbers: 8 before 16
    by_depth = report.sort_rows(rows, "model.depth")
    assert _names(by_depth)[:2] == ["4_corrupt", "1_diverged"]
    assert _names(report.sort_rows(rows, "status"))[0] == "0_completed"


def test_csv_reads_back_as_the_table(outputs: Path, tmp_path: Path) -> None:
    rows = report.sort_rows(report.load_runs([outputs]), "loss/train", descending=True)
    columns = report.table_columns(rows)
    path = tmp_path / "out" / "report.csv"
    report.write_csv(path, rows, columns)
    with path.open(newline="") as f:
        read = list(csv.reader(f))
    assert read[0] == columns
    expected = []
    for row in rows:
        values = report.row_values(row, columns)
        expected.append(["" if values.get(c) is None else str(values[c]) for c in columns])
    # str() of a float is its shortest exact form: full precision, not the table's 3 digits
    assert read[1:] == expected


def test_markdown_has_a_header_and_one_line_per_run(outputs: Path, tmp_path: Path) -> None:
    rows = report.load_runs([outputs])
    columns = report.table_columns(rows)
    path = tmp_path / "report.md"
    report.write_markdown(path, rows, columns)
    lines = path.read_text().splitlines()
    assert lines[0] == "| " + " | ".join(columns) + " |"
    assert lines[1].startswith("|---|---|---|---|---:|")
    assert len(lines) == 2 + len(rows)
    completed = lines[2].split(" | ")
    assert completed[columns.index("model.depth")] == "-"
    assert completed[columns.index("grad/0")] == "0.01"


@pytest.mark.parametrize("runs, grid", [(5, (2, 4)), (3, (1, 3))])
def test_png_has_one_panel_per_run(outputs: Path, tmp_path: Path, runs: int, grid: tuple) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    rows = report.load_runs([outputs])[:runs]
    path = tmp_path / "flow.png"
    report.flow_grid_png(rows, report.varying(rows), path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert report.grid_shape(runs) == grid
    n_rows, n_cols = grid
    width = round(n_cols * report.PANEL_WIDTH * report.DPI)
    height = round((n_rows * report.PANEL_HEIGHT + report.LEGEND_HEIGHT) * report.DPI)
    with Image.open(path) as image:
        assert image.size == (width, height)


def test_a_real_sweep_end_to_end(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    trained = run_cli(
        ["train", "-m", "init=normal,kaiming_normal", *TINY, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert trained.returncode == 0, describe(trained)
    files = {k: tmp_path / f"report.{k}" for k in ("csv", "md", "png")}
    proc = run_cli(
        [
            "report",
            str(sweep),
            "--sort",
            "init",
            "--csv",
            str(files["csv"]),
            "--markdown",
            str(files["md"]),
            "--png",
            str(files["png"]),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, describe(proc)
    assert "2 run(s)" in proc.stdout and "kaiming_normal" in proc.stdout
    assert proc.stdout.count("completed") == 2 and "note:" not in proc.stdout
    with files["csv"].open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["init"] for r in table] == ["kaiming_normal", "normal"]
    assert all(r["status"] == "completed" and float(r["steps"]) == 6 for r in table)
    assert "model.depth" not in table[0]  # the same in both runs
    assert len(files["md"].read_text().splitlines()) == 4
    if "matplotlib" not in proc.stderr:
        assert files["png"].read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sort", "nope"], "--sort nope: unknown column; choose from run, init, model.depth"),
        (["does-not-exist"], "does-not-exist: no such path"),
        (["empty"], "no runs under empty"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    outputs: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "empty").mkdir()
    if args[0] == "--sort":
        args = [str(outputs), *args]
    proc = run_cli(["report", *args], cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.startswith(f"gradexp: error: {message}"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stdout == ""


def test_without_matplotlib_the_table_still_prints(outputs: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "matplotlib.py").write_text("raise ImportError('no matplotlib here')\n")
    pythonpath = os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])
    png = tmp_path / "flow.png"
    proc = run_cli(
        ["report", str(outputs), "--png", str(png)], cwd=tmp_path, env={"PYTHONPATH": pythonpath}
    )
    assert proc.returncode == 0, describe(proc)
    assert proc.stderr.strip() == MISSING
    assert "0_completed" in proc.stdout and not png.exists()


def test_a_job_a_stopped_sweep_never_started_is_named_so(tmp_path: Path, capsys) -> None:
    from gradexp.checkpoint import NOT_STARTED

    run = tmp_path / "multirun" / "0_init=normal"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- init=normal\n")
    summary = {"status": "interrupted", "error": NOT_STARTED, "steps": 0, "verdicts": []}
    (run / "summary.json").write_text(json.dumps(summary))
    assert report.main([str(tmp_path)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: 0_init=normal: not started: {NOT_STARTED}"]


def test_recurrent_runs_get_the_time_ratio_columns(tmp_path: Path, capsys) -> None:
    layers = [
        _layer(0, "recurrent.0", (1.0, 2.0), (0.5, 0.25)),
        _layer(1, "head", (1.0, 1.0), (1.0, 1.0)),
    ]
    rnn_time = [{"layer": "recurrent.0", "ratio": {"first": 850.0, "last": 0.2}}]
    for name, time in [("0_model=rnn", rnn_time), ("1_model=mlp", [])]:
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- model={name.split('=')[1]}\n")
        summary = _summary("completed", {"loss/test": 0.1}, layers, [])
        (run / "summary.json").write_text(json.dumps({**summary, "time": time}))
    rows = report.load_runs([tmp_path])
    assert report.table_columns(rows)[-4:] == ["time/0", "time/last", "verdicts", "outcome"]
    rnn, mlp = (report.row_values(r) for r in rows)
    assert (rnn["time/0"], rnn["time/last"]) == (850.0, 0.2)
    assert (mlp["time/0"], mlp["time/last"]) == (None, None)
    assert report.main([str(tmp_path), "--sort", "time/0"]) == 0
    assert "time: ||dL/dh|| at the first time step" in " ".join(capsys.readouterr().out.split())
    # A feed-forward tree has no time columns.
    assert "time/0" not in report.table_columns(rows[1:])


INITS = ("normal", "kaiming_normal", "xavier_normal", "orthogonal", "identity")
GAIN = {"normal": 0.3, "kaiming_normal": 1.0, "xavier_normal": 0.8, "orthogonal": 0.95}


def _large_tree(root: Path, runs: int, depths: tuple[int, ...] = tuple(range(3, 13))) -> Path:
    """A sweep of ``runs`` runs over init x optim.lr x model.depth (and a seed each): the
    gradient at depth falls or grows by init's gain a layer; every 50th run failed and
    the one after it was killed before writing summary.json."""
    sweep = root / "big"
    lrs = ("0.001", "0.01", "0.1", "1.0")
    for i in range(runs):
        init = INITS[i % len(INITS)]
        lr = lrs[i // len(INITS) % len(lrs)]
        depth = depths[i // (len(INITS) * len(lrs)) % len(depths)]
        run = sweep / f"{i}"
        (run / ".hydra").mkdir(parents=True)
        overrides = [f"init={init}", f"optim.lr={lr}", f"model.depth={depth}", f"seed={i}"]
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        if i % 50 == 9:
            continue  # killed
        if i % 50 == 8:
            summary: dict[str, Any] = FAILED
        else:
            gain = GAIN.get(init, 1.5) * (1 + i / 1000)
            names = [f"hidden.{j}" for j in range(depth)] + ["head"]
            layers = [
                _layer(j, name, (g := 1e-2 * gain ** (depth - j), 2 * g), (10 * g, 20 * g))
                for j, name in enumerate(names)
            ]
            summary = _summary("completed", COMPLETED["metrics"], layers, [])
        (run / "summary.json").write_text(json.dumps(summary))
    return sweep


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header: its IHDR chunk comes first."""
    data = path.read_bytes()[:24]
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_png_of_a_large_tree_is_one_bounded_summary(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    tree = _large_tree(tmp_path, 200)
    out = tmp_path / "figs"
    proc = run_cli(["report", str(tree), "--png", str(out / "flow.png")], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "200 run(s)" in proc.stdout
    # One file, of the summary's fixed size, named on stdout with what colours its lines.
    assert [p.name for p in out.glob("*.png")] == ["flow.png"]
    size = tuple(round(inches * report.DPI) for inches in report.SUMMARY_SIZE)
    assert _png_size(out / "flow.png") == size == (1200, 900)
    told = [line for line in proc.stdout.splitlines() if line.startswith(str(out / "flow.png"))]
    assert len(told) == 1 and "200 runs" in told[0] and "coloured by init" in told[0], told


def test_summary_draws_every_run_in_every_panel(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = report.load_runs([_large_tree(tmp_path, 200)])
    keys = report.varying(rows)
    assert keys == ["init", "optim.lr", "model.depth", "seed"]
    fig = report.flow_summary_figure(rows, "init")
    drawn = {r.name for r in rows if r.status == "completed"}
    assert len(drawn) == 200 - 8  # 4 failed, 4 killed
    panels = fig.axes
    assert len(panels) == 4  # a legend, no colour bar: 5 values of init
    for ax in panels:
        lines = ax.get_lines()
        assert sorted(line.get_gid() for line in lines) == sorted(drawn)
    # One colour per init, a different one each; the legend names them all.
    color_of = {line.get_gid(): line.get_color() for line in panels[0].get_lines()}
    by_init: dict[str, set] = {}
    for row in rows:
        if row.name in color_of:
            by_init.setdefault(row.overrides["init"], set()).add(str(color_of[row.name]))
    assert all(len(c) == 1 for c in by_init.values()) and len(set.union(*by_init.values())) == 5
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sorted(labels) == sorted(f"init={i}" for i in INITS)
    # The runs it could not draw are counted; depths differ, so x is the relative depth.
    title = fig._suptitle.get_text()
    assert "200 runs" in title and "8 not drawn, no per-layer data: 4 failed, 4 no summary" in title
    assert panels[-1].get_xlabel().startswith("relative depth")
    assert max(line.get_xdata()[-1] for line in panels[0].get_lines()) == 1.0


def test_summary_colour_key_and_colour_bar(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    keys = ["init", "optim.lr", "seed"]
    assert report.color_key(keys) == "init"
    assert report.color_key(keys, "optim.lr") == "optim.lr"  # --sort picks it
    assert report.color_key(keys, "acc/test") == "init"  # a column, not an override
    assert report.color_key([], None) is None  # nothing differs: colour by status
    # One depth: x is the layer, ticks named; 60 seeds are too many for a legend.
    rows = report.load_runs([_large_tree(tmp_path, 60, depths=(4,))])
    fig = report.flow_summary_figure(rows, "seed")
    assert len(fig.axes) == 5 and not fig.legends  # four panels and a colour bar
    bar = fig.axes[-1]
    labels = [t.get_text() for t in bar.get_yticklabels()]
    assert labels[0] == "0" and labels[-1] == "57"  # 58 failed, 59 was killed: not drawn
    assert len(labels) <= report.MAX_COLORBAR_LABELS + 1
    ticks = [t.get_text() for t in fig.axes[2].get_xticklabels()]
    assert ticks == ["hidden.0", "hidden.1", "hidden.2", "hidden.3", "head"]
    # Colour by status: the no-override fallback.
    fig = report.flow_summary_figure(rows, None)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["completed"]


def test_png_is_the_grid_up_to_max_panels(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = report.load_runs([_large_tree(tmp_path, report.MAX_PANELS + 1)])
    grid, summary = tmp_path / "grid.png", tmp_path / "summary.png"
    assert report.flow_png(rows[:-1], report.varying(rows), grid) is None
    n_rows, n_cols = report.grid_shape(report.MAX_PANELS)
    width = round(n_cols * report.PANEL_WIDTH * report.DPI)
    height = round((n_rows * report.PANEL_HEIGHT + report.LEGEND_HEIGHT) * report.DPI)
    assert _png_size(grid) == (width, height) == (1600, 2150)
    told = report.flow_png(rows, report.varying(rows), summary, sort="optim.lr")
    assert told is not None and "25 runs" in told and "coloured by optim.lr" in told
    assert _png_size(summary) == (1200, 900)


def test_a_key_a_run_did_not_set_shows_its_effective_value(tmp_path: Path) -> None:
    # One run sets init and activation, the other leaves both at their defaults: the
    # report reads the defaults from the run's composed config, not "-".
    for name, extra in (("set", ["init=xavier_normal", "activation=relu"]), ("default", [])):
        proc = run_cli(
            ["train", *TINY, *extra, f"hydra.run.dir={tmp_path / 'runs' / name}"], tmp_path
        )
        assert proc.returncode == 0, proc.stderr
    rows = report.load_runs([tmp_path / "runs"])
    assert report.varying(rows) == ["init", "activation"]
    columns = report.table_columns(rows)
    by_run = {row.name: report.row_values(row, columns) for row in rows}
    assert by_run["default"]["init"] == "normal" and by_run["default"]["activation"] == "sigmoid"
    assert by_run["set"]["init"] == "xavier_normal"
    # Only what differs is a column (both ran TINY's model.depth=3).
    assert "model.depth" not in columns
    assert report.setting(rows[0], "model.width") == "8"
    assert report.setting(rows[0], "model.hidden_size") is None  # an MLP has none
