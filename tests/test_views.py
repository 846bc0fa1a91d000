"""What TensorBoard shows a run: per-layer tags already on a log10 scale relative to the
head, a Custom Scalars layout with the question first and only the charts the run has,
and no always-zero per-layer cards (non-finite gradients are one scalar). Real tiny runs
through the CLI, read back from their event files."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY, TINY_DEPTH, Run, composed, layer_tags, scalar_series, train
from gradexp.record import RELATIVE_SECTION, log10_relative

TAGS = layer_tags(TINY_DEPTH)  # 00_hidden.0 ... 03_head
HEAD = TAGS[-1]
RELATIVE = ("signal_bwd", "grad_norm")  # log10_rel/<quantity>/<L>, in the layout's order
DIVERGE = ("optim.lr=1e6", "init=normal", "activation=relu")  # non-finite at step 2
LSTM = (
    "model=lstm",
    "model.hidden_size=8",
    "data.length=6",
    "trainer.steps=4",
    "trainer.log_every=2",
    "trainer.hist_every=2",
    "trainer.eval_every=2",
    "trainer.batch_size=8",
    "data.n_train=64",
    "data.n_test=32",
)


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return train(tmp_path_factory.mktemp("mlp"), *TINY).ok()


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return train(tmp_path_factory.mktemp("lstm"), *LSTM).ok()


def layout(run: Run) -> Any:
    from tensorboard.plugins.custom_scalar import layout_pb2

    proto = run.events.Tensors("custom_scalars__config__")[0].tensor_proto
    return layout_pb2.Layout.FromString(proto.string_val[0])


def charts(run: Run) -> dict[str, list[str]]:
    """Chart title -> the logged scalar tags its regexes match."""
    scalars = run.events.Tags()["scalars"]
    return {
        chart.title: sorted(t for t in scalars if any(re.search(r, t) for r in chart.multiline.tag))
        for category in layout(run).category
        for chart in category.chart
    }


# --- log10 relative to the head ------------------------------------------------------------


@pytest.mark.parametrize("quantity", RELATIVE)
def test_log10_relative_tags_are_the_raw_ones_over_the_head(mlp_run: Run, quantity: str):
    acc = mlp_run.events
    head = dict(scalar_series(acc, f"{quantity}/{HEAD}"))
    for tag in TAGS:
        raw = dict(scalar_series(acc, f"{quantity}/{tag}"))
        rel = dict(scalar_series(acc, f"log10_rel/{quantity}/{tag}"))
        assert sorted(rel) == sorted(raw), tag  # at every step the raw value is logged
        for step, value in rel.items():
            # The logged raw values are float32: the ratio agrees to float32 precision.
            expected = math.log10(raw[step] / head[step])
            assert value == pytest.approx(expected, abs=1e-5), (tag, step)
            if tag == HEAD:
                assert value == 0.0


def test_log10_relative_skips_zero_and_nonfinite_values():
    nan, inf = math.nan, math.inf
    out = log10_relative([1e-3, 0.0, inf, nan, -1.0, 1.0e-1])
    assert out[0] == pytest.approx(-2.0) and out[-1] == 0.0
    assert all(math.isnan(v) for v in out[1:5])
    # A head of 0 or non-finite: nothing relative to it.
    assert all(math.isnan(v) for v in log10_relative([1.0, 0.0]))
    assert all(math.isnan(v) for v in log10_relative([1.0, nan]))
    # Far apart: a difference of logs, no overflow of the ratio.
    assert log10_relative([1e300, 1e-300]) == [pytest.approx(600.0), 0.0]


# --- the Custom Scalars layout ------------------------------------------------------------


def test_the_layout_asks_the_question_first(mlp_run: Run):
    categories = list(layout(mlp_run).category)
    first = categories[0]
    assert first.title == RELATIVE_SECTION
    found = charts(mlp_run)
    titles = [c.title for c in first.chart]
    assert len(titles) == len(RELATIVE)
    for quantity, title in zip(RELATIVE, titles):
        assert title.startswith("log10 ") and "-2: 1%" in title, title
        # one chart per quantity, every layer on it
        assert found[title] == sorted(f"log10_rel/{quantity}/{t}" for t in TAGS)
    # The raw per-layer charts follow, the backward signal (what the verdicts judge) first.
    assert categories[1].title == "gradient flow"
    assert categories[1].chart[0].title == "backward signal per layer"


def test_an_mlp_without_agc_has_only_the_charts_it_logs(mlp_run: Run):
    found = charts(mlp_run)
    for title, matched in found.items():
        assert matched, f"chart {title!r} matches no logged tag"
    sections = [c.title for c in layout(mlp_run).category]
    assert "gradient through time" not in sections
    assert not any("AGC" in t or "dL/dh_t" in t for t in found)
    assert "clipping factor (norm)" not in found and "clipped share" not in found


def test_an_lstm_run_has_the_through_time_chart(lstm_run: Run):
    found = charts(lstm_run)
    for title, matched in found.items():
        assert matched, f"chart {title!r} matches no logged tag"
    sections = [c.title for c in layout(lstm_run).category]
    assert sections[0] == RELATIVE_SECTION and "gradient through time" in sections
    time_charts = [t for t in found if t.startswith("||dL/dh_t|| per time step")]
    assert len(time_charts) == 1
    assert all(t.startswith("time_grad/") for t in found[time_charts[0]])
    # The same chart in log10 over the last time step's, in the first section.
    first = layout(lstm_run).category[0]
    (relative,) = [c.title for c in first.chart if "dL/dh_t" in c.title]
    assert relative.startswith("log10 ||dL/dh_t||")
    assert found[relative] == sorted("log10_rel/" + t for t in found[time_charts[0]])
    assert not any("AGC" in t for t in found)


def test_log10_relative_through_time_is_the_raw_over_the_last_time_step(lstm_run: Run):
    scalars = lstm_run.events.Tags()["scalars"]
    raw = sorted(t for t in scalars if t.startswith("time_grad/"))
    last = raw[-1]  # t sorts zero-padded: the last time step
    assert raw
    for tag in raw:
        for (step, value), (_, head) in zip(
            scalar_series(lstm_run.events, tag), scalar_series(lstm_run.events, last)
        ):
            relative = dict(scalar_series(lstm_run.events, "log10_rel/" + tag))
            if value > 0 and head > 0:
                assert relative[step] == pytest.approx(math.log10(value / head), abs=1e-5)
            else:
                assert step not in relative


# --- non-finite gradients: one scalar ------------------------------------------------------


def test_nonfinite_gradients_are_one_scalar(mlp_run: Run):
    scalars = mlp_run.events.Tags()["scalars"]
    assert not [t for t in scalars if t.startswith("grad_nonfinite/")]
    series = scalar_series(mlp_run.events, "grad/nonfinite")
    assert [s for s, _ in series] == [0, 3]  # hist steps
    assert all(v == 0 for _, v in series)


def test_a_diverged_run_counts_its_nonfinite_gradients(tmp_path):
    # hist_every=1: the bad step (shown rather than left as a gap) is a hist step.
    run = train(tmp_path, *TINY, *DIVERGE, "trainer.hist_every=1").ok()
    summary = run.summary
    assert summary["status"] == "diverged"
    step = summary["nonfinite"]["step"]
    scalars = run.events.Tags()["scalars"]
    assert not [t for t in scalars if t.startswith("grad_nonfinite/")]
    series = dict(scalar_series(run.events, "grad/nonfinite"))
    assert sorted(series) == list(range(step + 1))
    assert series[step] > 0 and all(series[s] == 0 for s in range(step))
    # The raw tags show the bad step as NaN; the log10-relative ones skip it (no -inf
    # or NaN) and keep every step before it.
    for quantity in RELATIVE:
        for tag in TAGS:
            rel = scalar_series(run.events, f"log10_rel/{quantity}/{tag}")
            assert [s for s, _ in rel] == list(range(step)), (quantity, tag)
            assert all(math.isfinite(v) for _, v in rel)


def test_the_figure_title_says_where_and_until_when(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from rich.console import Console

    from gradexp.metrics import NullLogger
    from gradexp.train import Trainer
    from gradexp.verdicts import where_and_when

    # The default 20-layer sigmoid MLP: its first layers get under 1% of the head's signal.
    cfg = composed("trainer.steps=20", "trainer.progress=off")
    trainer = Trainer(cfg, tmp_path, NullLogger(), Console(quiet=True))
    result = trainer.train()
    headline = where_and_when(trainer.layers.names, trainer.history.records, cfg.diagnose)
    assert headline is not None and headline.startswith("hidden.0")
    title = trainer.draw(judged=result["verdicts"])._suptitle.get_text()
    assert title.splitlines()[-1] == headline


def test_run_summary_reads_as_markdown_not_a_json_dump(mlp_run: Run) -> None:
    (event,) = mlp_run.events.Tensors("run/summary/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    summary = mlp_run.summary
    assert not text.lstrip().startswith(("```", "{"))
    assert text.startswith(f"**{summary['status']}** after {summary['steps']} steps")
    kinds = ", ".join(dict.fromkeys(v["kind"] for v in summary["verdicts"]))
    assert f"verdicts: **{kinds}**" in text.splitlines()[0]
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    # The per-layer table: a row per layer, its gradient norm at step 0 as the terminal
    # shows it, then the first-over-last row.
    by_name = {
        cells[1]: cells for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)
    }
    for layer in summary["layers"]:
        cells = by_name[layer["name"]]
        assert float(cells[2]) == pytest.approx(layer["grad_norm"]["first"], rel=5e-3)
    assert "first/last" in by_name
    # The options and every final metric.
    for key, value in summary["options"].items():
        assert key in text and str(value) in text
    for key, value in summary["metrics"].items():
        metric = [r for r in rows if r.startswith(f"| {key} |")]
        assert metric and float(metric[0].split("|")[2]) == pytest.approx(value, rel=5e-3)
