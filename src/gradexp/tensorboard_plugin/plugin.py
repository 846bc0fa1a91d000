"""The backend of the gradexp tab: JSON of the runs' own per-layer series.

TensorBoard loads it as a dynamic plugin: it serves an ES module (``static/index.js``,
shown in an iframe tab) and routes that read the runs' scalars through TensorBoard's
data provider, so the tab shows what the Scalars tab would, from the same events:

- ``/runs[?first=N[&quantity=Q]]``: every run with per-layer series: its layers (input
  first), the per-layer quantities it has, its recurrent layers with gradients through
  time, its verdicts; with ``first``, also the first N runs' grids (by name) as
  ``/heatmaps`` sends them (the sweep view's first screen: one listing serves both).
- ``/heatmap?run=R&quantity=Q``: the layer x step grid of one quantity, the values as
  the event file holds them (null where a layer has no value at a step).
- ``/heatmaps?quantity=Q[&run=R...][&limit=N]``: every run's (these runs', the first
  N runs by name) grid of that quantity (the sweep view), its values as float32 bytes:
  ``values_f32``, base64 of little-endian float32, layer-major, NaN where none.
- ``/time?run=R``: per recurrent layer, the time step x training step grid of
  ||dL/dh_t||.
- ``/summary?run=R``: the run's summary.json as logged at its end: status, verdicts
  with their evidence, the mean-field prediction, the options, the metrics; and its
  composed config ({"model.depth": 20, ...}), logged at its start.
- ``/statuses``: every finished run's status (the sweep view's cards).

An unknown run or quantity is a 4xx with a one-line JSON error, never a traceback.
No torch here: TensorBoard imports this module in its own process.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import Request, Response

from gradexp.record import CONFIG_DATA, DATA_PLUGIN, SUMMARY_DATA

PLUGIN_NAME = "gradexp"
STATIC = Path(__file__).parent / "static"
# Per-layer quantities the tab draws, first the default, with how to read them.
QUANTITIES = {
    "signal_bwd": "backward signal RMS(dL/dh)",
    "grad_norm": "parameter gradient ||dL/dW||",
    "signal_fwd": "forward signal RMS(h)",
    "update_ratio": "update / weight ||dW||/||W||",
    "dead_frac": "dead share of units",
    "sat_frac": "saturated share of units",
    "gate_sat_frac": "saturated share of gates (LSTM, GRU)",
}
# Per-layer tags: <quantity>/<NN>_<layer name>; through time: time_grad/<NN>_<layer>/t<k>.
LAYER_TAG = re.compile(r"^(?P<quantity>[a-z_]+)/(?P<index>\d+)_(?P<layer>[^/]+)$")
TIME_TAG = re.compile(r"^time_grad/(?P<index>\d+)_(?P<layer>[^/]+)/t(?P<t>\d+)$")
# The verdicts table, as torch's add_text names its tag.
VERDICTS_TAG = "run/verdicts/text_summary"
# Runs logged before the gradexp data tags carried summary.json as this text's JSON.
OLD_SUMMARY_TAG = "run/summary/text_summary"
# What of summary.json the tab shows.
SUMMARY_KEYS = ("status", "error", "steps", "options", "verdicts", "theory", "metrics")
# The sweep view's values as float32 bytes (what gradexp logs): 100 runs x 30 layers x
# 100 steps is 1.7 MB in base64, where 4-digit JSON was 3.3 MB and took 4x the time to write.
SWEEP_DTYPE = "<f4"
# Every logged step: the tab is about step 0 and where the flow changed.
MAX_STEPS = 100_000


def _json(request: Request, body: Any, status: int = 200) -> Response:
    # TensorBoard's own responder: its security headers (nosniff, CSP) on every reply.
    return http_util.Respond(
        request, json.dumps(body, allow_nan=False), "application/json", code=status
    )


def _error(request: Request, message: str, status: int) -> Response:
    return _json(request, {"error": message}, status)


def _finite(value: float) -> float | None:
    """A value for JSON: None when not finite."""
    return value if math.isfinite(value) else None


class GradexpPlugin(base_plugin.TBPlugin):
    """The gradexp tab: which layer starves, and from when."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._data = context.data_provider
        # (experiment, run, quantity) -> (its tags' last step and wall time, its grid):
        # reading a sweep's scalars is most of a sweep view's time; a run that logged
        # since (or whose layers changed) has another stamp and is read again.
        self._grid_cache: dict[tuple[str, str, str], tuple[tuple, dict[str, Any]]] = {}

    def is_active(self) -> bool:
        return False  # legacy; TensorBoard decides from data_plugin_names

    def data_plugin_names(self) -> tuple[str, ...]:
        return ("scalars", "text", DATA_PLUGIN)  # active when the logdir has scalars

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="gradexp")

    def get_plugin_apps(self) -> dict[str, Any]:
        return {
            "/index.js": self._index,
            "/runs": self._runs,
            "/heatmap": self._heatmap,
            "/heatmaps": self._heatmaps,
            "/time": self._time,
            "/summary": self._summary,
            "/statuses": self._statuses,
        }

    # --- reading ---------------------------------------------------------------------
    def _scalar_tags(self, request: Request, runs: list[str] | None = None) -> dict:
        return self._data.list_scalars(
            _ctx(request),
            experiment_id=_experiment(request),
            plugin_name="scalars",
            run_tag_filter=provider.RunTagFilter(runs=runs) if runs else None,
        )

    def _read(self, request: Request, run: str, tags: list[str]) -> dict[str, list]:
        data = self._data.read_scalars(
            _ctx(request),
            experiment_id=_experiment(request),
            plugin_name="scalars",
            downsample=MAX_STEPS,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=tags),
        )
        return data.get(run, {})

    def _texts(
        self, request: Request, runs: list[str], tag: str, plugin: str = "text"
    ) -> dict[str, str]:
        """Each run's last text logged under ``tag`` (by ``plugin``)."""
        data = self._data.read_tensors(
            _ctx(request),
            experiment_id=_experiment(request),
            plugin_name=plugin,
            downsample=1,
            run_tag_filter=provider.RunTagFilter(runs=runs, tags=[tag]),
        )
        out = {}
        for run, tags in data.items():
            series = tags.get(tag) or []
            if series:
                value = series[-1].numpy
                raw = value.item() if value.shape == () else value.flat[0]
                out[run] = raw.decode() if isinstance(raw, bytes) else str(raw)
        return out

    def _summaries(self, request: Request, runs: list[str]) -> dict[str, dict[str, Any]]:
        """Each finished run's summary.json as logged at its end (a run still running has
        none): the gradexp data, else (runs logged before it) the run/summary text."""
        found = {}
        logged = self._texts(request, runs, SUMMARY_DATA, DATA_PLUGIN)
        old = [run for run in runs if run not in logged]
        texts = {**(self._texts(request, old, OLD_SUMMARY_TAG) if old else {}), **logged}
        for run, text in texts.items():
            if (summary := _summary_json(text)) is not None:
                found[run] = summary
        return found

    def _verdicts(self, request: Request, runs: list[str]) -> dict[str, str]:
        """Each run's run/verdicts text (a Markdown table), its last version."""
        return self._texts(request, runs, VERDICTS_TAG)

    # --- routes ----------------------------------------------------------------------
    @Request.application
    def _index(self, request: Request) -> Response:
        return Response((STATIC / "index.js").read_text(), content_type="application/javascript")

    @Request.application
    def _runs(self, request: Request) -> Response:
        first = request.args.get("first", type=int)
        quantity = request.args.get("quantity", "signal_bwd")
        if first is not None and quantity not in QUANTITIES:
            return _unknown_quantity(request, quantity)
        listing = self._scalar_tags(request)
        runs: dict[str, dict[str, Any]] = {}
        for run, tags in listing.items():
            layers: dict[int, str] = {}
            quantities: set[str] = set()
            time_layers: set[str] = set()
            for tag in tags:
                if m := TIME_TAG.match(tag):
                    time_layers.add(f"{m['index']}_{m['layer']}")
                elif (m := LAYER_TAG.match(tag)) and m["quantity"] in QUANTITIES:
                    layers[int(m["index"])] = m["layer"]
                    quantities.add(m["quantity"])
            if not quantities:
                continue  # not a gradexp run (or nothing per layer yet)
            runs[run] = {
                "layers": [layers[i] for i in sorted(layers)],
                "quantities": [q for q in QUANTITIES if q in quantities],
                "time_layers": sorted(time_layers),
            }
        verdicts = self._verdicts(request, list(runs)) if runs else {}
        for run, info in runs.items():
            info["verdicts"] = verdicts.get(run)
        body: dict[str, Any] = {"runs": runs, "quantities": QUANTITIES}
        if first is not None:
            shown = sorted(runs)[: max(first, 0)]
            body["grids"] = self._sweep(request, quantity, {run: listing[run] for run in shown})
        return _json(request, body)

    @Request.application
    def _heatmap(self, request: Request) -> Response:
        run, quantity = request.args.get("run"), request.args.get("quantity", "signal_bwd")
        if not run:
            return _error(request, "give a run: /heatmap?run=RUN&quantity=QUANTITY", 400)
        if quantity not in QUANTITIES:
            return _unknown_quantity(request, quantity)
        grids = self._grids(request, [run], quantity)
        if run not in grids:
            return _error(request, f"run {run!r}: no such run", 404)
        if grids[run] is None:
            return _error(request, f"run {run!r} has no per-layer {quantity}", 404)
        grid = grids[run]
        values = [[_finite(v) for v in row] for row in grid["values"].tolist()]
        return _json(request, {**grid, "values": values})  # values[layer][step], exact

    @Request.application
    def _heatmaps(self, request: Request) -> Response:
        """Every run's grid of one quantity in one reply (the sweep view): one listing and
        one read over all runs, where a request per run cost a round trip each."""
        quantity = request.args.get("quantity", "signal_bwd")
        if quantity not in QUANTITIES:
            return _unknown_quantity(request, quantity)
        runs = request.args.getlist("run") or None
        limit = request.args.get("limit", type=int)  # the first runs by name: a first screen
        listing = self._scalar_tags(request, runs)
        if limit is not None and runs is None:  # one listing serves both
            listing = {run: listing[run] for run in sorted(listing)[: max(limit, 0)]}
        return _json(request, {"grids": self._sweep(request, quantity, listing)})

    def _sweep(
        self, request: Request, quantity: str, listing: dict[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """The grids of ``listing``'s runs that have ``quantity``, values as float32 bytes."""
        grids = {}
        for run, grid in self._grids(request, None, quantity, listing).items():
            if grid is not None:
                values = grid["values"].astype(SWEEP_DTYPE).tobytes()
                grids[run] = {
                    **{k: v for k, v in grid.items() if k != "values"},
                    "values_f32": base64.b64encode(values).decode("ascii"),
                }
        return grids

    def _grids(
        self,
        request: Request,
        runs: list[str] | None,
        quantity: str,
        listing: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, dict[str, Any] | None]:
        """run -> its layer x step grid of ``quantity`` (None: it has none), for ``runs``
        (None: every run; or those of ``listing``, their scalar tags as listed): values
        a float64 array, [layer, step], input layer first, NaN where none."""
        if listing is None:
            listing = self._scalar_tags(request, runs)
        experiment = _experiment(request)
        orders, stamps, grids = {}, {}, {}
        for run, tags in listing.items():
            by_index = {}
            for tag in tags:
                m = LAYER_TAG.match(tag)
                if m and m["quantity"] == quantity:
                    by_index[int(m["index"])] = (tag, m["layer"])
            order = [by_index[i] for i in sorted(by_index)]
            if not order:
                grids[run] = None
                continue
            # Each tag's last step and wall time as listed: logging more changes them.
            stamps[run] = tuple(
                (tag, tags[tag].max_step, tags[tag].max_wall_time) for tag, _ in order
            )
            cached = self._grid_cache.get((experiment, run, quantity))
            if cached is not None and cached[0] == stamps[run]:
                grids[run] = cached[1]
            else:
                orders[run] = order
        wanted = {tag for order in orders.values() for tag, _ in order}
        data = (
            self._data.read_scalars(
                _ctx(request),
                experiment_id=experiment,
                plugin_name="scalars",
                downsample=MAX_STEPS,
                run_tag_filter=provider.RunTagFilter(runs=list(orders), tags=wanted),
            )
            if wanted
            else {}
        )
        for run, order in orders.items():
            series = data.get(run, {})
            logged = [[d.step for d in series.get(tag, [])] for tag, _ in order]
            steps = sorted(set().union(*logged))
            column = {step: j for j, step in enumerate(steps)}
            values = np.full((len(order), len(steps)), np.nan)
            for i, (tag, _) in enumerate(order):
                at = slice(None) if logged[i] == steps else [column[s] for s in logged[i]]
                values[i, at] = [d.value for d in series.get(tag, [])]
            grid = {
                "run": run,
                "quantity": quantity,
                "layers": [name for _, name in order],
                "steps": steps,
                "values": values,
            }
            self._grid_cache[(experiment, run, quantity)] = (stamps[run], grid)
            grids[run] = grid
        return grids

    @Request.application
    def _summary(self, request: Request) -> Response:
        """The run's summary.json as it logged it at its end (status, verdicts with their
        evidence, the mean-field prediction, the options, the metrics; null while it
        runs) and its composed config (null for runs logged before it was)."""
        run = request.args.get("run")
        if not run:
            return _error(request, "give a run: /summary?run=RUN", 400)
        if run not in self._scalar_tags(request, [run]):
            return _error(request, f"run {run!r}: no such run", 404)
        summary = self._summaries(request, [run]).get(run)
        config = _summary_json(self._texts(request, [run], CONFIG_DATA, DATA_PLUGIN).get(run, ""))
        body = {k: summary.get(k) for k in SUMMARY_KEYS} if summary else None
        return _json(request, {"run": run, "summary": body, "config": config})

    @Request.application
    def _statuses(self, request: Request) -> Response:
        """run -> its status (completed, diverged, failed, interrupted) from its logged
        summary; a run still running has none. Asked after the sweep view is drawn."""
        summaries = self._summaries(request, list(self._scalar_tags(request)))
        statuses = {
            run: s["status"] for run, s in summaries.items() if isinstance(s.get("status"), str)
        }
        return _json(request, {"statuses": statuses})

    @Request.application
    def _time(self, request: Request) -> Response:
        run = request.args.get("run")
        if not run:
            return _error(request, "give a run: /time?run=RUN", 400)
        tags = self._scalar_tags(request, [run]).get(run)
        if tags is None:
            return _error(request, f"run {run!r}: no such run", 404)
        by_layer: dict[str, dict[int, str]] = defaultdict(dict)
        for tag in tags:
            if m := TIME_TAG.match(tag):
                by_layer[f"{m['index']}_{m['layer']}"][int(m["t"])] = tag
        layers = {}
        for layer, by_t in sorted(by_layer.items()):
            ts = sorted(by_t)
            series = self._read(request, run, [by_t[t] for t in ts])
            steps = sorted({d.step for t in ts for d in series.get(by_t[t], [])})
            column = {step: j for j, step in enumerate(steps)}
            values = []
            for t in ts:
                row: list[float | None] = [None] * len(steps)
                for d in series.get(by_t[t], []):
                    row[column[d.step]] = _finite(d.value)
                values.append(row)
            layers[layer] = {"t": ts, "steps": steps, "values": values}  # values[t][step]
        return _json(request, {"run": run, "layers": layers})


def _summary_json(text: str) -> dict[str, Any] | None:
    """A JSON object from its text (also inside a Markdown code block, as runs logged
    before the gradexp data tags wrote run/summary); None if not one."""
    try:
        summary = json.loads(text.strip().removeprefix("```").removesuffix("```"))
    except ValueError:
        return None
    return summary if isinstance(summary, dict) else None


def _unknown_quantity(request: Request, quantity: str) -> Response:
    return _error(
        request, f"quantity={quantity}: unknown; choose from {', '.join(QUANTITIES)}", 400
    )


def _ctx(request: Request) -> Any:
    from tensorboard import plugin_util

    return plugin_util.context(request.environ)


def _experiment(request: Request) -> str:
    from tensorboard import plugin_util

    return plugin_util.experiment_id(request.environ)
