"""What a run measures, declared once, and what one logged step measured.

A probe (gradexp.probes) declares each quantity it produces as a ``Quantity``; the
TensorBoard tags, the Custom Scalars layout, the HParams metrics, summary.json's
per-layer keys and final metrics, and the README's tag table are all derived from
these declarations. Each logging step's values, on the host, are one ``StepRecord``;
the verdicts, the figures and summary.json read the run's records (``History``).

No torch here: ``gradexp report`` and the verdicts use it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Kind = Literal["layer", "scalar", "param", "hist", "time"]

# What the gradexp tab reads and no other tab lists (a tensor of JSON text under the
# gradexp plugin's name): the run's summary.json at its end, its composed config at its
# start.
DATA_PLUGIN = "gradexp"
SUMMARY_DATA, CONFIG_DATA = "gradexp/summary", "gradexp/config"

# The Custom Scalars categories in the order TensorBoard shows them: the question first
# (how strong each layer's gradient is next to the head's, on a log10 scale that linear
# axes, smoothing and the data table's rounding cannot distort), then the raw per-layer
# charts; a category not named here (a probe added in code) follows, in declaration order.
RELATIVE_SECTION = "gradient flow relative to the head (log10)"
# A quantity named RELATIVE_PREFIX + <name> is log10 of <name> over its last entry (the
# head's; through time, the last time step's): 0 for it, -2 at 1% of it.
RELATIVE_PREFIX = "log10_rel/"
SECTION_ORDER = (
    RELATIVE_SECTION,
    "gradient flow",
    "gradient through time",
    "task",
    "clipping",
    "activation health",
)
# Within a category, the charts of these quantities come first (then declaration order):
# the backward signal is what the verdicts judge.
CHARTS_FIRST = ("log10_rel/signal_bwd", "signal_bwd")


@dataclass(frozen=True)
class Quantity:
    """One thing a probe measures.

    Attributes:
        name: the tag (a scalar: ``loss/train``) or the tag prefix (per layer:
            ``grad_norm`` gives ``grad_norm/<layer tag>``).
        kind: ``layer`` (one value per depth layer), ``scalar``, ``param`` (one value per
            parameter), ``hist`` (a histogram per layer) or ``time`` (per recurrent
            layer, one value per sampled time step).
        doc: what it is, for the README's tag table.
        sparse: not every layer has it: NaN values are not logged.
        chart: its Custom Scalars chart title (None: no chart); a scalar chart collects
            every scalar with the same title.
        section: the Custom Scalars category of the chart.
        log_scale: whether it spans decades (read it on a log axis).
        summary: a per-layer quantity: its first and last values go into summary.json's
            ``layers``; a scalar: its final value into ``metrics`` and the HParams tab.
        when: the steps it is logged at, for the README (``log steps`` by default).
    """

    name: str
    kind: Kind = "layer"
    doc: str = ""
    sparse: bool = False
    chart: str | None = None
    section: str = "gradient flow"
    log_scale: bool = False
    summary: bool = False
    when: str = "log steps"

    def tags(self, suffixes: list[str]) -> list[str]:
        """The TensorBoard tag of each layer (or parameter) of a per-layer quantity."""
        return [f"{self.name}/{s}" for s in suffixes]


def ratio(first: float | None, last: float | None) -> float | None:
    """first / last; None when either is missing or non-finite, or last is not positive.

    The one convention for every first-over-last ratio the tool shows (the terminal,
    summary.json, the verdicts, ``gradexp report``).
    """
    if first is None or last is None or not (math.isfinite(first) and math.isfinite(last)):
        return None
    if last <= 0:
        return None
    return first / last


def log10_relative(values: list[float]) -> list[float]:
    """Each layer's value over the head's (the last layer's), in log10: 0 for the head,
    -2 for a layer at 1% of it. NaN (not logged: see ``Quantity.sparse``) where the
    layer's or the head's value is zero, negative or not finite, rather than -inf."""

    def log10(v: float) -> float:
        return math.log10(v) if math.isfinite(v) and v > 0 else math.nan

    head = log10(values[-1]) if values else math.nan
    # A difference of logs: finite where the ratio itself would overflow to inf or 0.
    return [log10(v) - head for v in values]


@dataclass
class StepRecord:
    """One logging step's values on the host, NaN where a layer was not measured.

    Attributes:
        step: the training step.
        scalars: scalar quantity name -> value.
        layers: per-layer quantity name -> one value per depth layer, input to output.
        time: recurrent layer name -> (sampled time steps, ||dL/dh_t|| at them).
        params: per-parameter quantity name -> one value per parameter (logged, not kept
            in the History).
        hists: histogram quantity name -> per layer, add_histogram_raw's arguments or
            None (logged, not kept in the History).
    """

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    layers: dict[str, list[float]] = field(default_factory=dict)
    time: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    params: dict[str, list[float]] = field(default_factory=dict)
    hists: dict[str, list[dict[str, Any] | None]] = field(default_factory=dict)

    def layer(self, name: str, n: int) -> list[float]:
        """The per-layer values of ``name``, all NaN when this step has none."""
        return self.layers.get(name) or [math.nan] * n


class History:
    """A run's logging steps in order, and what summary.json reads from them."""

    def __init__(self, names: list[str]) -> None:
        self.names = names  # depth layer names, input to output
        self.records: list[StepRecord] = []

    def append(self, record: StepRecord) -> None:
        """Keep the step's record, without what only TensorBoard needs (per-parameter
        values, histograms): a long run's history stays small."""
        self.records.append(StepRecord(record.step, record.scalars, record.layers, record.time))

    def first_last(self, name: str) -> tuple[list[float] | None, list[float] | None]:
        """The per-layer values of ``name`` at the first and the last step that has them."""
        have = [r.layers[name] for r in self.records if name in r.layers]
        return (have[0], have[-1]) if have else (None, None)

    def final(self, name: str) -> float | None:
        """The last logged value of scalar ``name``."""
        for r in reversed(self.records):
            if name in r.scalars:
                return r.scalars[name]
        return None

    def layer_summary(self, quantities: list[Quantity]) -> list[dict[str, Any]]:
        """summary.json's ``layers``: each declared per-layer quantity's first and last
        value, null where not measured."""

        def pick(values: list[float] | None, i: int) -> float | None:
            return None if values is None or math.isnan(values[i]) else values[i]

        out = []
        columns = {q.name: self.first_last(q.name) for q in quantities}
        for i, name in enumerate(self.names):
            entry: dict[str, Any] = {"index": i, "name": name}
            for key, (first, last) in columns.items():
                entry[key] = {"first": pick(first, i), "last": pick(last, i)}
            out.append(entry)
        return out

    def time_summary(self) -> list[dict[str, Any]]:
        """summary.json's ``time``: per recurrent layer, ||dL/dh_t|| at the sampled time
        steps at the first and the last logging step, and their first/last ratio."""
        out = []
        names = list(dict.fromkeys(name for r in self.records for name in r.time))
        for name in names:
            have = [r.time[name] for r in self.records if r.time.get(name, ([], []))[0]]
            if not have:
                continue
            (steps, first), (_, last) = have[0], have[-1]
            out.append(
                {
                    "layer": name,
                    "steps": steps,
                    "grad_norm": {"first": first, "last": last},
                    "ratio": {
                        "first": ratio(first[0], first[-1]),
                        "last": ratio(last[0], last[-1]),
                    },
                }
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain containers only (a checkpoint is loaded with weights_only=True)."""
        return {"names": self.names, "records": [asdict(r) for r in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.names = list(state["names"])
        self.records = [
            StepRecord(
                r["step"],
                r["scalars"],
                r["layers"],
                {k: (list(s), list(v)) for k, (s, v) in r["time"].items()},
            )
            for r in state["records"]
        ]
