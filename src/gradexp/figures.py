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
# The figure's size in px at DPI: TensorBoard's Images tab shows up to ~870 px of an
# image at its actual size on a 1280 px wide screen (and ~990 px on a 1400 px one).
FIGURE_WIDTH, FIGURE_HEIGHT, DPI = 860, 1000, 100
# The heatmap's colours (readable in print and for colour-blind readers, as the gradexp
# tab's) and the verdict thresholds' (the tab's too).
HEATMAP_CMAP = "cividis"
VANISHING_COLOR, EXPLODING_COLOR = "#d81b60", "black"
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


def _layer_ticks(ax: Axes, layers: Sequence[str], axis: str = "x") -> None:
    """Layer names as the ticks of ``axis`` (thinned to MAX_TICK_LABELS, the head kept)."""
    n = len(layers)
    stride = math.ceil(n / MAX_TICK_LABELS)
    ticks = list(range(0, n, stride))
    if ticks[-1] != n - 1:
        # Always label the head; drop the regular tick just before it if the two would touch.
        if n - 1 - ticks[-1] < stride / 2:
            ticks.pop()
        ticks.append(n - 1)
    labels = [layers[i] for i in ticks]
    if axis == "y":
        ax.set_yticks(ticks, labels, fontsize=7)
        ax.set_ylabel("layer (input at the bottom)", fontsize=9)
        return
    ax.set_xticks(ticks, labels, rotation=60, ha="right", fontsize=7)
    ax.tick_params(axis="x", pad=1)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel("layer (input → output)")


def _theory_line(ax: Axes, values: Sequence[float | None]) -> None:
    ys = _positive(values)
    ax.plot(range(len(ys)), ys, "k--", lw=1.2, label=THEORY_LABEL, zorder=3)


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


def _edges(centers: Sequence[float]) -> list[float]:
    """Cell edges around sorted ``centers``: halfway between neighbours, the outer ones a
    half gap out (a half unit for a single center)."""
    if len(centers) == 1:
        return [centers[0] - 0.5, centers[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(centers, centers[1:])]
    return [2 * centers[0] - mids[0], *mids, 2 * centers[-1] - mids[-1]]


def relative_to_head(values: Sequence[float | None]) -> list[float]:
    """Each layer's value over the head's (the last layer's); NaN where either is not a
    positive finite number (no head: all NaN)."""
    ys = _positive(values)
    head = ys[-1] if ys else math.nan
    return [y / head if not math.isnan(head) else math.nan for y in ys]


def _heatmap_panel(
    ax: Axes,
    fig: Figure,
    layers: Sequence[str],
    records: list[StepRecord],
    verdicts: Sequence[dict],
    thresholds: tuple[float, float],
) -> None:
    """log10 of the backward signal over the head's, layer (input at the bottom) x every
    logged step; the verdict thresholds as contours, each verdict's layer and steps boxed."""
    import numpy as np

    steps = [r.step for r in records]
    ratios = np.array([relative_to_head(r.layer("signal_bwd", len(layers))) for r in records]).T
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.ma.masked_invalid(np.log10(ratios))
    x, y = _edges(steps), _edges(range(len(layers)))
    if z.count():
        lo, hi = float(z.min()), float(z.max())
        lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
        mesh = ax.pcolormesh(x, y, z, cmap=HEATMAP_CMAP, vmin=lo, vmax=hi, shading="flat")
        bar = fig.colorbar(mesh, ax=ax, pad=0.01, fraction=0.04)
        bar.set_label("log10(backward signal ÷ head's)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        levels = [
            (math.log10(t), color)
            for t, color in zip(thresholds, (VANISHING_COLOR, EXPLODING_COLOR))
            if lo < math.log10(t) < hi
        ]
        if levels and min(z.shape) > 1:
            for level, color in levels:
                ax.contour(
                    steps, range(len(layers)), z, levels=[level], colors=[color],
                    linewidths=1.6, linestyles="solid",
                )  # fmt: skip
    else:
        ax.text(0.5, 0.5, NO_VALUES, transform=ax.transAxes, ha="center", va="center")
    from matplotlib.patches import Rectangle

    def nearest(step: int) -> int:  # the column of the logged step nearest ``step``
        return min(range(len(steps)), key=lambda j: abs(steps[j] - step))

    marked = [v for v in verdicts if v.get("layer") in layers and v.get("step") is not None]
    for v in marked:
        row = layers.index(v["layer"])
        until = (v.get("evidence") or {}).get("until", v["step"])
        left, right = x[nearest(v["step"])], x[1 + nearest(until)]
        for color, width, style in (("white", 3.0, "-"), ("black", 1.2, "--")):
            box = Rectangle((left, row - 0.5), right - left, 1.0, fill=False, ec=color, lw=width)
            box.set_linestyle(style)
            ax.add_patch(box)
        # Verdicts on one layer: their names one under another, at their boxes' left ends.
        same = [w for w in marked if w["layer"] == v["layer"]]
        shift = 5.5 * (len(same) - 1) - 11 * same.index(v)
        ax.annotate(
            v["kind"], (left, row), xytext=(4, shift), textcoords="offset points", ha="left",
            va="center", fontsize=8, fontweight="bold", color="black",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
        )  # fmt: skip
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(-0.5, len(layers) - 0.5)
    _layer_ticks(ax, layers, axis="y")
    ax.set_xlabel("training step")
    contours = f"contours at {thresholds[0]:g} (magenta) and {thresholds[1]:g} (black)"
    ax.set_title(f"backward signal ÷ head's, every logged step; {contours}", fontsize=10)


def flow_figure(
    layers: list[str],
    snapshots: list[StepRecord],
    theory: dict | None = None,
    title: str = "",
    max_lines: int = 6,
    verdicts: Sequence[dict] = (),
    thresholds: tuple[float, float] = (0.01, 100.0),
) -> Figure:
    """The gradient-flow figure of a run: where the gradient starves, and from when.

    On top, a heatmap of every logged step: log10 of each layer's backward signal over
    the head's (layer up, input at the bottom; training step across), with the verdict
    thresholds as contours and each verdict's layer and step span boxed. Below, the
    per-layer profiles at up to ``max_lines`` steps (viridis, first to last; x = layer
    in depth order, log y): the backward signal over the head's (with the vanishing
    threshold's line and each verdict's layer marked), the parameter-gradient norm and
    the forward signal; and ||dL/dh_t|| against time step t when any shown snapshot has
    recurrent ``time`` entries (one line style per recurrent layer). Values a log axis
    cannot show (None, NaN, inf, <= 0) leave gaps; a panel with none says so.

    The figure is FIGURE_WIDTH px wide: TensorBoard's Images tab shows it whole at its
    actual size on a 1280 px screen. Each axes is named by ``get_label()``: "heatmap",
    "signal_bwd", "grad_norm", "signal_fwd", "time" (recurrent runs only).

    Args:
        layers: the layer names, input to output.
        snapshots: the logged steps' statistics, in any order; of two with the same
            step, the later counts.
        theory: optional mean-field predictions at initialization: "signal_fwd",
            absolute per layer, drawn on the forward panel; "signal_bwd", relative to
            the head (last entry 1), drawn on the backward panel. Other keys are ignored.
        title: the figure's title; none when empty.
        max_lines: how many training steps the profiles draw at most (see pick_steps).
        verdicts: the run's verdicts (``{"kind", "layer", "step", "evidence"}``): those
            naming a layer are marked.
        thresholds: the vanishing and exploding ratios to the head's backward signal.

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
    records = [by_step[s] for s in sorted(by_step)]
    chosen = pick_steps(list(by_step), max_lines)
    shown = [by_step[s] for s in chosen]
    span = (chosen[-1] - chosen[0]) if chosen else 0
    cmap = colormaps["viridis"]
    colors = {s: cmap(CMAP_TOP * (s - chosen[0]) / span if span else 0.0) for s in chosen}
    with_time = any(snap.time for snap in shown)

    fig = Figure(figsize=(FIGURE_WIDTH / DPI, FIGURE_HEIGHT / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, 2, height_ratios=(1.15, 1, 1))
    heat_ax = fig.add_subplot(grid[0, :], label="heatmap")
    bwd_ax = fig.add_subplot(grid[1, 0], label="signal_bwd")
    grad_ax = fig.add_subplot(grid[1, 1], label="grad_norm")
    fwd_ax = fig.add_subplot(grid[2, 0], label="signal_fwd")
    last = fig.add_subplot(grid[2, 1], label="time" if with_time else "legend")
    vanishing, exploding = thresholds
    if records:
        _heatmap_panel(heat_ax, fig, layers, records, verdicts, thresholds)
    else:
        heat_ax.set_axis_off()
        heat_ax.text(0.5, 0.5, NO_VALUES, transform=heat_ax.transAxes, ha="center", va="center")

    x = range(len(layers))
    profiles = (
        (bwd_ax, "signal_bwd", "backward signal ÷ head's", "RMS(∂ℓ/∂h) ÷ head's", relative_to_head),
        (grad_ax, "grad_norm", PANELS[0][1], PANELS[0][2], _positive),
        (fwd_ax, "signal_fwd", PANELS[2][1], PANELS[2][2], _positive),
    )
    for ax, key, panel_title, ylabel, transform in profiles:
        for snap in shown:
            ax.plot(
                x,
                transform(snap.layer(key, len(layers))),
                color=colors[snap.step],
                lw=1.5,
                marker=_marker(len(layers)),
                ms=2.5,
                label=f"step {snap.step}",
            )
        ax.set_title(panel_title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        _layer_ticks(ax, layers)
    if "signal_fwd" in theory:
        _theory_line(fwd_ax, theory["signal_fwd"])
    if "signal_bwd" in theory:
        _theory_line(bwd_ax, theory["signal_bwd"])
    for ax, _, _, _, _ in profiles:
        finish_log_axes([ax])
        ax.grid(True, which="major", alpha=0.3)
    low, high = bwd_ax.get_ylim() if bwd_ax.get_yscale() == "log" else (math.inf, -math.inf)
    for ratio, color in ((vanishing, VANISHING_COLOR), (exploding, EXPLODING_COLOR)):
        if low < ratio < high:
            bwd_ax.axhline(ratio, color=color, lw=1.2, ls=":", label=f"threshold {ratio:g}")
    marked = dict.fromkeys(v["layer"] for v in verdicts if v.get("layer") in layers)
    for name in marked:
        i = layers.index(name)
        kinds = ", ".join(dict.fromkeys(v["kind"] for v in verdicts if v.get("layer") == name))
        bwd_ax.axvline(i, color="0.25", lw=1.0, ls="--")
        bwd_ax.annotate(
            kinds, (i, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
            textcoords="offset points", va="top", fontsize=8, fontweight="bold",
        )  # fmt: skip

    # One legend for the profiles: the steps' colors, then the theory line.
    handles = {}
    for ax, _, _, _, _ in profiles:
        for line in ax.get_lines():
            if line.get_label().startswith(("step ", THEORY_LABEL)):
                handles.setdefault(line.get_label(), line)
    if with_time:
        _time_panel(last, shown, colors)
        last.grid(True, which="major", alpha=0.3)
        if handles:
            grad_ax.legend(handles=list(handles.values()), fontsize=7, loc="best")
    else:
        last.set_axis_off()
        if handles:
            last.legend(
                handles=list(handles.values()), loc="center", fontsize=9, title="profiles at"
            )
    if title:
        fig.suptitle(title, fontsize=11)
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
