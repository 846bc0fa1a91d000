"""hessian_free: Hessian-free optimization trains what SGD leaves stuck (Martens 2010),
and with structural damping the recurrent nets of the pathological long-range problems
(Martens & Sutskever 2011).

Judged per seed on the preset's five arms:

- (a) the default deep sigmoid MLP. SGD is **stuck** when its test loss at the time the
  HF run ended (equal wall-clock) is at least STUCK times the input-blind baseline's;
  HF **trains** it when its final test loss is at most TRAINS times the baseline's;
- (b) the tanh RNN on the adding problem at T=100. A run **solves** it when its test MSE
  is at most SOLVED (the baseline, predicting the mean, is 1/6). HF with structural
  damping must solve it, and SGD with clipping must not at equal wall-clock time;
- structural damping must help: HF with it ends below HF without it, by HELPS or more.

The claim holds when each part holds on most seeds.
"""

from __future__ import annotations

from pathlib import Path

from claims.common import (
    Result,
    fmt,
    group,
    judge,
    markdown_table,
    metric,
    pyplot,
    save,
    scalars,
    spread,
    timed,
)
from gradexp.report import RunRow

PRESET = "hessian_free"
PAPER = (
    "Martens 2010, Deep learning via Hessian-free optimization (ICML), the deep "
    "auto-encoder experiments; Martens & Sutskever 2011, Learning recurrent neural "
    "networks with Hessian-free optimization (ICML), the pathological long-term problems"
)
CLAIM = (
    "Hessian-free optimization trains deep nets that gradient descent leaves stuck, from "
    "the same initialization, and with structural damping it trains a plain tanh RNN on a "
    "pathological long-range problem that SGD does not solve."
)
SHORT = ["trainer.steps=3", "trainer.log_every=1", "trainer.eval_every=2",
         "data.n_train=256", "data.n_test=64"]  # fmt: skip

STUCK = 0.9  # SGD stuck: test loss at equal wall-clock >= STUCK x baseline
TRAINS = 0.8  # HF trains the MLP: final test loss <= TRAINS x baseline
SOLVED = 0.01  # the adding problem solved: test MSE <= SOLVED (baseline 1/6)
HELPS = 10.0  # structural damping helps: the test MSE without it / with it >= HELPS
MLP_SGD, MLP_HF = "sigmoid_mlp_sgd", "sigmoid_mlp_hf"
RNN_SGD, RNN_HF, RNN_SD = "tanh_rnn_sgd_clip", "tanh_rnn_hf", "tanh_rnn_hf_sd"
ORDER = [MLP_SGD, MLP_HF, RNN_SGD, RNN_HF, RNN_SD]
LABELS = {
    MLP_SGD: "sigmoid MLP, SGD",
    MLP_HF: "sigmoid MLP, HF",
    RNN_SGD: "tanh RNN, SGD + clipping",
    RNN_HF: "tanh RNN, HF",
    RNN_SD: "tanh RNN, HF + structural damping",
}
COLORS = {MLP_SGD: "tab:gray", MLP_HF: "tab:blue", RNN_SGD: "tab:gray", RNN_HF: "tab:orange",
          RNN_SD: "tab:blue"}  # fmt: skip


def seed_of(run: RunRow) -> str:
    return str(run.overrides.get("seed", "0"))


def elapsed(run: RunRow) -> float | None:
    """Seconds from the run's step-0 log to its last test evaluation."""
    points = timed(run, "loss/test")
    return points[-1][1] if points else None


def at_time(run: RunRow, seconds: float | None) -> tuple[int, float, float] | None:
    """The run's first test evaluation at or after ``seconds`` (the last one if it ended
    sooner): (step, seconds, test loss). At or after: SGD gets at least the time HF took."""
    points = timed(run, "loss/test")
    if not points or seconds is None:
        return None
    return next((p for p in points if p[1] >= seconds), points[-1])


def at_step(run: RunRow, step: int) -> tuple[int, float] | None:
    """The run's training loss at its first log step at or after ``step`` (the last one
    if it ended sooner): (step, loss)."""
    points = scalars(run, "loss/train")
    return next(((s, v) for s, v in points if s >= step), points[-1]) if points else None


def baseline(run: RunRow) -> float | None:
    return metric(run, "loss/baseline")


def paired(arms: dict[str, list[RunRow]], a: str, b: str) -> list[tuple[RunRow, RunRow]]:
    """The runs of arms ``a`` and ``b`` with the same seed."""
    other = {seed_of(r): r for r in arms.get(b, [])}
    return [(r, other[seed_of(r)]) for r in arms.get(a, []) if seed_of(r) in other]


def per_step(runs: list[RunRow], steps: int) -> str:
    """The training loss once ``steps`` steps are done (the HF arm's length), at each run's
    first log step from there: "value (at step s)"."""
    points = [at_step(r, steps - 1) for r in runs]
    values = spread([p[1] if p else None for p in points])
    at = sorted({p[0] for p in points if p})
    return f"{values} (step {', '.join(map(str, at))})" if at else values


def _most(flags: list[bool]) -> bool:
    return bool(flags) and sum(flags) > len(flags) / 2


def hf_stat(run: RunRow, key: str, sub: str | None = None) -> float | None:
    hf = (run.summary or {}).get("hessian_free") or {}
    value = hf.get(key)
    if sub is not None:
        value = (value or {}).get(sub)
    return None if value is None else float(value)


def layer_values(run: RunRow, quantity: str, when: str) -> list[float] | None:
    layers = (run.summary or {}).get("layers") or []
    values = [((layer.get(quantity) or {}).get(when)) for layer in layers]
    return None if not values or any(v is None for v in values) else values


def _curves(arms: dict[str, list[RunRow]], out: Path) -> Path | None:
    """Test loss against steps and against seconds, the MLP and the RNN side by side."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.2))
    drawn = False
    for row, names in enumerate([(MLP_SGD, MLP_HF), (RNN_SGD, RNN_HF, RNN_SD)]):
        ax_step, ax_time = axes[row]
        for arm in names:
            for i, run in enumerate(arms.get(arm, [])):
                points = timed(run, "loss/test")
                if not points:
                    continue
                drawn = True
                label = LABELS[arm] if i == 0 else None
                steps, secs, values = zip(*points)
                ax_step.plot(steps, values, "o-", ms=2.5, lw=1, color=COLORS[arm], label=label)
                ax_time.plot(secs, values, "o-", ms=2.5, lw=1, color=COLORS[arm], label=label)
        base = next((baseline(r) for a in names for r in arms.get(a, [])), None)
        for ax in (ax_step, ax_time):
            ax.set_yscale("log")
            ax.set_ylabel("test loss" if row == 0 else "test MSE")
            if base is not None:
                ax.axhline(base, color="k", ls=":", lw=1, label="input-blind baseline")
            if row == 1:
                ax.axhline(SOLVED, color="tab:green", ls="--", lw=1, label=f"solved ({SOLVED})")
        ax_step.set_xscale("symlog", linthresh=10)
        ax_step.set_xlim(left=0)
        ax_time.set_xlim(left=0)
        ax_step.set_xlabel("step (log scale past 10)")
        ax_time.set_xlabel("wall-clock seconds since step 0")
        title = "default sigmoid MLP" if row == 0 else "tanh RNN, adding problem, T=100"
        ax_step.set_title(f"{title}: per step", fontsize=10)
        ax_time.set_title(f"{title}: per second", fontsize=10)
        ax_time.legend(fontsize=7, loc="lower left")
    if not drawn:
        plt.close(fig)
        return None
    return save(fig, out, "hessian_free_curves.png")


def _layers(arms: dict[str, list[RunRow]], out: Path) -> Path | None:
    """The MLP's per-layer gradient norm and update size, SGD against HF, at the first
    and the last log step (seed 0's runs, or the first seed both arms have)."""
    plt = pyplot()
    pairs = paired(arms, MLP_SGD, MLP_HF)
    if plt is None or not pairs:
        return None
    sgd, hf = pairs[0]
    fig, (ax_grad, ax_upd) = plt.subplots(1, 2, figsize=(11, 3.8))
    drawn = False
    start = layer_values(sgd, "grad_norm", "first")  # step 0: the same init and batch
    if start is not None:
        drawn = True
        ax_grad.plot(range(len(start)), start, "--", marker="o", ms=3, lw=1.2, color="k",
                     label="step 0 (the same for both)")  # fmt: skip
    for run, arm in ((sgd, MLP_SGD), (hf, MLP_HF)):
        values = layer_values(run, "grad_norm", "last")
        if values is not None:
            drawn = True
            ax_grad.plot(range(len(values)), values, "-", marker="o", ms=3, lw=1.2,
                         color=COLORS[arm], label=f"{LABELS[arm]}, last log step")  # fmt: skip
        for when, style, name in (("first", "--", "step 0"), ("last", "-", "last log step")):
            values = layer_values(run, "update_ratio", when)
            if values is not None:
                drawn = True
                ax_upd.plot(range(len(values)), values, style, marker="o", ms=3, lw=1.2,
                            color=COLORS[arm], label=f"{LABELS[arm]}, {name}")  # fmt: skip
    if not drawn:
        plt.close(fig)
        return None
    for ax, what in ((ax_grad, "gradient norm ‖∂L/∂W‖"), (ax_upd, "update ‖ΔW‖/‖W‖")):
        ax.set_yscale("log")
        ax.set_xlabel("layer (0: first hidden, last: head)")
        ax.set_ylabel(what)
    ax_grad.set_title(f"per-layer gradient, seed {seed_of(sgd)}", fontsize=10)
    ax_upd.set_title("per-layer update relative to the weights", fontsize=10)
    ax_grad.legend(fontsize=7, loc="lower right")
    ax_upd.legend(fontsize=7, loc="lower right")
    return save(fig, out, "hessian_free_layers.png")


def evaluate(runs: list[RunRow], out: Path) -> Result:
    arms = group(runs, "arm", order=ORDER)

    # (a) the MLP: SGD at the HF run's wall-clock time, and per step
    mlp = paired(arms, MLP_SGD, MLP_HF)
    sgd_time = [at_time(s, elapsed(h)) for s, h in mlp]
    stuck = [
        p is not None and (b := baseline(s)) is not None and p[2] >= STUCK * b
        for (s, _), p in zip(mlp, sgd_time)
    ]
    hf_trains = [
        (loss := metric(h, "loss/test")) is not None
        and (b := baseline(h)) is not None
        and loss <= TRAINS * b
        for _, h in mlp
    ]

    def first_layer(when: str) -> list[float | None]:
        """HF's update of the first layer (relative to its weights) over SGD's."""
        out = []
        for s, h in mlp:
            a, b = layer_values(s, "update_ratio", when), layer_values(h, "update_ratio", when)
            out.append(b[0] / a[0] if a and b and a[0] > 0 else None)
        return out

    # (b) the RNN: HF with structural damping against SGD with clipping at equal time
    rnn = paired(arms, RNN_SGD, RNN_SD)
    rnn_sgd_time = [at_time(s, elapsed(h)) for s, h in rnn]
    sd_solves = [(m := metric(h, "loss/test")) is not None and m <= SOLVED for _, h in rnn]
    sgd_fails = [p is not None and p[2] > SOLVED for p in rnn_sgd_time]
    ablation = paired(arms, RNN_HF, RNN_SD)
    helps = [
        (a := metric(plain, "loss/test")) is not None
        and (b := metric(damped, "loss/test")) is not None
        and b > 0
        and a / b >= HELPS
        for plain, damped in ablation
    ]

    rows = []
    for arm, arm_runs in arms.items():
        hf = arm in (MLP_HF, RNN_HF, RNN_SD)
        partner = {MLP_SGD: MLP_HF, RNN_SGD: RNN_SD}.get(arm)
        equal_time = "-"
        if partner:
            pairs = paired(arms, arm, partner)
            points = [at_time(s, elapsed(h)) for s, h in pairs]
            equal_time = spread([p[2] if p else None for p in points])
            equal_time += f" (step {spread([float(p[0]) if p else None for p in points])})"
        hf_steps = 200 if arm.startswith("sigmoid") else 40
        rows.append([
            LABELS.get(arm, arm),
            str(len(arm_runs)),
            spread([metric(r, "loss/test") for r in arm_runs]),
            per_step(arm_runs, hf_steps),
            equal_time,
            spread([elapsed(r) for r in arm_runs], " s"),
            spread([hf_stat(r, "cg_iters", "median") for r in arm_runs]) if hf else "-",
            spread([hf_stat(r, "damping", "last") for r in arm_runs]) if hf else "-",
            spread([hf_stat(r, "rho_median") for r in arm_runs]) if hf else "-",
        ])  # fmt: skip
    table = markdown_table(
        [
            "arm",
            "seeds",
            "test loss at the end",
            "training loss once the HF arm's steps are done (per step)",
            "SGD's test loss when HF ended (equal wall-clock)",
            "seconds, step 0 to the end",
            "CG iterations (median per step)",
            "lambda at the end",
            "rho (median)",
        ],
        rows,
    )
    parts = [_most(stuck), _most(hf_trains), _most(sd_solves), _most(sgd_fails), _most(helps)]
    names = [
        f"SGD stuck on the MLP at equal wall-clock (test loss >= {STUCK}x baseline)",
        f"HF trains the MLP (test loss <= {TRAINS}x baseline)",
        f"HF + structural damping solves the adding problem (test MSE <= {SOLVED})",
        "SGD + clipping does not at equal wall-clock",
        f"structural damping helps (test MSE without / with >= {HELPS}x)",
    ]
    flags = [stuck, hf_trains, sd_solves, sgd_fails, helps]
    why = "Criteria, per seed; each part must hold on most seeds: " + "; ".join(
        f"{name}: {sum(f)}/{len(f)} ({'holds' if ok else 'does not hold'})"
        for name, f, ok in zip(names, flags, parts)
    ) + (
        f". The MLP's first layer moves {spread(first_layer('first'), 'x')} as much"
        " (relative to its weights) under HF's first step as under SGD's, and"
        f" {spread(first_layer('last'), 'x')} as much at their last log steps."
    )  # fmt: skip
    mlp_hf_loss = [metric(h, "loss/test") for _, h in mlp]
    result = (
        f"Deep sigmoid MLP: SGD stuck on {sum(stuck)}/{len(stuck)} seeds at equal wall-clock "
        f"(test loss {spread([p[2] if p else None for p in sgd_time])}); HF trains it on "
        f"{sum(hf_trains)}/{len(hf_trains)} (test loss {spread(mlp_hf_loss)}, baseline "
        f"{fmt(baseline(mlp[0][1]) if mlp else None)}). Tanh RNN, adding, T=100: HF + "
        f"structural damping solves it on {sum(sd_solves)}/{len(sd_solves)} (test MSE "
        f"{spread([metric(h, 'loss/test') for _, h in rnn])}), SGD + clipping at equal "
        f"wall-clock reaches {spread([p[2] if p else None for p in rnn_sgd_time])}; HF "
        f"without structural damping ends at "
        f"{spread([metric(p, 'loss/test') for p, _ in ablation])}."
    )
    figures = [p for p in (_curves(arms, out), _layers(arms, out)) if p is not None]
    return Result(verdict=judge(parts), result=result, why=why, table=table, figures=figures)
