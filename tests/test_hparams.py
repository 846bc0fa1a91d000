"""TensorBoard's HParams tab over a logdir of several model families, read back the way
TensorBoard reads it (the event files, then a real ``tensorboard`` server's HParams
routes), and the Markdown tables of the Text tab rendered by TensorBoard's own Markdown.

The HParams plugin takes the experiment (the columns) from whichever run it finds first,
and a session's metric as the last scalar of the metric's tag: every run writes the same
experiment, with stand-ins where its model lacks a column and an ``hparams/<tag>`` scalar
that is always finite (see gradexp.metrics)."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY, Run, load_summary, train
from gradexp.config import SCHEMAS
from gradexp.metrics import (
    HEADLINE,
    HPARAMS_METRIC,
    NO_VALUE,
    NOT_APPLICABLE,
    NOT_APPLICABLE_NUMBER,
    declared_metric_tags,
    hparam_columns,
    hparams_metrics,
    markdown_cell,
    verdict_markdown,
)
from gradexp.verdicts import describe

LSTM = ("model=lstm", "data.length=8", "model.hidden_size=8", *TINY[2:])  # data=adding
DIVERGE = ("optim.lr=1e6", "init=normal", "activation=relu")  # non-finite at step 2
RUNS = {"mlp": TINY, "lstm": LSTM, "diverged": (*TINY, *DIVERGE)}
STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
# TensorBoard's vendored bleach warns about html5lib when it sanitizes the Markdown.
pytestmark = pytest.mark.filterwarnings("ignore:html5lib's sanitizer:DeprecationWarning")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """An MLP, an LSTM on the adding task and a diverged MLP, in one logdir."""
    root = tmp_path_factory.mktemp("hparams")
    return {name: train(root, *args, run_dir=root / name).ok() for name, args in RUNS.items()}


@pytest.fixture(scope="module")
def logdir(runs: dict[str, Run]) -> Path:
    return runs["mlp"].dir.parent


def plugin_data(run: Run) -> Any:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = run.events.PluginTagToContent("hparams")
    return {
        tag: plugin_data_pb2.HParamsPluginData.FromString(content[f"_hparams_/{tag}"])
        for tag in ("experiment", "session_start_info")
    }


# --- (a) the event files: one experiment, every column, every metric ----------------------


def test_every_run_writes_the_same_experiment_with_every_column(runs: dict[str, Run]) -> None:
    from tensorboard.plugins.hparams import api_pb2

    data = {name: plugin_data(run) for name, run in runs.items()}
    experiments = [d["experiment"].experiment for d in data.values()]
    assert all(e == experiments[0] for e in experiments), "runs disagree on the experiment"
    experiment = experiments[0]
    columns = {h.name: h for h in experiment.hparam_infos}
    metrics = [m.name.tag for m in experiment.metric_infos]
    assert metrics == [HPARAMS_METRIC + tag for tag in declared_metric_tags()]
    for name, run in runs.items():
        hparams = data[name]["session_start_info"].session_start_info.hparams
        assert set(hparams) == set(columns), name  # every column, stand-ins included
        for key, value in hparams.items():
            number = columns[key].type == api_pb2.DATA_TYPE_FLOAT64
            assert value.WhichOneof("kind") == ("number_value" if number else "string_value")
        # Every metric the run reports is a column, and a logged, finite scalar.
        summary = run.summary
        assert {HPARAMS_METRIC + k for k in summary["metrics"]} <= set(metrics), name
        scalars = run.events.Tags()["scalars"]
        for tag in metrics:
            assert tag in scalars, (name, tag)
            assert math.isfinite(run.events.Scalars(tag)[-1].value), (name, tag)
    mlp = data["mlp"]["session_start_info"].session_start_info.hparams
    lstm = data["lstm"]["session_start_info"].session_start_info.hparams
    assert (mlp["model"].string_value, lstm["model"].string_value) == ("mlp", "lstm")
    assert mlp["depth"].number_value == 3 and mlp["width"].number_value == 8
    assert lstm["hidden_size"].number_value == 8
    # What one family lacks: -1 for a number, "-" for text and booleans.
    assert lstm["depth"].number_value == NOT_APPLICABLE_NUMBER == mlp["hidden_size"].number_value
    assert mlp["read"].string_value == NOT_APPLICABLE == mlp["fused"].string_value
    assert lstm["fused"].string_value == "false" and mlp["bias"].string_value == "true"
    assert "-1" in columns["depth"].description and '"-"' in columns["read"].description
    assert list(columns["fused"].domain_discrete) == ["true", "false", NOT_APPLICABLE]


def test_the_experiment_has_every_schema_key_and_metric() -> None:
    columns = hparam_columns()
    for schema in SCHEMAS["model"].values():
        keys = {f.name for f in dataclasses.fields(schema)} - {"name"}
        assert keys <= set(columns), schema.__name__
    assert {"model", "data", "activation", "init", "norm", "clip", "optim", "lr"} <= set(columns)
    assert {"batch_size", "tbptt", "seed", "status", "verdicts", "verdict/vanishing"} <= set(
        columns
    )
    assert set(HEADLINE) <= {k for k, (_, everywhere) in columns.items() if everywhere}
    tags = declared_metric_tags()
    assert {"loss/test", "acc/test", "loss/train", "flow/time_grad_ratio"} <= set(tags)
    assert tags[:2] == ("loss/test", "acc/test")  # the dashboard shows the first five


def test_hparams_metrics_are_finite_stand_ins() -> None:
    finals = {"loss/test": math.nan, "loss/train": math.inf, "acc/test": 1e300, "acc/train": 0.5}
    values = hparams_metrics(finals, ["custom/metric"])
    assert list(values) == [HPARAMS_METRIC + t for t in (*declared_metric_tags(), "custom/metric")]
    assert values["hparams/acc/train"] == 0.5
    for tag in ("loss/test", "loss/train", "acc/test", "loss/baseline", "custom/metric"):
        assert values[HPARAMS_METRIC + tag] == NO_VALUE  # NaN, inf, beyond float32, absent


# --- (b), (c) TensorBoard's own HParams backend, over HTTP --------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(logdir: Path) -> dict[str, Any]:
    """``tensorboard --logdir`` over the three runs: its HParams experiment and session
    groups, as the HParams dashboard requests them (POST, JSON)."""
    tensorboard = shutil.which("tensorboard", path=str(Path(sys.executable).parent))
    if tensorboard is None:
        pytest.skip("tensorboard script not found next to the interpreter")
    port = free_port()
    server = subprocess.Popen(
        [tensorboard, "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def post(route: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/data/plugin/hparams/{route}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.load(r)

    try:
        groups: list[Any] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                experiment = post("experiment", {"experimentName": "", "hparamsLimit": 1000})
                groups = post(
                    "session_groups",
                    {
                        "experimentName": "",
                        "allowedStatuses": STATUSES,
                        "startIndex": 0,
                        "sliceSize": 100,
                    },
                )["sessionGroups"]
                if len(groups) == len(RUNS) and all(
                    len(g["metricValues"]) == len(experiment["metricInfos"]) for g in groups
                ):
                    break
            except (OSError, KeyError):
                pass
            time.sleep(0.5)
        assert server.poll() is None, "tensorboard exited"
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"experiment": experiment, "groups": {g["name"]: g for g in groups}}


def test_tensorboard_lists_every_run_with_every_column(logdir: Path, served: Any) -> None:
    experiment, groups = served["experiment"], served["groups"]
    assert set(groups) == set(RUNS)
    hparams = {h["name"] for h in experiment["hparamInfos"]}
    metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
    assert hparams == set(hparam_columns())
    assert metrics == [HPARAMS_METRIC + t for t in declared_metric_tags()]
    for name, group in groups.items():
        assert set(group["hparams"]) == hparams, name
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert list(values) == metrics, name
        summary = load_summary(logdir / name, strict=False)
        for tag, value in values.items():
            assert isinstance(value, float) and math.isfinite(value), (name, tag, value)
            final = summary["metrics"].get(tag.removeprefix(HPARAMS_METRIC))
            if final is None or not math.isfinite(final):
                assert value == NO_VALUE, (name, tag)
            else:
                assert value == pytest.approx(final, rel=1e-6), (name, tag)
    assert groups["mlp"]["hparams"]["depth"] == 3 and groups["lstm"]["hparams"]["depth"] == -1
    assert groups["lstm"]["hparams"]["hidden_size"] == 8
    mlp_only, lstm_only = "hparams/acc/test", "hparams/flow/time_grad_ratio"
    assert {m["name"]["tag"]: m["value"] for m in groups["lstm"]["metricValues"]}[mlp_only] == -1
    assert {m["name"]["tag"]: m["value"] for m in groups["mlp"]["metricValues"]}[lstm_only] == -1


def test_tensorboard_shows_the_headline_columns_first(served: Any) -> None:
    """The HParams dashboard shows five hparams (those marked ``differs`` first, in the
    server's order: differs, then by name) and the first five metrics."""
    infos = served["experiment"]["hparamInfos"]
    shown = sorted(infos, key=lambda h: not h.get("differs", False))[:5]  # stable, as the UI
    assert [h["name"] for h in shown] == sorted(HEADLINE)
    assert {"init", "activation", "status", "verdicts"} <= set(HEADLINE)
    metrics = [m["name"]["tag"] for m in served["experiment"]["metricInfos"][:5]]
    assert metrics[:2] == ["hparams/loss/test", "hparams/acc/test"]


def test_a_diverged_run_stays_in_the_hparams_tab_with_finite_metrics(
    runs: dict[str, Run], served: Any
) -> None:
    group = served["groups"]["diverged"]
    assert group["hparams"]["status"] == "diverged"
    assert group["hparams"]["verdict/diverged"] == "true"
    values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
    # The parallel-coordinates view drops a session with a NaN (JSON "NaN") or missing value.
    assert all(isinstance(v, float) and math.isfinite(v) for v in values.values()), values
    assert values["hparams/loss/train"] == NO_VALUE
    # The run's own tags keep their meaning: loss/train's last value is the non-finite one.
    assert not math.isfinite(runs["diverged"].events.Scalars("loss/train")[-1].value)


# --- (d) Markdown that TensorBoard's Text tab renders cell by cell -------------------------


def rendered_rows(markdown: str) -> list[list[str]]:
    """The body rows of the table, as TensorBoard's text plugin renders it (its Markdown
    and sanitizer), each cell's text."""
    from tensorboard.plugin_util import markdown_to_safe_html

    body = markdown_to_safe_html(markdown)
    rows = re.findall(r"<tr>(.*?)</tr>", body, re.S)[1:]
    return [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", r, re.S)] for r in rows]


TIME_VERDICT = {
    "kind": "vanishing",
    "layer": "rnn.0",
    "step": 4,
    "evidence": {
        "axis": "time",
        "quantity": "||dL/dh_t|| t=0 / t=9",
        "ratio": 1.2e-5,
        "threshold": 0.01,
        "held": "3/3",
        "until": 5,
    },
}


def test_verdict_markdown_escapes_the_pipes_of_the_evidence() -> None:
    healthy = {
        "kind": "healthy",
        "layer": None,
        "step": None,
        "evidence": {"logged_steps": 4, "quantity": "a|b\\", "ratio": 1.0},
    }
    markdown = verdict_markdown([TIME_VERDICT, healthy])
    assert markdown.startswith("| verdict | layer | step | evidence |\n|---|---|---|---|\n")
    rows = rendered_rows(markdown)
    assert rows[0] == ["vanishing", "rnn.0", "4", describe(TIME_VERDICT)]
    assert "||dL/dh_t|| t=0 / t=9" in rows[0][3]
    assert rows[1] == ["healthy", "-", "-", describe(healthy)]  # a trailing backslash too


def test_markdown_cell_keeps_a_line_break_inside_its_cell() -> None:
    cell = markdown_cell("first | line\nsecond")
    assert "\n" not in cell
    (row,) = rendered_rows(f"| a | b |\n|---|---|\n| {cell} | x |")
    assert row == ["first | line<br>second", "x"]  # <br> is kept by the sanitizer


def test_the_runs_verdict_tables_render_four_cells_a_row(runs: dict[str, Run]) -> None:
    for name, run in runs.items():
        (text,) = run.events.Tensors("run/verdicts/text_summary")
        rows = rendered_rows(text.tensor_proto.string_val[0].decode())
        verdicts = run.summary["verdicts"]
        assert [row[0] for row in rows] == [v["kind"] for v in verdicts], name
        assert all(len(row) == 4 and row[3] for row in rows), (name, rows)
