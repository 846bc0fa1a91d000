"""residual: He et al. 2016, Figure 4 and Table 2 (and Figure 6 on CIFAR-10): a deep plain
net (with BatchNorm) trains worse the deeper it is; the residual net of the same depth
trains.

Judged by when each run leaves the initial plateau (loss/train < PLATEAU x ln C, as in
init_depth): the residual net must leave it on every seed at every depth, the plain net at
the deepest depth on none.
"""

from __future__ import annotations

from pathlib import Path

from claims.common import Result, by_keys, judge, natural
from claims.init_depth import _steps, leave_step, plateau_figure, plateau_table
from gradexp.report import RunRow

PRESET = "residual"
PAPER = 'He et al. 2016, "Deep residual learning for image recognition", Figure 4, Table 2'
CLAIM = (
    "Plain nets (with BatchNorm) get harder to train the deeper they are; a residual net of "
    "the same depth trains."
)
SHORT = ["trainer.steps=20", "data.n_train=512", "data.n_test=128", "trainer.eval_every=10"]

PLAIN, RESIDUAL = "mlp", "resmlp"


def evaluate(runs: list[RunRow], out: Path) -> Result:
    arms = by_keys(runs, ("model", "model.depth"), order=[PLAIN, RESIDUAL])
    table = plateau_table(
        arms, ("net", "depth"), {PLAIN: "plain (mlp)", RESIDUAL: "residual (resmlp)"}
    )
    depths = sorted({d for _, d in arms}, key=natural)
    parts: list[bool] = []
    notes: list[str] = []
    for depth in depths:
        res = arms.get((RESIDUAL, depth), [])
        n = sum(leave_step(r) is not None for r in res)
        parts.append(bool(res) and n == len(res))
        notes.append(f"residual, depth {depth}: left the plateau on {n}/{len(res)} seeds")
    for depth in depths:
        plain = arms.get((PLAIN, depth), [])
        n = sum(leave_step(r) is not None for r in plain)
        notes.append(f"plain, depth {depth}: {n}/{len(plain)}")
        if depth == depths[-1]:
            parts.append(bool(plain) and n == 0)
    if not parts:
        parts = [False]
    budget = max((_steps(r) for r in runs), default=0)
    verdict = judge(parts)
    why = (
        f"Criteria, within {budget} steps: the residual net leaves the plateau on every seed "
        f"at every depth, and the plain net at the deepest depth ({depths[-1] if depths else '-'}"
        ") on none."
    )
    figure = plateau_figure(
        arms,
        out,
        "residual_loss.png",
        title="depth {}, BatchNorm, He init (one line per seed)",
        colors={PLAIN: "tab:blue", RESIDUAL: "tab:red"},
        labels={PLAIN: "plain", RESIDUAL: "residual"},
    )
    figures = [figure] if figure is not None else []
    return Result(
        verdict=verdict, result="; ".join(notes) + ".", why=why, table=table, figures=figures
    )
