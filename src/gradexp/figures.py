"""The per-run gradient-flow figure: per-layer gradient norm and signals at a few steps.

matplotlib is an optional dependency (``pip install 'gradexp[plot]'``), imported only
when a figure is drawn: it costs ~0.5 s to import and may be absent. Figures are drawn
on the Agg canvas directly, never through pyplot: no global figure registry to leak
into, no GUI backend, safe in worker threads and processes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gradexp.record import StepRecord

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MISSING = "figures need matplotlib: pip install 'gradexp[plot]'"
NO_VALUES = "no finite values"
THEORY_LABEL = "mean-field theory (init)"

# Layer names shown per panel at most; beyond that every k-th is labelled.
MAX_TICK_LABELS = 20
# Inches per panel and the figure's height; at DPI the PNG is ~500 px a panel x 400 px.
PANEL_WIDTH, HEIGHT, DPI = 5.0, 4.0, 100
# Data spanning more than this many decades gets no minor log ticks.
MINOR_TICKS_UP_TO = 2.0
# Log y-axes end within 10**-LOG_LIMIT .. 10**LOG_LIMIT; values beyond are off the axis.
# Statistics of float32 training lie within ~1e-46 .. 1e45.
LOG_LIMIT = 100
# Lines get point markers up to this many points.
MARKERS_UP_TO = 40
# viridis from 0 to this: its pale yellow top end is hard to see on white.
CMAP_TOP = 0.85
TIME_STYLES = ("-", "--", ":", "-.")

PANELS = (
    ("grad_norm", "parameter gradient ‖∂L/∂W‖", "L2 norm of the layer's gradient"),
    ("signal_bwd", "backward signal RMS(∂ℓ/∂h)", "per-example RMS of ∂ℓ/∂h"),
    ("signal_fwd", "forward signal RMS(h)", "RMS of the layer output h"),
)


def missing_dependency() -> str | None:
    """Why figures cannot be drawn here, or None when they can.

    Returns:
        None when matplotlib imports, else a one-line message with the install hint.
    """
    import importlib.util

    # Found, not imported: importing matplotlib costs ~1 s, and a run draws its figure
    # only at the end (or every trainer.figure_every steps).
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        found = False
    return None if found else MISSING


def pick_steps(steps: Sequence[int], max_lines: int = 6) -> list[int]:
    """Up to ``max_lines`` of the logged steps, evenly spread, first and last included.

    Args:
        steps: the logged training steps, in any order; duplicates count once.
        max_lines: how many steps at most; 1 keeps only the last step.

    Returns:
        The chosen steps, sorted and unique; all of them when there are few.

    Raises:
        ValueError: if ``max_lines`` < 1.
    """
    if max_lines < 1:
        raise ValueError(f"max_lines must be at least 1, got {max_lines}")
    unique = sorted(set(steps))
    n = len(unique)
    if n <= max_lines:
        return unique
    if max_lines == 1:
        return [unique[-1]]
    # Spread over the logged steps' positions: distinct indices since n > max_lines.
    return [unique[round(i * (n - 1) / (max_lines - 1))] for i in range(max_lines)]


def _positive(values: Sequence[float | None]) -> list[float]:
    """The values, NaN for any a log axis cannot show (None, NaN, inf, <= 0)."""
    out = []
    for v in values:
        x = math.nan if v is None else float(v)
        out.append(x if math.isfinite(x) and x > 0 else math.nan)
    return out


def _marker(points: int) -> str | None:
    # Markers keep a value between two gaps visible; on many points they only clutter.
    return "o" if points <= MARKERS_UP_TO else None


def _finish_log_axis(ax: Axes) -> None:
    """Log y-axis, or the "no finite values" note when nothing on it can be shown."""
    finish_log_axes([ax])


def finish_log_axes(axes: Sequence[Axes]) -> None:
    """One log y range for all ``axes`` (what one panel shows reads the same in all);
    an axis with nothing it can show gets the "no finite values" note instead."""
    plotted = {
        ax: [y for line in ax.get_lines() for y in line.get_ydata() if not math.isnan(y)]
        for ax in axes
    }
    ys = [y for values in plotted.values() for y in values]
    for ax, values in plotted.items():
        if not values:
            # A log scale with no positive data only warns; leave the axis linear and bare.
            ax.set_yticks([])
            ax.text(0.5, 0.5, NO_VALUES, transform=ax.transAxes, ha="center", va="center")
    if not ys:
        return
    lo, hi = math.log10(min(ys)), math.log10(max(ys))
    # Limits set here, not autoscaled: matplotlib pads 5% in log space too, but over
    # hundreds of decades its ticks land past float64's range and its formatter raises.
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    for ax, values in plotted.items():
        if not values:
            continue
        # Limits first: that turns autoscaling off before the scale change would run it.
        ax.set_ylim(10.0 ** max(lo - pad, -LOG_LIMIT), 10.0 ** min(hi + pad, LOG_LIMIT))
        ax.set_yscale("log")
        if hi - lo > MINOR_TICKS_UP_TO:
            # Minor ticks cost a third of the drawing time; over several decades the major
            # ones suffice (under that, minor ticks carry the only labels).
            from matplotlib.ticker import NullLocator

            ax.yaxis.set_minor_locator(NullLocator())


def _layer_ticks(ax: Axes, layers: Sequence[str]) -> None:
    n = len(layers)
    stride = math.ceil(n / MAX_TICK_LABELS)
    ticks = list(range(0, n, stride))
    if ticks[-1] != n - 1:
        # Always label the head; drop the regular tick just before it if the two would touch.
        if n - 1 - ticks[-1] < stride / 2:
            ticks.pop()
        ticks.append(n - 1)
    ax.set_xticks(ticks, [layers[i] for i in ticks], rotation=60, ha="right", fontsize=7)
    ax.tick_params(axis="x", pad=1)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel("layer (input → output)")


def _theory_line(ax: Axes, values: Sequence[float | None], scale: float = 1.0) -> None:
    ys = [y * scale for y in _positive(values)]
    ax.plot(range(len(ys)), ys, "k--", lw=1.2, label=THEORY_LABEL, zorder=3)


def _head_scale(theory: Sequence[float | None], measured: Sequence[float | None]) -> float | None:
    """The factor that puts relative theory's head (last point) on the measured head's."""
    last, head = _positive([theory[-1], measured[-1]])
    if math.isnan(last) or math.isnan(head):
        return None
    return head / last


def _check_lengths(name: str, values: Sequence[float | None], layers: int) -> None:
    if len(values) != layers:
        raise ValueError(f"{name} has {len(values)} values for {layers} layers")


def _time_panel(ax: Axes, shown: list[StepRecord], colors: dict[int, tuple]) -> None:
    names = sorted({name for snap in shown for name in snap.time})
    style = {name: TIME_STYLES[i % len(TIME_STYLES)] for i, name in enumerate(names)}
    for snap in shown:
        for name, (ts, norms) in snap.time.items():
            ax.plot(
                ts,
                _positive(norms),
                style[name],
                color=colors[snap.step],
                lw=1.3,
                marker=_marker(len(ts)),
                ms=2.5,
                label=f"step {snap.step}",
            )
    title = "gradient through time ‖∂L/∂h_t‖"
    if len(names) == 1:
        title += f"\n{names[0]}"
    elif names:
        # Steps are told apart by color (the figure legend), layers by line style.
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], ls=style[n], color="0.3", label=n) for n in names]
        ax.legend(handles=handles, fontsize=7, loc="best", title="layer", title_fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("time step t")
    ax.set_ylabel("‖∂L/∂h_t‖ over batch and units")
    _finish_log_axis(ax)


def flow_figure(
    layers: list[str],
    snapshots: list[StepRecord],
    theory: dict | None = None,
    title: str = "",
    max_lines: int = 6,
) -> Figure:
    """The gradient-flow figure of a run: how gradients and signals change with depth.

    Panels, each with x = layer in depth order and a log y-axis, one line per chosen
    training step (viridis, first to last): the parameter-gradient norm, the backward
    signal and the forward signal; a fourth, ||dL/dh_t|| against time step t, when any
    snapshot has recurrent ``time`` entries (one line style per recurrent layer).
    Values a log axis cannot show (None, NaN, inf, <= 0) leave gaps; a panel with none
    to show says so.

    Args:
        layers: the layer names, input to output.
        snapshots: the logged steps' statistics, in any order; of two with the same
            step, the later counts.
        theory: optional mean-field predictions at initialization: "signal_fwd",
            absolute per layer, drawn as is on the forward panel; "signal_bwd", relative
            to the head (last entry 1), scaled to the earliest snapshot's measured head
            on the backward panel. Other keys are ignored.
        title: the figure's title; none when empty.
        max_lines: how many training steps to draw at most (see pick_steps).

    Returns:
        A matplotlib Figure on an Agg canvas, not registered with pyplot.

    Raises:
        ValueError: if there are no layers, or a snapshot or theory list does not have
            one value per layer.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not layers:
        raise ValueError("a flow figure needs at least one layer")
    theory = {k: v for k, v in (theory or {}).items() if k in ("signal_fwd", "signal_bwd")}
    for key, values in theory.items():
        _check_lengths(f"theory[{key!r}]", values, len(layers))
    by_step: dict[int, StepRecord] = {}
    for snap in snapshots:
        for key, _, _ in PANELS:
            _check_lengths(f"step {snap.step} {key}", snap.layer(key, len(layers)), len(layers))
        by_step[snap.step] = snap
    chosen = pick_steps(list(by_step), max_lines)
    shown = [by_step[s] for s in chosen]
    span = (chosen[-1] - chosen[0]) if chosen else 0
    cmap = colormaps["viridis"]
    colors = {s: cmap(CMAP_TOP * (s - chosen[0]) / span if span else 0.0) for s in chosen}

    with_time = any(snap.time for snap in shown)
    panels = len(PANELS) + with_time
    fig = Figure(figsize=(PANEL_WIDTH * panels, HEIGHT), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    x = range(len(layers))
    for ax, (key, panel_title, ylabel) in zip(axes, PANELS):
        for snap in shown:
            ax.plot(
                x,
                _positive(snap.layer(key, len(layers))),
                color=colors[snap.step],
                lw=1.5,
                marker=_marker(len(layers)),
                ms=2.5,
                label=f"step {snap.step}",
            )
        ax.set_title(panel_title, fontsize=10)
        ax.set_ylabel(ylabel)
        _layer_ticks(ax, layers)
    bwd_ax, fwd_ax = axes[1], axes[2]
    if "signal_fwd" in theory:
        _theory_line(fwd_ax, theory["signal_fwd"])
    if "signal_bwd" in theory and shown:
        scale = _head_scale(theory["signal_bwd"], shown[0].layer("signal_bwd", len(layers)))
        if scale is not None:
            _theory_line(bwd_ax, theory["signal_bwd"], scale)
    for ax in axes[: len(PANELS)]:
        _finish_log_axis(ax)
        ax.grid(True, which="major", alpha=0.3)
    if with_time:
        _time_panel(axes[-1], shown, colors)
        axes[-1].grid(True, which="major", alpha=0.3)

    # One legend for all panels: the steps' colors, then the theory line.
    handles = {}
    for ax in axes[: len(PANELS)]:
        for line in ax.get_lines():
            handles.setdefault(line.get_label(), line)
    if handles:
        fig.legend(handles=list(handles.values()), loc="outside right upper", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def _render(fig: Figure) -> np.ndarray:
    """Draw the figure on an Agg canvas; its pixels as an (H, W, 3) uint8 array."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # A figure from elsewhere (pyplot, another backend) gets an Agg canvas to render on.
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def save_png(fig: Figure, path: Path) -> np.ndarray:
    """Write the figure as an RGB PNG at its own size, making parent directories.

    Args:
        fig: a figure, e.g. from flow_figure.
        path: the file to write.

    Returns:
        The pixels written, as to_image gives them: one draw serves the file and
        TensorBoard.
    """
    # Pillow is a dependency of matplotlib. One Agg draw and an RGB encode: savefig lays
    # the figure out in an extra draw and writes RGBA, ~0.1 s slower and ~10% larger.
    import numpy as np
    from PIL import Image

    from gradexp.rundir import write_bytes_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = _render(fig)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="png")
    write_bytes_atomic(path, png.getbuffer())  # a reader never sees half a PNG
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def to_image(fig: Figure) -> np.ndarray:
    """The figure rendered as an RGB image for TensorBoard's add_image(dataformats="CHW").

    Args:
        fig: a figure, e.g. from flow_figure.

    Returns:
        uint8 array of shape (3, H, W), H x W the figure's size in pixels.
    """
    import numpy as np

    return np.ascontiguousarray(_render(fig).transpose(2, 0, 1))
