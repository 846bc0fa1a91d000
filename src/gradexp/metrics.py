"""Where a run's numbers go: a small logger protocol with TensorBoard and null
implementations, and what TensorBoard shows derived from the probes' declarations:
the tags of a step record, the Custom Scalars layout, the HParams experiment and the
Markdown tables."""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from google.protobuf import struct_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_TENSOR, Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from gradexp.record import (
    CHARTS_FIRST,
    DATA_PLUGIN,
    RELATIVE_PREFIX,
    SECTION_ORDER,
    Quantity,
    StepRecord,
    log10_relative,
)
from gradexp.rundir import json_safe
from gradexp.verdicts import KINDS, describe, describe_outcome

if TYPE_CHECKING:
    from gradexp.config import Config


class MetricLogger(Protocol):
    """Where a run's numbers go. ``hparams``: the run's HParams columns (``hparams_of``,
    status, verdicts) and the metrics it reports (``Tags.metric_tags``). A logger may also
    have ``data(tag, value, step)``, the gradexp tab's JSON (see TensorBoardLogger.data);
    one written before it existed works without it (``log_data``)."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def histogram(self, tag: str, hist: dict[str, Any], step: int) -> None: ...
    def text(self, tag: str, text: str, step: int) -> None: ...
    def image(self, tag: str, image: Any, step: int) -> None: ...
    def hparams(self, hparams: dict[str, Any], metric_tags: list[str]) -> None: ...
    def close(self) -> None: ...


def log_data(logger: MetricLogger, tag: str, value: Any, step: int) -> None:
    """``logger.data(tag, value, step)`` when the logger has it (a custom logger written
    before it existed has not: the run goes on without the tab's data)."""
    if (data := getattr(logger, "data", None)) is not None:
        data(tag, value, step)


class NullLogger:
    """Logs nothing: for benchmarks and library use."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def histogram(self, tag: str, hist: dict[str, Any], step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def data(self, tag: str, value: Any, step: int) -> None:
        pass

    def image(self, tag: str, image: Any, step: int) -> None:
        pass

    def hparams(self, hparams: dict[str, Any], metric_tags: list[str]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Writes one event file in ``log_dir``.

    All scalars of a step travel in one Summary protobuf: writing tens of
    per-layer values one ``add_scalar`` call at a time is the largest cost of
    telemetry on CPU (measured on a 50-layer MLP: 50 calls a step cost 1.12x a bare
    step, one protobuf carrying the same 50 values 1.04x).
    """

    def __init__(
        self, log_dir: Path, layout: dict[str, Any] | None = None, purge_step: int | None = None
    ) -> None:
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        if layout:
            self.writer.add_custom_scalars(layout)

    def scalars(self, values: dict[str, float], step: int) -> None:
        summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self.writer.file_writer.add_summary(summary, step)

    def histogram(self, tag: str, hist: dict[str, Any], step: int) -> None:
        """``hist``: add_histogram_raw's arguments (see telemetry.histogram_from_stats)."""
        self.writer.add_histogram_raw(tag, global_step=step, **hist)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def data(self, tag: str, value: Any, step: int) -> None:
        """``value`` as JSON for the gradexp tab only: a string tensor owned by the gradexp
        plugin (DATA_PLUGIN), which the Text tab does not list."""
        meta = SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(plugin_name=DATA_PLUGIN, content=b"json"),
            data_class=DATA_CLASS_TENSOR,  # what TensorBoard's data provider serves as tensors
        )
        body = json.dumps(json_safe(value), allow_nan=False).encode()
        tensor = TensorProto(dtype=types_pb2.DT_STRING, string_val=[body])
        tensor.tensor_shape.SetInParent()  # a scalar
        summary = Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=tensor)])
        self.writer.file_writer.add_summary(summary, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """``image``: (3, H, W) uint8 (see figures.to_image)."""
        self.writer.add_image(tag, image, step, dataformats="CHW")

    def hparams(self, hparams: dict[str, Any], metric_tags: list[str]) -> None:
        """The HParams experiment (the same in every run, see ``hparams_experiment``) and
        this run's session, into this run's own event file (add_hparams would open a
        timestamped sub-run). The metric values are the ``hparams/<tag>`` scalars
        (``hparams_metrics``), logged with the others."""
        for summary in hparams_summaries(hparams, metric_tags):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        self.writer.close()


class Tags:
    """The TensorBoard tags of a run's declared quantities.

    Args:
        quantities: every probe's declarations.
        layer_tags: per depth layer, its tag suffix ("00_hidden.0").
        layer_names: per depth layer, its name ("hidden.0"), as step records key them.
        param_names: each parameter's qualified name.
    """

    def __init__(
        self,
        quantities: Iterable[Quantity],
        layer_tags: list[str],
        layer_names: list[str],
        param_names: list[str],
    ) -> None:
        self.quantities = list(quantities)
        self.layer_tags, self.param_names = layer_tags, param_names
        self.tag_of = dict(zip(layer_names, layer_tags))

    def values(self, record: StepRecord) -> dict[str, float]:
        """The scalars of one step record, tag -> value (a sparse quantity's NaNs left out:
        a layer AGC leaves out, one without such activations)."""
        out: dict[str, float] = {}
        for q in self.quantities:
            if q.kind == "scalar" and q.name in record.scalars:
                out[q.name] = record.scalars[q.name]
            elif q.kind in ("layer", "param"):
                values = (record.layers if q.kind == "layer" else record.params).get(q.name)
                suffixes = self.layer_tags if q.kind == "layer" else self.param_names
                for tag, v in zip(q.tags(suffixes), values or []):
                    if not (q.sparse and math.isnan(v)):
                        out[tag] = v
            elif q.kind == "time":
                relative = q.name.startswith(RELATIVE_PREFIX)
                for name, (steps, norms) in record.time.items():
                    pad = len(str(steps[-1]))
                    for t, v in zip(steps, log10_relative(norms) if relative else norms):
                        if not (q.sparse and math.isnan(v)):
                            out[f"{q.name}/{self.tag_of[name]}/t{t:0{pad}d}"] = v
        return out

    def histograms(self, record: StepRecord) -> list[tuple[str, dict[str, Any]]]:
        """(tag, add_histogram_raw's arguments) of each non-empty layer histogram."""
        return [
            (tag, hist)
            for q in self.quantities
            if q.kind == "hist"
            for tag, hist in zip(q.tags(self.layer_tags), record.hists.get(q.name, []))
            if hist is not None
        ]

    def metric_tags(self) -> list[str]:
        """The final scalars a run reports (summary.json's metrics, the HParams tab)."""
        return [q.name for q in self.quantities if q.kind == "scalar" and q.summary]

    def layout(self, time_layers: list[str]) -> dict[str, Any]:
        """TensorBoard's Custom Scalars tab: one chart per charted quantity this run
        declares, every layer of a per-layer quantity on it, and for each recurrent layer
        whose gradient through time is traced (``time_layers``: its names, none without a
        declared ``time`` quantity) every logged time step's gradient on one chart.

        Only what the run declares is charted (no AGC chart without clip=agc, no
        through-time chart without a traced recurrent layer), and the categories come in
        ``SECTION_ORDER``: the log10 charts relative to the head first; within one, the
        ``CHARTS_FIRST`` quantities' charts first."""
        sections: dict[str, dict[str, list[Any]]] = {}
        first = {name: i for i, name in enumerate(CHARTS_FIRST)}
        for q in sorted(self.quantities, key=lambda q: first.get(q.name, len(first))):
            if q.chart is None or q.kind not in ("layer", "scalar"):
                continue
            regex = (
                rf"^{re.escape(q.name)}/\d+_" if q.kind == "layer" else rf"^{re.escape(q.name)}$"
            )
            chart = sections.setdefault(q.section, {}).setdefault(q.chart, ["Multiline", []])
            chart[1].append(regex)
        # Through time: per recurrent layer traced, one chart of every logged time step.
        for q in (q for q in self.quantities if q.kind == "time" and q.chart):
            for tag in (self.tag_of[name] for name in time_layers):
                regex = rf"^{re.escape(q.name)}/{re.escape(tag)}/"
                sections.setdefault(q.section, {})[f"{q.chart}, {tag}"] = ["Multiline", [regex]]
        rank = {name: i for i, name in enumerate(SECTION_ORDER)}
        order = sorted(sections, key=lambda s: rank.get(s, len(rank)))  # stable
        return {name: sections[name] for name in order}


def hparams_of(cfg: Config) -> dict[str, Any]:
    """The run's choices for TensorBoard's HParams tab: every group, the model's sizes."""
    model = {
        key: str(list(value)) if isinstance(value, list) else value
        for key, value in vars(cfg.model).items()
        if key != "name"
    }
    return {
        "model": cfg.model.name,
        **model,
        "data": cfg.data.name,
        "activation": cfg.activation.name,
        "init": cfg.init.name,
        "norm": cfg.norm.name,
        "clip": cfg.clip.name,
        "optim": cfg.optim.name,
        "lr": cfg.optim.lr,
        "batch_size": cfg.trainer.batch_size,
        "tbptt": cfg.trainer.tbptt,
        "seed": cfg.seed,
    }


def verdict_hparams(verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """The verdicts as HParams columns: the kinds joined, and one flag per kind."""
    kinds = list(dict.fromkeys(v["kind"] for v in verdicts))
    return {"verdicts": ",".join(kinds), **{f"verdict/{k}": k in kinds for k in KINDS}}


def run_hparams(
    cfg: Config,
    status: str,
    verdicts: list[dict[str, Any]],
    outcome: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A finished run's HParams columns: its choices, its status, its verdicts and its
    outcome (learned, partly, not learned; "-" without a finite test loss)."""
    return {
        **hparams_of(cfg),
        "status": status,
        **verdict_hparams(verdicts),
        "outcome": outcome["kind"] if outcome else NOT_APPLICABLE,
    }


# --- the HParams tab ------------------------------------------------------------------
#
# TensorBoard's HParams plugin (2.x) reads the experiment, the list of columns, from the
# first run it finds with one (backend_context._find_experiment_tag: "arbitrarily pick
# the first one"), and each session's metric value as the last scalar of the metric's tag
# in that run. So every run writes the same experiment: every column any run can have
# (``hparam_columns``) and every metric any run reports (``declared_metric_tags``); a run
# fills the columns its model lacks with a stand-in, and logs every metric as an
# ``hparams/<tag>`` scalar that is always finite.

HPARAMS_METRIC = "hparams/"
# the prefix of the scalars the HParams tab reads
# A column this run's model does not have (an LSTM's depth, an MLP's hidden_size): strings,
# booleans and lists read "-", numbers -1 (every numeric model key is >= 0 but
# recurrent_scale and forget_bias, which the model column tells apart).
NOT_APPLICABLE = "-"
NOT_APPLICABLE_NUMBER = -1.0
# hparams/<tag> of a metric without a finite final value: the run diverged (NaN or inf;
# the status column says so) or never measured it (flow/time_grad_ratio without a
# recurrent layer, the accuracies of a regression task). Every declared metric (losses,
# accuracies, first-over-last norm ratios) is >= 0, so -1 is never a real value; it keeps
# the run in the parallel-coordinates view, which drops a session with a missing or NaN
# value in any shown column.
NO_VALUE = -1.0
FLOAT32_MAX = 3.4028234663852886e38
# The columns the HParams dashboard shows before any click: it shows five, those marked
# ``differs`` first (then by name), so these five are marked (see hparams_experiment).
HEADLINE = ("activation", "init", "model", "status", "verdicts")

ColumnKind = Literal["number", "string", "bool"]


def _kind(value: Any) -> ColumnKind:
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, (int, float)) else "string"


@functools.cache
def hparam_columns() -> dict[str, tuple[ColumnKind, bool]]:
    """Every HParams column a run can have: key -> (kind, whether every run has it).

    Read off ``run_hparams`` itself, over a config of each model family in
    gradexp.config.SCHEMAS (the other groups' defaults: only the model's keys vary).
    """
    from gradexp.config import SCHEMAS, Config

    others = {group: next(iter(kinds.values()))() for group, kinds in SCHEMAS.items()}
    rows = [
        run_hparams(Config(**{**others, "model": schema()}), "", [])
        for schema in SCHEMAS["model"].values()
    ]
    kinds: dict[str, ColumnKind] = {}
    for row in rows:
        for key, value in row.items():
            kind = kinds.setdefault(key, _kind(value))
            if kind != _kind(value):  # a key typed differently in two families
                kinds[key] = "string"
    everywhere = set.intersection(*(set(row) for row in rows))
    return {key: (kind, key in everywhere) for key, kind in kinds.items()}


def declared_quantities() -> tuple[Quantity, ...]:
    """Every quantity a run can declare: what each kind of probe declares (``declares``;
    the clip modes' own statistics), no model built."""
    from gradexp.probes import PROBES

    out: dict[str, Quantity] = {}
    for probe in PROBES:
        for q in probe.declared():
            out.setdefault(q.name, q)
    return tuple(out.values())


def _metric_rank(tag: str) -> int:
    # The HParams dashboard shows the first five metrics: the test set's, then the flow.
    return 0 if tag.endswith("/test") else 1 if tag.startswith("flow/") else 2


@functools.cache
def declared_metric_tags() -> tuple[str, ...]:
    """Every metric any run reports (``Tags.metric_tags`` of ``declared_quantities``):
    the test set's first, then the first-over-last ratios, then the training batch's."""
    tags = Tags(declared_quantities(), [], [], []).metric_tags()
    return tuple(sorted(tags, key=_metric_rank))  # stable: declaration order within


def _metric_tags(metric_tags: Iterable[str]) -> list[str]:
    """The declared metrics, and any a run's own probes add."""
    return list(dict.fromkeys([*declared_metric_tags(), *metric_tags]))


def hparams_metrics(
    finals: dict[str, float | None], metric_tags: Iterable[str]
) -> dict[str, float]:
    """The ``hparams/<tag>`` scalars the HParams tab reads, one per metric of the
    experiment: the run's final value (summary.json's ``metrics``), or ``NO_VALUE`` when
    it has none that is finite (as a float32: what TensorBoard stores)."""
    out = {}
    for tag in _metric_tags(metric_tags):
        value = finals.get(tag)
        # TensorBoard keeps a scalar as float32: a larger float64 would read as inf.
        finite = value is not None and math.isfinite(value) and abs(value) <= FLOAT32_MAX
        out[HPARAMS_METRIC + tag] = float(value) if finite else NO_VALUE  # type: ignore[arg-type]
    return out


def _columns(hparams: dict[str, Any]) -> dict[str, tuple[ColumnKind, bool]]:
    """The declared columns, and any this run has beside them (a model of its own)."""
    declared = hparam_columns()
    extra = {k: (_kind(v), False) for k, v in hparams.items() if k not in declared}
    return {**declared, **extra}


def hparams_experiment(hparams: dict[str, Any], metric_tags: Iterable[str]) -> api_pb2.Experiment:
    """The HParams experiment: the same in every run (``hparam_columns`` and
    ``declared_metric_tags``), so whichever run TensorBoard reads it from, every run's
    columns are there. Only a run with keys or metrics of its own (a model or probe
    added in code) adds them to its copy.

    Numbers are FLOAT64 columns, the rest strings; a boolean column lists its values
    (true, false and the stand-in), which gives the dashboard a checkbox filter. The
    ``HEADLINE`` columns are marked ``differs``: TensorBoard lists those first, and its
    HParams dashboard shows the first five.
    """
    infos = []
    for key, (kind, everywhere) in _columns(hparams).items():
        info = api_pb2.HParamInfo(
            name=key,
            type=api_pb2.DATA_TYPE_FLOAT64 if kind == "number" else api_pb2.DATA_TYPE_STRING,
            differs=key in HEADLINE,
        )
        if not everywhere:
            stand_in = f"{NOT_APPLICABLE_NUMBER:g}" if kind == "number" else f'"{NOT_APPLICABLE}"'
            info.description = f"{stand_in}: this run's model has no {key}"
        if kind == "bool":
            values = ["true", "false"] + ([] if everywhere else [NOT_APPLICABLE])
            info.domain_discrete.extend(values)
        infos.append(info)
    metrics = [
        api_pb2.MetricInfo(
            name=api_pb2.MetricName(tag=HPARAMS_METRIC + tag),
            description=f"the final {tag}; {NO_VALUE:g}: none that is finite (diverged or"
            " not measured)",
        )
        for tag in _metric_tags(metric_tags)
    ]
    return api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)


def _cell(value: Any) -> struct_pb2.Value:
    if isinstance(value, bool):
        return struct_pb2.Value(string_value=str(value).lower())
    if isinstance(value, (int, float)):
        return struct_pb2.Value(number_value=value)
    return struct_pb2.Value(string_value=str(value))


def hparams_session(hparams: dict[str, Any]) -> dict[str, struct_pb2.Value]:
    """The run's value in every column of the experiment: its own (booleans as
    "true"/"false", lists as text), the stand-in where its model has no such key."""
    out = {}
    for key, (kind, _) in _columns(hparams).items():
        if key in hparams and hparams[key] is not None:
            value = hparams[key]
            if kind == "string" and not isinstance(value, str):
                value = str(value)  # a column typed as text in another family
        else:
            value = NOT_APPLICABLE_NUMBER if kind == "number" else NOT_APPLICABLE
        out[key] = _cell(value)
    return out


def _plugin_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    data.version = metadata.PLUGIN_DATA_VERSION
    meta = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString()
        )
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def hparams_summaries(hparams: dict[str, Any], metric_tags: Iterable[str]) -> list[Summary]:
    """The three summaries of the HParams plugin: the experiment, the session's start
    (its hparams) and end (success: the status column says how the run ended)."""
    start = plugin_data_pb2.SessionStartInfo()
    for key, value in hparams_session(hparams).items():
        start.hparams[key].CopyFrom(value)
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
    experiment = hparams_experiment(hparams, metric_tags)
    return [
        _plugin_summary(
            metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)
        ),
        _plugin_summary(
            metadata.SESSION_START_INFO_TAG,
            plugin_data_pb2.HParamsPluginData(session_start_info=start),
        ),
        _plugin_summary(
            metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)
        ),
    ]


# --- Markdown ---------------------------------------------------------------------------


def markdown_cell(text: Any) -> str:
    """``text`` as one cell of a Markdown table (GitHub-flavoured, and Python-Markdown's
    tables, which TensorBoard's text tab renders): a backslash and a pipe escaped (an
    unescaped ``|``, as in ``||dL/dh_t||``, ends the cell), a line break as ``<br>``."""
    text = str(text).replace("\\", "\\\\").replace("|", "\\|")
    return "<br>".join(text.splitlines()) if text else text


def markdown_table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """A Markdown table, every cell escaped (``markdown_cell``)."""

    def line(cells: Iterable[Any]) -> str:
        return "| " + " | ".join(markdown_cell(c) for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def verdict_markdown(verdicts: list[dict[str, Any]], outcome: dict[str, Any] | None = None) -> str:
    """The verdicts table in Markdown, after the outcome in words when there is one."""
    head = f"outcome: **{markdown_cell(describe_outcome(outcome))}**\n\n" if outcome else ""
    rows = [
        [v["kind"], v["layer"] or "-", "-" if v["step"] is None else v["step"], describe(v)]
        for v in verdicts
    ]
    return head + markdown_table(["verdict", "layer", "step", "evidence"], rows)


def theory_markdown(layers: list[str], theory: dict[str, Any], measured: StepRecord) -> str:
    """The mean-field profile beside the measured one at step 0, one row per layer; the
    predicted backward signal is relative, so it is scaled to the measured head's."""
    fwd, bwd = measured.layer("signal_fwd", len(layers)), measured.layer("signal_bwd", len(layers))
    head = bwd[-1]
    rows = [
        [
            name,
            f"{theory['signal_fwd'][i]:.3g}",
            f"{fwd[i]:.3g}",
            f"{theory['signal_bwd'][i] * head:.3g}",
            f"{bwd[i]:.3g}",
        ]
        for i, name in enumerate(layers)
    ]
    header = ["layer", "fwd, theory", "fwd, measured", "bwd, theory", "bwd, measured"]
    return markdown_table(header, rows)
