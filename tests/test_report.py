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


# Results across seeds: a hand-built sweep, its groups computed by hand below.
def _done(loss: float, acc: float, kinds: list[str], outcome: str) -> str:
    """COMPLETED's summary.json with this loss/test, acc/test, verdicts and outcome."""
    return json.dumps(
        {
            **COMPLETED,
            "metrics": {**COMPLETED["metrics"], "loss/test": loss, "acc/test": acc},
            "verdicts": [_verdict(kind) for kind in kinds],
            "outcome": {**COMPLETED["outcome"], "kind": outcome},
        }
    )


SEEDS: dict[str, tuple[list[str], str | None]] = {
    "0_init=normal,seed=0": (
        ["init=normal", "seed=0"],
        _done(1.6, 0.5, ["vanishing", "dead_units", "vanishing"], "partly"),
    ),
    "1_init=normal,seed=1": (["init=normal", "seed=1"], _done(1.2, 0.7, ["vanishing"], "learned")),
    "2_init=normal,seed=2": (
        ["init=normal", "seed=2"],
        _done(1.4, 0.6, ["vanishing", "dead_units"], "partly"),
    ),
    # no loss/test, no outcome: left out of the median of loss/test and of the counts
    "3_init=normal,seed=3": (["init=normal", "seed=3"], json.dumps(DIVERGED)),
    "4_init=normal,seed=4": (["init=normal", "seed=4"], _done(0.3, 0.9, ["vanishing"], "learned")),
    "5_init=xavier_normal,seed=0": (
        ["init=xavier_normal", "seed=0"],
        _done(0.8, 0.8, ["healthy"], "learned"),
    ),
    "6_init=kaiming_normal,seed=0": (["init=kaiming_normal", "seed=0"], json.dumps(FAILED)),
    "7_init=kaiming_normal,seed=1": (["init=kaiming_normal", "seed=1"], None),
}


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    """A sweep of init x seed, written as the outputs fixture writes runs: five seeds of
    init=normal (one diverged), one of xavier_normal, two of kaiming_normal (one failed,
    one killed)."""
    sweep = tmp_path / "seeds"
    for name, (overrides, summary) in SEEDS.items():
        run = sweep / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
        if summary is not None:
            (run / "summary.json").write_text(summary)
    return sweep


def test_runs_that_differ_only_in_seed_are_one_row(seeds: Path) -> None:
    rows = report.load_runs([seeds])
    groups = report.group_runs(rows, "seed")
    assert [(g.name, len(g.runs)) for g in groups] == [
        ("init=normal,seed=*", 5),
        ("5_init=xavier_normal,seed=0", 1),  # alone: named, and shown, as the run
        ("init=kaiming_normal,seed=*", 2),
    ]
    columns = report.table_columns(rows, "seed")
    assert columns[:4] == ["run", "init", "n", "status"] and "seed" not in columns
    normal, xavier, kaiming = (report.group_values(g, columns) for g in groups)

    # By hand: acc/test 0.5, 0.7, 0.6, 0.1 (diverged), 0.9 -> 0.1 0.5 [0.6] 0.7 0.9;
    # loss/test 1.6, 1.2, 1.4, -, 0.3 -> 0.3 [1.2 1.4] 1.6: the median of 4, (1.2 + 1.4) / 2;
    # steps 40, 40, 40, 3, 40.
    assert normal["n"] == 5 and normal["init"] == "normal" and normal["run"] == groups[0].name
    assert normal["acc/test"] == report.Spread(0.6, 0.1, 0.9, 5, 5)
    loss = normal["loss/test"]
    assert (loss.median, loss.low, loss.high, loss.count, loss.runs) == pytest.approx(
        (1.3, 0.3, 1.6, 4, 5)
    )
    assert normal["steps"] == report.Spread(40, 3, 40, 5, 5)
    assert str(normal["status"]) == "completed 4/5, diverged 1/5"
    # Each kind once a run (seed 0 has two vanishing verdicts), most first.
    assert str(normal["verdicts"]) == "vanishing 4/5, dead_units 2/5, diverged 1/5, exploding 1/5"
    assert str(normal["outcome"]) == "partly 2/5, learned 2/5"  # the diverged run has none
    # A group of one is its run, and n=1.
    assert xavier == {**report.row_values(groups[1].runs[0], columns), "n": 1}
    # Failed and killed: no numbers but the failed run's 0 steps; no verdicts, no outcome.
    assert str(kaiming["status"]) == "failed 1/2, no summary 1/2"
    assert kaiming["steps"] == report.Spread(0, 0, 0, 1, 2) and kaiming["acc/test"] is None
    assert kaiming["verdicts"] is None and kaiming["outcome"] is None

    # The table's cells: median (min-max), n=K when only K runs have the value.
    cells = dict(zip(columns, report.markdown_table(groups, columns).splitlines()[2].split(" | ")))
    assert cells["acc/test"] == "0.6 (0.1-0.9)"
    assert cells["loss/test"] == "1.3 (0.3-1.6) n=4"
    assert cells["steps"] == "40 (3-40)" and cells["loss/train"] == "1.5 (1.5-1e+09)"
    assert cells["acc/train"] == "0.6 (0.1-0.6)"
    kaiming_cells = report.markdown_table(groups, columns).splitlines()[4].split(" | ")
    assert kaiming_cells[columns.index("steps")] == "0 n=1"  # one value: no range
    assert kaiming_cells[columns.index("acc/test")] == "-"


def test_grouped_table_on_the_command_line(seeds: Path, capsys) -> None:
    assert report.main([str(seeds), "--sort", "acc/test", "--desc"]) == 0
    out = capsys.readouterr().out
    assert "8 run(s) in" in out and "3 group(s) over seed" in out
    assert "completed 4/5, diverged 1/5" in out and "vanishing 4/5, dead_units 2/5" in out
    # by the median, largest first: xavier's 0.8, normal's 0.6, kaiming's none last
    order = [out.index(name) for name in ("5_init=xavier", "init=normal,seed=*", "kaiming")]
    assert order == sorted(order)
    # every run's note still, by its own name
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert [n.split(": ")[1] for n in notes] == [
        "3_init=normal,seed=3",
        "6_init=kaiming_normal,seed=0",
        "7_init=kaiming_normal,seed=1",
    ]


def test_grouped_csv_has_median_min_max_and_n(seeds: Path, tmp_path: Path) -> None:
    path = tmp_path / "seeds.csv"
    assert report.main([str(seeds), "--csv", str(path)]) == 0
    with path.open(newline="") as f:
        header, *lines = list(csv.reader(f))
    numbers = ["steps", *report.METRICS, *report.RATIOS]
    spread = [h for c in numbers for h in (c, f"{c}_min", f"{c}_max", f"{c}_n")]
    assert header == ["run", "init", "n", "status", *spread, "verdicts", "outcome"]
    normal, xavier, kaiming = (dict(zip(header, line)) for line in lines)
    assert normal["run"] == "init=normal,seed=*" and normal["n"] == "5"
    acc = [float(normal[f"acc/test{s}"]) for s in ("", "_min", "_max")]
    assert acc == [0.6, 0.1, 0.9] and normal["acc/test_n"] == "5"
    assert float(normal["loss/test"]) == pytest.approx(1.3) and normal["loss/test_n"] == "4"
    assert normal["status"] == "completed 4/5, diverged 1/5"
    assert normal["outcome"] == "partly 2/5, learned 2/5"
    # full precision: the diverged run's ratio, as row_values has it
    diverged = report.row_values(report.load_run(seeds / "3_init=normal,seed=3"))
    assert float(normal["grad/0_max"]) == diverged["grad/0"]
    # A run alone: its values, a range of one, n=1; a missing value is empty, n=0.
    assert xavier["status"] == "completed" and xavier["verdicts"] == "healthy"
    assert xavier["acc/test"] == xavier["acc/test_min"] == xavier["acc/test_max"] == "0.8"
    assert xavier["n"] == "1" and xavier["acc/test_n"] == "1"
    assert kaiming["acc/test"] == kaiming["acc/test_min"] == "" and kaiming["acc/test_n"] == "0"


def test_by_none_and_by_another_key(seeds: Path, outputs: Path, tmp_path: Path, capsys) -> None:
    # --by none: a row per run, the table and CSV as without grouping.
    rows = report.load_runs([seeds])
    path = tmp_path / "none.csv"
    assert report.main([str(seeds), "--by", "none", "--csv", str(path)]) == 0
    assert "group" not in capsys.readouterr().out
    expected = tmp_path / "expected.csv"
    report.write_csv(expected, rows, report.table_columns(rows))
    assert path.read_text() == expected.read_text()
    assert report.table_columns(rows)[:4] == ["run", "init", "seed", "status"]

    # --by init: the runs of one seed are a group, whatever their init.
    groups = report.group_runs(rows, "init")
    assert [(g.name, len(g.runs)) for g in groups] == [
        ("seed=0,init=*", 3),
        ("seed=1,init=*", 2),
        ("2_init=normal,seed=2", 1),
        ("3_init=normal,seed=3", 1),
        ("4_init=normal,seed=4", 1),
    ]
    assert report.main([str(seeds), "--by", "init", "--markdown", str(tmp_path / "t.md")]) == 0
    md = (tmp_path / "t.md").read_text().splitlines()
    assert md[0].startswith("| run | seed | n | status |")
    assert md[3].startswith("| seed=1,init=* | 1 | 2 | completed 1/2, no summary 1/2 |")

    # Nothing pooled (every run its own settings): exactly today's table.
    capsys.readouterr()
    assert report.main([str(outputs)]) == 0
    default = capsys.readouterr().out
    assert report.main([str(outputs), "--by", "none"]) == 0
    assert capsys.readouterr().out == default and "group" not in default


def test_groups_share_a_folder_prefix(tmp_path: Path) -> None:
    summary = _done(1.0, 0.5, [], "learned")
    for sweep, init in (("a", "normal"), ("b", "xavier_normal")):
        for seed in (0, 1):
            run = tmp_path / "out" / sweep / f"{seed}_seed={seed}"
            (run / ".hydra").mkdir(parents=True)
            (run / ".hydra" / "overrides.yaml").write_text(f"- init={init}\n- seed={seed}\n")
            (run / "summary.json").write_text(summary)
    groups = report.group_runs(report.load_runs([tmp_path / "out"]), "seed")
    assert [g.name for g in groups] == ["a/init=normal,seed=*", "b/init=xavier_normal,seed=*"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--by", "data.seed"],
            "--by data.seed: no run has this key; choose from init, seed, none",
        ),
        (["--by", "init=normal"], "--by init=normal: no run has this key; choose from init,"),
        (["--sort", "seed"], "--sort seed: the runs are grouped over seed, one row a group;"),
        (["--by", "init", "--sort", "init"], "--sort init: the runs are grouped over init"),
        (["--sort", "nope"], "--sort nope: unknown column; choose from run, init, n, status,"),
    ],
)
def test_bad_grouping_is_one_line_and_exit_2(
    seeds: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    proc = run_cli(["report", str(seeds), *args], cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.startswith(f"gradexp: error: {message}"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stdout == ""


def test_png_has_one_panel_per_group_with_every_run(seeds: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = report.load_runs([seeds])
    groups = report.group_runs(rows, "seed")
    keys = [k for k in report.varying(rows) if k != "seed"]
    fig = report.flow_grid_figure(groups, keys)
    normal, xavier, kaiming = fig.axes[:3]
    lines = len(report.FLOW_LINES) * len(report.FLOW_STEPS)
    assert len(normal.get_lines()) == 5 * lines and len(xavier.get_lines()) == lines
    title = normal.get_title()
    assert title.splitlines()[:2] == ["init=normal", "n=5 over seed: completed 4/5, diverged 1/5"]
    assert " ".join(title.splitlines()[2:]) == (
        "vanishing 4/5, dead_units 2/5, diverged 1/5, exploding 1/5; partly 2/5, learned 2/5"
    )
    assert xavier.get_title() == report.panel_title(groups[1].runs[0], keys)
    assert not kaiming.get_lines() and not kaiming.axison
    assert kaiming.texts[0].get_text() == "no layers (failed 1/2, no summary 1/2)"
    path = tmp_path / "groups.png"
    report.flow_png(groups, keys, path)
    assert _png_size(path) == (3 * round(report.PANEL_WIDTH * report.DPI), 400)


def test_png_over_max_panels_groups_is_the_summary(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    # 100 runs: 40 settings of init x optim.lr x model.depth, 2 or 3 seeds each.
    tree = _large_tree(tmp_path, 100, depths=(3, 4))
    out = tmp_path / "flow.png"
    proc = run_cli(["report", str(tree), "--png", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "100 run(s)" in proc.stdout and "40 group(s) over seed" in proc.stdout
    told = [line for line in proc.stdout.splitlines() if line.startswith(str(out))]
    assert len(told) == 1 and "40 groups of 100 runs" in told[0], told
    assert "coloured by init" in told[0]
    assert _png_size(out) == (1200, 900)


def test_a_real_three_seed_sweep_is_one_row_of_medians(tmp_path: Path) -> None:
    import statistics

    sweep = tmp_path / "sweep"
    trained = run_cli(
        ["train", "-m", "seed=0,1,2", *TINY, f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert trained.returncode == 0, describe(trained)
    csv_path = tmp_path / "seeds.csv"
    proc = run_cli(["report", str(sweep), "--csv", str(csv_path)], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "3 run(s)" in proc.stdout and "1 group(s) over seed" in proc.stdout
    assert "completed 3/3" in proc.stdout and "note:" not in proc.stdout
    with csv_path.open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["run"] == "seed=*" and row["n"] == "3" and row["status"] == "completed 3/3"
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 3
    for metric in report.METRICS:
        values = [s["metrics"][metric] for s in summaries]
        assert float(row[metric]) == statistics.median(values), metric
        assert float(row[f"{metric}_min"]) == min(values) and row[f"{metric}_n"] == "3"
    # a ratio too, from the layers summary.json has
    bwd = [s["layers"][0]["signal_bwd"]["first"] / s["layers"][-1]["signal_bwd"]["first"]
           for s in summaries]  # fmt: skip
    assert float(row["bwd/0"]) == pytest.approx(statistics.median(bwd), rel=1e-12)
