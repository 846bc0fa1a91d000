"""saturation: Glorot & Bengio 2010, Figures 2 and 3 (sections 3.1 and 3.2).

Read from the event files: each hidden layer's ``act_mean/<layer>``, ``act_std/<layer>``
and ``sat_frac/<layer>`` at every logged step (taken over the step's training batch:
every unit of the layer and every example of the batch). A value "at the end" is the mean
of the last END_LOGS logged values (one batch of 10 is a noisy sample).

The claim holds when, on every seed:

1. sigmoid, standard init: the top hidden layer's mean activation falls below TOP_SAT
   (from 0.5 at init) within the first EARLY steps;
2. ... and is still below it at the end of the run (it "lasts very long");
3. ... while the layers below end at or above LOWER_MIN, their means decreasing from the
   layer under the top down to the first;
4. tanh, standard init: the top hidden layer does not collapse: its activation std at the
   end is at least TANH_STD (the sigmoid's falls below 0.01);
5. tanh, standard init: saturation starts in layer 1 and moves up: layer 1's onset step
   (the first logged step whose trailing ONSET_LOGS-mean of sat_frac reaches SAT_ONSET)
   comes before every other layer's, and the top layer's after every other (a layer that
   never reaches it counts as last). The layers between are not ordered among themselves:
   measured, layers 2 and 3 start within 20 steps of each other, in either order.

The normalized (Xavier) init is reported beside the standard one, not judged: the paper
runs it with tanh and softsign only (its Table 1 has no "Sigmoid N").
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from claims import common
from claims.common import (
    Result,
    by_keys,
    judge,
    markdown_table,
    metric,
    pyplot,
    save,
    scalars,
    spread,
)
from gradexp.report import RunRow

PRESET = "saturation"
PAPER = (
    'Glorot & Bengio 2010, "Understanding the difficulty of training deep feedforward '
    'neural networks", Figures 2 and 3'
)
CLAIM = (
    "With the standard init U(-1/sqrt(n), 1/sqrt(n)), a deep sigmoid net's top hidden layer "
    "is driven to 0 (saturated) early in training and stays there for long while the layers "
    "below sit above 0.5; tanh, symmetric around 0, does not saturate its top layer, but "
    "saturates from the first layer upward."
)
SHORT = [
    "trainer.steps=30",
    "trainer.log_every=5",
    "trainer.eval_every=10",
    "data.n_train=256",
    "data.n_test=64",
]

STANDARD, NORMALIZED = "default", "xavier_uniform"
TOP_SAT = 0.1  # top hidden layer's mean sigmoid output below this: saturated at 0
EARLY = 500  # ... within this many steps
LOWER_MIN = 0.49  # the layers below end at or above this (the paper: above 0.5)
TANH_STD = 0.1  # tanh's top layer keeps at least this activation std
SAT_ONSET = 0.005  # share of a layer's tanh outputs in the flat tails (|a| > 0.975)
ONSET_LOGS = 5  # trailing logged values averaged for the onset
END_LOGS = 10  # logged values averaged for "at the end"


def _layer_tags(run: RunRow, quantity: str) -> list[str]:
    """The run's per-layer tags of ``quantity`` (act_mean/00_hidden.0, ...), first layer
    first."""
    tags: set[str] = set()
    for events in sorted(run.path.glob("events.out.tfevents.*")):
        tags.update(
            t for t in common._events(events).Tags()["scalars"] if t.startswith(quantity + "/")
        )
    return sorted(tags)


def layer_series(run: RunRow, quantity: str) -> list[list[tuple[int, float]]]:
    """Per hidden layer (first first), the finite (step, value) points of ``quantity``."""
    return [scalars(run, tag, finite=True) for tag in _layer_tags(run, quantity)]


def _end(points: list[tuple[int, float]]) -> float | None:
    tail = [v for _, v in points[-END_LOGS:]]
    return statistics.fmean(tail) if tail else None


def _steps(run: RunRow) -> int:
    return int((run.summary or {}).get("steps") or 0)


def saturation_step(run: RunRow) -> int | None:
    """The first logged step at which the top hidden layer's mean activation is below
    TOP_SAT; None if it never is."""
    layers = layer_series(run, "act_mean")
    if not layers:
        return None
    return common.first_step(layers[-1], lambda v: v < TOP_SAT)


def end_means(run: RunRow) -> list[float | None]:
    """Each hidden layer's mean activation at the end (first layer first)."""
    return [_end(points) for points in layer_series(run, "act_mean")]


def top_std_end(run: RunRow) -> float | None:
    layers = layer_series(run, "act_std")
    return _end(layers[-1]) if layers else None


def onset_steps(run: RunRow) -> list[int | None]:
    """Per hidden layer, the first logged step whose trailing ONSET_LOGS-mean of sat_frac
    reaches SAT_ONSET; None if none does."""
    out: list[int | None] = []
    for points in layer_series(run, "sat_frac"):
        step = None
        for k in range(len(points)):
            window = [v for _, v in points[max(0, k - ONSET_LOGS + 1) : k + 1]]
            if statistics.fmean(window) >= SAT_ONSET:
                step = points[k][0]
                break
        out.append(step)
    return out


# --- the parts of the claim, per run -------------------------------------------------
def saturates_early(run: RunRow) -> bool:
    step = saturation_step(run)
    return step is not None and step <= EARLY


def stays_saturated(run: RunRow) -> bool:
    means = end_means(run)
    return bool(means) and means[-1] is not None and means[-1] < TOP_SAT


def lower_layers_above_half(run: RunRow) -> bool:
    means = end_means(run)[:-1]
    if not means or any(m is None for m in means):
        return False
    values = [float(m) for m in means if m is not None]
    ordered = all(a < b for a, b in zip(values, values[1:]))
    return ordered and min(values) >= LOWER_MIN


def tanh_top_alive(run: RunRow) -> bool:
    std = top_std_end(run)
    return std is not None and std >= TANH_STD


def saturates_bottom_up(run: RunRow) -> bool:
    onsets = onset_steps(run)
    if len(onsets) < 2 or onsets[0] is None:
        return False
    keys = [math.inf if s is None else s for s in onsets]
    first, middle, top = keys[0], keys[1:-1], keys[-1]
    return all(first < k for k in [*middle, top]) and all(k <= top for k in middle)


# --- the page ---------------------------------------------------------------------------
def _count(runs: list[RunRow], test) -> str:
    return f"{sum(bool(test(r)) for r in runs)}/{len(runs)}"


def _arm_label(activation: str, init: str) -> str:
    name = {STANDARD: "standard U(±1/√n)", NORMALIZED: "normalized (Xavier)"}.get(init, init)
    return f"{activation}, {name}"


def _figure_means(arms: dict[tuple[str, str], list[RunRow]], out: Path) -> Path | None:
    """Their Figure 2: each hidden layer's mean activation against the step (the seeds'
    median, bars: the median std), one panel per arm, each seed a thin line."""
    plt = pyplot()
    if plt is None:
        return None
    keys = list(arms)
    if not keys:
        return None
    cols = 2
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        runs = arms[key]
        per_run = [(layer_series(r, "act_mean"), layer_series(r, "act_std")) for r in runs]
        n_layers = max((len(m) for m, _ in per_run), default=0)
        colors = plt.get_cmap("viridis")([i / max(n_layers - 1, 1) for i in range(n_layers)])
        for layer in range(n_layers):
            color = colors[layer]
            by_step: dict[int, list[float]] = {}
            std_by_step: dict[int, list[float]] = {}
            for means, stds in per_run:
                if layer >= len(means) or not means[layer]:
                    continue
                ax.plot(*zip(*means[layer]), color=color, lw=0.6, alpha=0.35)
                for s, v in means[layer]:
                    by_step.setdefault(s, []).append(v)
                for s, v in stds[layer] if layer < len(stds) else []:
                    std_by_step.setdefault(s, []).append(v)
            steps = sorted(by_step)
            if not steps:
                continue
            med = [statistics.median(by_step[s]) for s in steps]
            ax.plot(steps, med, color=color, lw=1.8, label=f"layer {layer + 1}")
            every = max(1, len(steps) // 12)
            bar_steps = [s for s in steps[::every] if s in std_by_step]
            shift = (layer - (n_layers - 1) / 2) * 0.006 * (steps[-1] - steps[0])
            ax.errorbar(
                [s + shift for s in bar_steps],
                [statistics.median(by_step[s]) for s in bar_steps],
                yerr=[statistics.median(std_by_step[s]) for s in bar_steps],
                fmt="none",
                ecolor=color,
                elinewidth=1,
                capsize=2,
            )
        activation = key[0]
        ax.set_ylim(*((-1.05, 1.05) if activation == "tanh" else (-0.02, 1.02)))
        if activation != "tanh":
            ax.axhline(TOP_SAT, color="k", ls=":", lw=0.8)
        ax.axvline(EARLY, color="gray", ls="--", lw=0.6)
        ax.set_title(f"{_arm_label(*key)} ({len(runs)} seeds)", fontsize=10)
        ax.set_xlabel("training step (minibatch of 10)")
        ax.set_ylabel("activation: mean, bars ±std")
        ax.legend(fontsize=7, loc="center right")
    fig.suptitle(
        "Mean (lines) and std (bars) of each hidden layer's activation: seed median bold, "
        "each seed thin; dotted: the top-layer bar, dashed: the early window",
        fontsize=9,
    )
    return save(fig, out, "saturation_activations.png")


def _figure_tanh(arms: dict[tuple[str, str], list[RunRow]], out: Path) -> Path | None:
    """Their Figure 3 (top) and Figure 10, as saturated shares: each tanh layer's share of
    outputs in the flat tails against the step, one panel per init, one line per seed."""
    keys = [k for k in arms if k[0] == "tanh"]
    if not keys:
        return None
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        n_layers = 0
        for i, run in enumerate(arms[key]):
            layers = layer_series(run, "sat_frac")
            n_layers = max(n_layers, len(layers))
            colors = plt.get_cmap("viridis")(
                [j / max(len(layers) - 1, 1) for j in range(len(layers))]
            )
            for layer, points in enumerate(layers):
                if points:
                    ax.plot(
                        *zip(*points),
                        color=colors[layer],
                        lw=1,
                        alpha=0.75,
                        label=f"layer {layer + 1}" if i == 0 else None,
                    )
        ax.axhline(SAT_ONSET, color="k", ls=":", lw=0.8, label=f"onset bar {SAT_ONSET}")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(0, 1)
        ax.set_title(f"{_arm_label(*key)}: saturated share (|a| > 0.975)", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("sat_frac (one line per seed)")
        ax.legend(fontsize=7)
    return save(fig, out, "saturation_tanh.png")


def _arms(runs: list[RunRow]) -> dict[tuple[str, str], list[RunRow]]:
    """The runs by (activation, init): sigmoid before tanh, the standard init first."""
    return by_keys(runs, ("activation", "init"), order=["sigmoid", "tanh", STANDARD, NORMALIZED])


def _per_layer(values: list[list[float | None]], missing: str = "-") -> list[str]:
    """One spread per layer from each run's per-layer values."""
    n = max((len(v) for v in values), default=0)
    return [
        spread([v[i] if i < len(v) else None for v in values], missing=missing) for i in range(n)
    ]


def _tables(arms: dict[tuple[str, str], list[RunRow]]) -> str:
    n = max((len(end_means(r)) for arm in arms.values() for r in arm), default=4) or 4
    layer_names = [f"layer {i + 1}" + (" (top)" if i == n - 1 else "") for i in range(n)]
    rows = []
    for (activation, init), arm in arms.items():
        means = _per_layer([end_means(r) for r in arm])
        means += ["-"] * (n - len(means))
        sat = [saturation_step(r) for r in arm]
        rows.append(
            [
                activation,
                init,
                str(len(arm)),
                spread([None if s is None else float(s) for s in sat], missing="never")
                if activation == "sigmoid"
                else "-",
                *means,
                spread([top_std_end(r) for r in arm]),
                spread([metric(r, "acc/test") for r in arm]),
            ]
        )
    figure2 = markdown_table(
        [
            "activation",
            "init",
            "seeds",
            f"first step the top layer's mean < {TOP_SAT}",
            *(f"mean at the end, {name}" for name in layer_names),
            "top layer's std at the end",
            "acc/test",
        ],
        rows,
    )
    rows = []
    for (activation, init), arm in arms.items():
        if activation != "tanh":
            continue
        onsets = _per_layer(
            [[None if x is None else float(x) for x in onset_steps(r)] for r in arm],
            missing="never",
        )
        onsets += ["-"] * (n - len(onsets))
        ends = [[_end(p) for p in layer_series(r, "sat_frac")] for r in arm]
        first_end = spread([e[0] if e else None for e in ends])
        top_end = spread([e[-1] if e else None for e in ends])
        rows.append([activation, init, str(len(arm)), *onsets, first_end, top_end])
    if not rows:
        return figure2
    figure3 = markdown_table(
        [
            "activation",
            "init",
            "seeds",
            *(f"saturation onset, {name}" for name in layer_names),
            "sat_frac at the end, layer 1",
            "sat_frac at the end, top layer",
        ],
        rows,
    )
    return (
        f"Their Figure 2 (each hidden layer's mean activation at the end: the mean of the last "
        f"{END_LOGS} logged values):\n\n{figure2}\n\nTheir Figure 3 (tanh: the first logged step "
        f"whose {ONSET_LOGS}-log trailing mean of sat_frac, the share of outputs with |a| > "
        f"0.975, reaches {SAT_ONSET}):\n\n{figure3}"
    )


def _end_top(run: RunRow) -> float | None:
    means = end_means(run)
    return means[-1] if means else None


def evaluate(runs: list[RunRow], out: Path) -> Result:
    arms = _arms(runs)
    table = _tables(arms)

    sig = arms.get(("sigmoid", STANDARD), [])
    tanh = arms.get(("tanh", STANDARD), [])
    checks = [
        (f"sigmoid's top layer below {TOP_SAT} within {EARLY} steps", sig, saturates_early),
        ("... and still there at the end", sig, stays_saturated),
        (
            f"the layers below end at or above {LOWER_MIN}, decreasing towards the input",
            sig,
            lower_layers_above_half,
        ),
        (f"tanh's top layer keeps std >= {TANH_STD}", tanh, tanh_top_alive),
        ("tanh saturates layer 1 first and the top layer last", tanh, saturates_bottom_up),
    ]
    parts = [bool(arm) and all(test(r) for r in arm) for _, arm, test in checks]
    counts = [f"{name}: {_count(arm, test)}" for name, arm, test in checks]
    verdict = judge(parts)

    budget = max((_steps(r) for r in runs), default=0)
    first = [saturation_step(r) for r in sig]
    notes = [
        f"Standard init, {budget} steps: the sigmoid's top hidden layer falls below {TOP_SAT} "
        f"by step {spread([None if s is None else float(s) for s in first], missing='never')} "
        f"and ends at {spread([_end_top(r) for r in sig])} (std "
        f"{spread([top_std_end(r) for r in sig])}); the tanh top layer's std ends at "
        f"{spread([top_std_end(r) for r in tanh])}"
    ]
    sig_n = arms.get(("sigmoid", NORMALIZED), [])
    if sig_n:
        notes.append(
            "with Xavier's init (not judged) the sigmoid's top layer is below "
            f"{TOP_SAT} within {EARLY} steps on {_count(sig_n, saturates_early)} seeds and "
            f"ends at {spread([_end_top(r) for r in sig_n])}"
        )
    tanh_n = arms.get(("tanh", NORMALIZED), [])
    if tanh and tanh_n:

        def first_sat(arm: list[RunRow]) -> str:
            return spread([_end(p[0]) if (p := layer_series(r, "sat_frac")) else None for r in arm])

        def acc(arm: list[RunRow]) -> str:
            return spread([metric(r, "acc/test") for r in arm])

        notes.append(
            f"tanh's layer 1 ends with sat_frac {first_sat(tanh)} from the standard init and "
            f"{first_sat(tanh_n)} from Xavier's (not judged), acc/test {acc(tanh)} and "
            f"{acc(tanh_n)}"
        )
    result = "; ".join(notes) + "."
    held = [c for c, ok in zip(counts, parts) if ok]
    failed = [c for c, ok in zip(counts, parts) if not ok]
    why = (
        "Each part must hold on every seed (seeds that held it / all). "
        f"Held: {'; '.join(held) or 'none'}. Did not hold: {'; '.join(failed) or 'none'}. "
        "Their desaturation of the top layer (around epoch 100 of online training) lies far "
        f"beyond {budget} steps and is not judged."
    )
    figures = [p for p in (_figure_means(arms, out), _figure_tanh(arms, out)) if p is not None]
    return Result(verdict=verdict, result=result, why=why, table=table, figures=figures)
