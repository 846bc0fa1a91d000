"""gradexp.figures: step picking, the gradient-flow figure's panels, data and images."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from gradexp.figures import (
    FIGURE_HEIGHT,
    FIGURE_WIDTH,
    NO_VALUES,
    THEORY_LABEL,
    flow_figure,
    missing_dependency,
    pick_steps,
    save_png,
    to_image,
)
from gradexp.record import StepRecord

needs_matplotlib = pytest.mark.skipif(
    missing_dependency() is not None, reason="matplotlib is not installed"
)


def FlowSnapshot(  # noqa: N802 -- a step record with the figure's three panels
    step: int,
    grad_norm: list,
    signal_bwd: list,
    signal_fwd: list,
    time: dict | None = None,
) -> StepRecord:
    layers = {"grad_norm": grad_norm, "signal_bwd": signal_bwd, "signal_fwd": signal_fwd}
    return StepRecord(step, layers=layers, time=time or {})


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN, INF = math.nan, math.inf


def mlp_profile(depth: int = 20, steps: tuple[int, ...] = (0, 50, 100)):
    """Layer names, snapshots and theory of an MLP whose signal vanishes 1e-4 over depth."""
    layers = [f"{i:02d}_hidden.{i}" for i in range(depth - 1)] + [f"{depth - 1:02d}_head"]
    rel = [1e-4 ** ((depth - 1 - i) / (depth - 1)) for i in range(depth)]
    snaps = [
        FlowSnapshot(
            step=s,
            grad_norm=[3.0 * r * (1 + k) for r in rel],
            signal_bwd=[0.5 * r * (1 + k) for r in rel],
            signal_fwd=[0.6 * 0.97**i for i in range(depth)],
        )
        for k, s in enumerate(steps)
    ]
    theory = {"signal_fwd": [0.62 * 0.97**i for i in range(depth)], "signal_bwd": rel}
    return layers, snaps, theory


def recurrent_snapshot(step: int, names: tuple[str, ...]) -> StepRecord:
    ts = list(range(0, 40, 4)) + [39]
    # Truncated BPTT: the states before t=12 get no gradient and read 0.
    time = {name: (ts, [0.0 if t < 12 else 1e-3 * 1.2**t for t in ts]) for name in names}
    return FlowSnapshot(step, [0.1, 0.5, 1.0], [0.01, 0.1, 1.0], [1.0, 0.5, 2.0], time)


@contextmanager
def strict_warnings() -> Iterator[None]:
    """Numeric (numpy) and matplotlib warnings become errors; deprecations stay warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.simplefilter("error", UserWarning)
        # Last in, first matched: pyparsing's deprecations are UserWarnings too.
        warnings.simplefilter("default", DeprecationWarning)
        yield


def line(ax, label: str):
    (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return found


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_import_does_not_import_matplotlib():
    code = "import sys, gradexp.figures; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 6, 7, 10, 101])
@pytest.mark.parametrize("max_lines", [1, 2, 3, 6])
def test_pick_steps(n: int, max_lines: int):
    steps = [10 * i for i in range(n)]
    picked = pick_steps(list(reversed(steps)) + steps[:2], max_lines)  # any order, dups
    assert picked == sorted(set(picked))
    assert set(picked) <= set(steps)
    assert len(picked) == min(n, max_lines)
    if n:
        assert picked[-1] == steps[-1]
        if max_lines > 1:
            assert picked[0] == steps[0]


def test_pick_steps_spreads_evenly():
    assert pick_steps(list(range(101)), 6) == [0, 20, 40, 60, 80, 100]
    assert pick_steps([0, 2, 4, 5], 6) == [0, 2, 4, 5]
    with pytest.raises(ValueError, match="max_lines"):
        pick_steps([0, 1], 0)


@needs_matplotlib
def test_missing_dependency(monkeypatch: pytest.MonkeyPatch):
    assert missing_dependency() is None
    with monkeypatch.context() as m:
        # Unimportable: None in sys.modules, for the modules already loaded as well.
        for name in ["matplotlib", *(n for n in sys.modules if n.startswith("matplotlib."))]:
            m.setitem(sys.modules, name, None)
        assert missing_dependency() == "figures need matplotlib: pip install 'gradexp[plot]'"
    # Restored for the tests that draw.
    assert missing_dependency() is None
    import matplotlib.figure

    assert matplotlib.figure.Figure is not None


def panels(fig) -> dict:
    """The figure's axes by name (flow_figure labels each), the colour bar left out."""
    return {ax.get_label(): ax for ax in fig.axes if not ax.get_label().startswith("<")}


def legend_texts(fig) -> list[str]:
    (legend,) = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] or [
        fig.legends[0]
    ]
    return [t.get_text() for t in legend.get_texts()]


@needs_matplotlib
def test_flow_figure_png_and_image(tmp_path: Path):
    from PIL import Image  # a dependency of matplotlib

    layers, snaps, theory = mlp_profile(20)
    fig = flow_figure(layers, snaps, theory, title="mlp depth 20")
    assert list(panels(fig)) == ["heatmap", "signal_bwd", "grad_norm", "signal_fwd", "legend"]
    assert [t.get_text() for t in fig.texts] == ["mlp depth 20"]  # the suptitle
    path = tmp_path / "sub" / "flow.png"
    written = save_png(fig, path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) < 300_000
    width, height = fig.canvas.get_width_height()
    # Whole at its actual size in TensorBoard's Images tab on a 1280 px screen.
    assert (width, height) == (FIGURE_WIDTH, FIGURE_HEIGHT) and width <= 870
    with Image.open(path) as im:
        assert im.size == (width, height)
        pixels = np.asarray(im.convert("RGB"))
    image = to_image(fig)
    assert image.dtype == np.uint8
    assert image.shape == (3, height, width)
    assert image.flags.c_contiguous
    # Same picture both ways, and not a blank one.
    assert np.abs(image.transpose(1, 2, 0).astype(int) - pixels).mean() < 1.0
    assert np.array_equal(written, pixels.transpose(2, 0, 1))  # the pixels it encoded
    assert np.unique(image.reshape(3, -1), axis=1).shape[1] > 20


@needs_matplotlib
def test_plotted_data_is_the_input():
    layers, snaps, theory = mlp_profile(6, steps=(0, 10))
    snaps[1].layers["grad_norm"][2] = NAN
    snaps[1].layers["signal_fwd"][0] = 0.0
    fig = flow_figure(layers, snaps, theory)
    ax = panels(fig)
    x = np.arange(len(layers))
    for key in ("grad_norm", "signal_bwd", "signal_fwd"):
        for snap in snaps:
            drawn = line(ax[key], f"step {snap.step}")
            ys = np.asarray(drawn.get_ydata(), dtype=float)
            want = np.asarray(snap.layers[key], dtype=float)
            if key == "signal_bwd":  # relative to the head's, the verdicts' question
                want = want / want[-1]
            keep = want > 0
            np.testing.assert_array_equal(drawn.get_xdata(), x)
            np.testing.assert_allclose(ys[keep], want[keep], rtol=1e-12)
            assert np.isnan(ys[~keep]).all()
    assert np.isnan(line(ax["grad_norm"], "step 10").get_ydata()[2])
    assert ax["grad_norm"].get_yscale() == "log"
    # Theory: both as given (the backward one is relative to the head, as the panel).
    np.testing.assert_allclose(
        line(ax["signal_fwd"], THEORY_LABEL).get_ydata(), theory["signal_fwd"]
    )
    np.testing.assert_allclose(
        line(ax["signal_bwd"], THEORY_LABEL).get_ydata(), theory["signal_bwd"]
    )
    assert legend_texts(fig) == ["step 0", "step 10", THEORY_LABEL]


@needs_matplotlib
def test_heatmap_is_every_logged_step_relative_to_the_head():
    layers, snaps, _ = mlp_profile(5, steps=(0, 10, 20, 30))
    snaps[2].layers["signal_bwd"][1] = 0.0  # no log: a blank cell
    fig = flow_figure(layers, snaps, max_lines=2)
    heat = panels(fig)["heatmap"]
    (mesh,) = heat.collections[:1]
    z = np.ma.masked_invalid(np.asarray(mesh.get_array()).reshape(len(layers), len(snaps)))
    for j, snap in enumerate(snaps):
        bwd = np.asarray(snap.layers["signal_bwd"], dtype=float)
        for i in range(len(layers)):
            if bwd[i] > 0:
                assert z[i, j] == pytest.approx(math.log10(bwd[i] / bwd[-1]))
            else:
                assert np.ma.is_masked(z[i, j])
    # Input at the bottom, every logged step across (not only the profiles' two).
    assert [t.get_text() for t in heat.get_yticklabels()] == layers
    assert heat.get_ylim() == (-0.5, len(layers) - 0.5)
    lo, hi = heat.get_xlim()
    assert lo < 0 and hi > 30
    (bar,) = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert bar.get_ylabel() == "log10(backward signal ÷ head's)"


@needs_matplotlib
def test_threshold_contour_line_and_verdict_marks():
    layers, snaps, _ = mlp_profile(8, steps=(0, 10, 20))  # 1e-4 over depth
    verdict = {
        "kind": "vanishing", "layer": layers[3], "step": 10,
        "evidence": {"until": 20, "threshold": 0.02},
    }  # fmt: skip
    fig = flow_figure(layers, snaps, verdicts=[verdict], thresholds=(0.02, 50.0))
    ax = panels(fig)
    heat, bwd = ax["heatmap"], ax["signal_bwd"]
    # The vanishing contour at log10(0.02), in the verdicts' colour; no exploding one
    # (nothing above 50x on this run).
    contours = [c for c in heat.collections if hasattr(c, "levels")]
    assert [list(c.levels) for c in contours] == [[pytest.approx(math.log10(0.02))]]
    # The threshold as a line on the relative profile.
    assert line(bwd, "threshold 0.02").get_ydata()[0] == 0.02
    assert "threshold 50" not in [ln.get_label() for ln in bwd.get_lines()]
    # The verdict's layer boxed from its step to its last, and named.
    from matplotlib.patches import Rectangle

    boxes = [p for p in heat.patches if isinstance(p, Rectangle)]
    assert boxes and all(b.get_y() == pytest.approx(3 - 0.5) for b in boxes)
    assert boxes[0].get_x() == pytest.approx(5.0) and boxes[0].get_width() == pytest.approx(20.0)
    assert "vanishing" in texts(heat)
    # ... and its layer marked on the profile.
    marks = [ln for ln in bwd.get_lines() if list(ln.get_xdata()) == [3, 3]]
    assert marks and "vanishing" in texts(bwd)


@needs_matplotlib
def test_chosen_steps_and_colors():
    from matplotlib import colormaps

    layers, snaps, _ = mlp_profile(4, steps=tuple(range(0, 100, 10)))
    fig = flow_figure(layers, list(reversed(snaps)), max_lines=4)
    assert legend_texts(fig) == [f"step {s}" for s in pick_steps(range(0, 100, 10), 4)]
    first = line(panels(fig)["grad_norm"], "step 0").get_color()
    assert first == colormaps["viridis"](0.0)
    assert fig.texts == []  # no suptitle


@needs_matplotlib
def test_recurrent_adds_time_panel():
    layers = ["00_embed", "01_lstm.0", "02_head"]
    fig = flow_figure(layers, [recurrent_snapshot(s, ("01_lstm.0",)) for s in (0, 5)])
    time_ax = panels(fig)["time"]
    assert "legend" not in panels(fig)
    assert fig.canvas.get_width_height() == (FIGURE_WIDTH, FIGURE_HEIGHT)
    assert "01_lstm.0" in time_ax.get_title()
    ys = np.asarray(line(time_ax, "step 5").get_ydata(), dtype=float)
    assert np.isnan(ys[:3]).all() and (ys[3:] > 0).all()  # the zeros leave a gap
    assert to_image(fig).shape[0] == 3
    steps = panels(fig)["grad_norm"].get_legend()  # the steps' key, with no free slot
    assert [t.get_text() for t in steps.get_texts()] == ["step 0", "step 5"]

    names = ("01_lstm.0", "02_lstm.1")
    fig = flow_figure(layers, [recurrent_snapshot(0, names)])
    time_ax = panels(fig)["time"]
    styles = {ln.get_linestyle() for ln in time_ax.get_lines()}
    assert len(styles) == 2
    assert time_ax.get_legend() is not None


@needs_matplotlib
def test_unplottable_values_do_not_break_the_figure(tmp_path: Path):
    layers = ["00_a", "01_b", "02_c", "03_head"]
    snaps = [
        FlowSnapshot(0, [NAN, 0.0, INF, None], [0.0] * 4, [1.0, NAN, -INF, 2.0]),
        FlowSnapshot(7, [0.0] * 4, [0.0] * 4, [-1.0, 0.0, 1e-300, 1e300]),
    ]
    theory = {"signal_fwd": [1.0, NAN, 1.0, 1.0], "signal_bwd": [0.1, 0.2, 0.5, 1.0]}
    verdicts = [{"kind": "diverged", "layer": "01_b", "step": 3, "evidence": {}}]
    with strict_warnings():
        fig = flow_figure(layers, snaps, theory, title="broken", verdicts=verdicts)
        save_png(fig, tmp_path / "broken.png")
    ax = panels(fig)
    assert texts(ax["grad_norm"]) == [NO_VALUES]
    assert NO_VALUES in texts(ax["heatmap"])
    assert texts(ax["signal_fwd"]) == []
    assert ax["signal_fwd"].get_yscale() == "log"
    # Relative theory needs no measured head: drawn as given.
    assert THEORY_LABEL in [ln.get_label() for ln in ax["signal_bwd"].get_lines()]


@needs_matplotlib
def test_all_zero_time_panel_and_no_snapshots():
    snap = recurrent_snapshot(0, ("01_rnn",))
    snap.time["01_rnn"] = (snap.time["01_rnn"][0], [0.0] * len(snap.time["01_rnn"][0]))
    with strict_warnings():
        fig = flow_figure(["a", "b", "c"], [snap])
        assert texts(panels(fig)["time"]) == [NO_VALUES]
        fig = flow_figure(["a", "b", "c"], [], {"signal_fwd": [1.0, 1.0, 1.0]})
    ax = panels(fig)
    assert "time" not in ax
    assert texts(ax["grad_norm"]) == [NO_VALUES]
    assert texts(ax["heatmap"]) == [NO_VALUES]
    assert texts(ax["signal_fwd"]) == []


@needs_matplotlib
@pytest.mark.parametrize("depth", [20, 100])
def test_layer_labels_thinned_head_kept(depth: int):
    layers, snaps, _ = mlp_profile(depth, steps=(0,))
    fig = flow_figure(layers, snaps)
    for name, ax in panels(fig).items():
        if name == "legend":
            continue
        ticks = ax.get_yticklabels() if name == "heatmap" else ax.get_xticklabels()
        labels = [t.get_text() for t in ticks]
        assert len(labels) <= 21
        assert labels[0] == layers[0] and labels[-1] == layers[-1]
        if depth <= 20:
            assert labels == layers


@needs_matplotlib
def test_lengths_checked():
    layers, snaps, theory = mlp_profile(5, steps=(0,))
    with pytest.raises(ValueError, match="values for 4 layers"):
        flow_figure(layers[:-1], snaps)
    with pytest.raises(ValueError, match="theory"):
        flow_figure(layers, snaps, {"signal_fwd": [1.0]})
    with pytest.raises(ValueError, match="layer"):
        flow_figure([], [])


@needs_matplotlib
def test_to_image_of_a_figure_without_agg_canvas():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1), dpi=50)
    fig.add_subplot().plot([1, 2])
    image = to_image(fig)
    assert image.shape == (3, 50, 100) and image.dtype == np.uint8
