"""rnn_adding: Le, Jaitly & Hinton 2015, Figure 2 (the adding problem): trained with SGD
and gradient-norm clipping, the IRNN and the LSTM learn the task; the tanh RNN and the
ReLU RNN whose recurrent weights start as N(0, 0.001^2) noise do not. Beside it, the
pitfall of DOMAIN.md: Adam, which rescales each parameter's step, rescues the small-init
nets that SGD leaves at the input-blind loss.

An arm "learns" on a seed when its summary's outcome is ``learned``: the final test loss
at most ``diagnose.learned_ratio`` (0.5) of the input-blind baseline's 1/6 (predicting 1
whatever the input). Note that 0.5 x 1/6 = 1/12 is what remembering only the second
marked number scores, so "learned" means it used the first one too (the long dependency).
A claim part holds on a majority of the seeds: the IRNN and the LSTM learn; the tanh RNN
and both ReLU RNNs with N(0, 0.001^2) recurrent weights (Xavier-uniform input and output
weights, and N(0, 0.001^2) ones as the IRNN's: which of the two the paper's baseline had
is not stated in what could be read of it) do not, trained with SGD. The Adam part (not
the paper's) holds for a small-init net when it learns under Adam on a majority of seeds
while under SGD it does not; it is reported beside the verdict, not in it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from claims.common import (
    Result,
    first_step,
    fmt,
    group,
    judge,
    markdown_table,
    metric,
    pyplot,
    save,
    scalars,
    spread,
)
from gradexp.report import RunRow

PRESET = "rnn_adding"
PAPER = (
    "Le, Jaitly & Hinton 2015, A Simple Way to Initialize Recurrent Networks of Rectified "
    "Linear Units, Figure 2"
)
CLAIM = (
    "On the adding problem, trained with SGD and gradient clipping, the IRNN (ReLU, W_hh = "
    "identity) learns as the LSTM does, where a tanh RNN and a ReLU RNN with N(0, 0.001^2) "
    "recurrent weights stay at the input-blind loss."
)
SHORT = [
    "trainer.steps=20",
    "data.n_train=256",
    "data.n_test=64",
    "trainer.eval_every=10",
    "trainer.log_every=10",
]

BASELINE = 1 / 6  # Var(U1 + U2), U ~ U[0, 1]: the loss of predicting 1 (loss/baseline)
# arm: (what it is, the paper's expectation: learns?)
PAPER_ARMS = {
    "irnn": ("IRNN: ReLU, W_hh = I, input/output N(0, 0.001^2), SGD", True),
    "lstm": ("LSTM, forget bias 1, SGD", True),
    "tanh_rnn": ("tanh RNN, W_hh ~ N(0, 0.001^2), SGD", False),
    "relu_rnn": ("ReLU RNN, W_hh ~ N(0, 0.001^2), input/output Xavier, SGD", False),
    "relu_rnn_small": ("ReLU RNN, every weight N(0, 0.001^2) (the IRNN but W_hh), SGD", False),
}
EXTRA_ARMS: dict[str, str] = {}
ADAM_ARMS = {  # the Adam arm: its SGD counterpart
    "tanh_rnn_adam": ("tanh RNN as tanh_rnn, Adam lr 0.01", "tanh_rnn"),
    "relu_rnn_small_adam": ("ReLU RNN as relu_rnn_small, Adam lr 0.01", "relu_rnn_small"),
}


def outcome(run: RunRow) -> str | None:
    """summary.json's outcome kind (learned / partly / not learned); None without one."""
    result = (run.summary or {}).get("outcome") or {}
    return result.get("kind")


def learned(run: RunRow) -> bool:
    return outcome(run) == "learned"


def dead_for_good(run: RunRow) -> float | None:
    """The recurrent layers' share of units dead for good (ReLU nets; None otherwise)."""
    layers = [layer for layer in (run.summary or {}).get("layers") or [] if layer["name"] != "head"]
    shares = [(layer.get("dead_units") or {}).get("never_recovered") for layer in layers]
    shares = [s for s in shares if s is not None]
    return statistics.fmean(shares) if shares else None


def test_curve(run: RunRow) -> list[tuple[int, float]]:
    return scalars(run, "loss/test", finite=True)


def steps_to_long_range(run: RunRow) -> float | None:
    """The first evaluation step whose test loss is below BASELINE / 2 = 1/12, what
    remembering only the second marked number scores; None if none is."""
    step = first_step(test_curve(run), lambda v: v < BASELINE / 2)
    return None if step is None else float(step)


def _thousands(step: float | None) -> float | None:
    return None if step is None else step / 1000


def _count(runs: list[RunRow]) -> str:
    kinds = [outcome(r) or "none" for r in runs]
    return ", ".join(f"{k} {kinds.count(k)}/{len(runs)}" for k in dict.fromkeys(kinds))


def _majority(runs: list[RunRow], test) -> bool:
    return bool(runs) and sum(map(test, runs)) * 2 > len(runs)


def _figure(by_arm: dict[str, list[RunRow]], out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = dict(zip(by_arm, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    drawn = False
    for arm, runs in by_arm.items():
        curves = [dict(test_curve(r)) for r in runs]
        steps = sorted(set().union(*curves)) if curves else []
        steps = [s for s in steps if all(s in c for c in curves)]
        if not steps:
            continue
        drawn = True
        vals = [[c[s] for c in curves] for s in steps]
        style = "--" if arm in ADAM_ARMS else "-"
        ax.plot(steps, [statistics.median(v) for v in vals], style, color=colors[arm],
                label=f"{arm} (n={len(runs)})")  # fmt: skip
        ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals],
                        color=colors[arm], alpha=0.15, lw=0)  # fmt: skip
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(BASELINE, color="k", lw=0.8, ls=":", label="input-blind 1/6")
    ax.axhline(BASELINE / 2, color="gray", lw=0.8, ls=":", label="second number only 1/12")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("test MSE")
    ax.set_title("adding problem: test loss, median and min-max over seeds (dashed: Adam)")
    ax.legend(fontsize=7, ncol=2)
    return save(fig, out, "rnn_adding_test_loss.png")


def evaluate(runs: list[RunRow], out: Path) -> Result:
    by_arm = group(runs, "arm")
    described = {a: d for a, (d, _) in PAPER_ARMS.items()}
    described |= EXTRA_ARMS | {a: d for a, (d, _) in ADAM_ARMS.items()}
    rows = []
    for arm, desc in described.items():
        arm_runs = by_arm.get(arm, [])
        if not arm_runs:
            continue
        losses = [metric(r, "loss/test") for r in arm_runs]
        dead = [dead_for_good(r) for r in arm_runs]
        rows.append(
            [
                f"`{arm}`",
                desc,
                spread(losses),
                spread([x / BASELINE if x is not None else None for x in losses]),
                _count(arm_runs),
                spread([_thousands(steps_to_long_range(r)) for r in arm_runs], missing="never"),
                spread([100 * d if d is not None else None for d in dead], "%")
                if any(d is not None for d in dead)
                else "-",
                spread([metric(r, "flow/time_grad_ratio") for r in arm_runs]),
            ]
        )
    table = markdown_table(
        [
            "arm",
            "model, optimizer",
            "loss/test",
            "÷ baseline 1/6",
            "outcome (per seed)",
            "first step below 1/12 (x1000)",
            "units dead for good",
            "‖dL/dh_1‖/‖dL/dh_T‖ at the end",
        ],
        rows,
    )

    parts, held, failed = [], [], []
    for arm, (_, learns) in PAPER_ARMS.items():
        arm_runs = by_arm.get(arm, [])
        ok = _majority(arm_runs, learned if learns else (lambda r: not learned(r)))
        parts.append(ok)
        n = sum(map(learned, arm_runs))
        text = (
            f"{arm} learned on {n}/{len(arm_runs)} seeds (paper: {'learns' if learns else 'fails'})"
        )
        (held if ok else failed).append(text)
    verdict = judge(parts)

    rescue = []
    for arm, (_, sgd_arm) in ADAM_ARMS.items():
        adam_runs, sgd_runs = by_arm.get(arm, []), by_arm.get(sgd_arm, [])
        ok = _majority(adam_runs, learned) and not _majority(sgd_runs, learned)
        rescue.append(
            f"{sgd_arm} learned on {sum(map(learned, sgd_runs))}/{len(sgd_runs)} seeds with SGD"
            f" and {sum(map(learned, adam_runs))}/{len(adam_runs)} with Adam"
            f" ({'rescued' if ok else 'no rescue shown'})"
        )

    def med(arm: str) -> str:
        vals = [v for v in (metric(r, "loss/test") for r in by_arm.get(arm, [])) if v is not None]
        return fmt(statistics.median(vals)) if vals else "-"

    result = (
        "Test MSE, median over seeds (baseline 0.167): "
        + ", ".join(f"{a} {med(a)}" for a in [*PAPER_ARMS, *ADAM_ARMS] if a in by_arm)
        + "."
    )
    why = (
        ("Held: " + "; ".join(held) + ". " if held else "")
        + ("Did not hold: " + "; ".join(failed) + ". " if failed else "")
        + "Adam (not the paper's claim): "
        + "; ".join(rescue)
        + "."
    )
    figure = _figure({a: by_arm[a] for a in described if a in by_arm}, out)
    return Result(verdict, result, why, table, [figure] if figure else [])
