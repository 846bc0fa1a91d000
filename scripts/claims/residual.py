"""residual: He et al. 2016, Figure 4 and Table 2 (and Figure 6 on CIFAR-10): a deep plain
net (with BatchNorm) trains worse the deeper it is; the residual net of the same depth
trains.

Judged by when each run leaves the initial plateau (loss/train < PLATEAU x ln C, as in
init_depth): the residual net must leave it on every seed at every depth, the plain net at
the deepest depth on none.
"""

from __future__ import annotations

import math
from pathlib import Path

from claims.common import Result, group, judge, markdown_table, metric, scalars, spread
from claims.init_depth import (
    PLATEAU,
    TAIL,
    WINDOW,
    _classes,
    _steps,
    _width_key,
    bwd_ratio_at_init,
    final_train_loss,
    leave_step,
)
from gradexp.report import RunRow

PRESET = "residual"
PAPER = 'He et al. 2016, "Deep residual learning for image recognition", Figure 4, Table 2'
CLAIM = (
    "Plain nets (with BatchNorm) get harder to train the deeper they are; a residual net of "
    "the same depth trains."
)
SHORT = ["trainer.steps=20", "data.n_train=512", "data.n_test=128", "trainer.eval_every=10"]

PLAIN, RESIDUAL = "mlp", "resmlp"


def _plateau_cell(runs: list[RunRow]) -> str:
    steps = [leave_step(r) for r in runs]
    left = [float(s) for s in steps if s is not None]
    budget = max((_steps(r) for r in runs), default=0)
    if not left:
        return f"not within {budget} steps (0/{len(runs)})"
    text = spread(left)
    if len(left) < len(runs):
        text += f"; {len(runs) - len(left)}/{len(runs)} not within {budget}"
    return text


def _figure(arms: dict[tuple[str, str], list[RunRow]], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    depths = sorted({d for _, d in arms}, key=_width_key)
    fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 3.6), squeeze=False)
    colors = {PLAIN: "tab:blue", RESIDUAL: "tab:red"}
    for ax, depth in zip(axes[0], depths):
        bar = None
        for (model, d), runs in arms.items():
            if d != depth:
                continue
            for i, run in enumerate(runs):
                pts = [(s, v) for s, v in scalars(run, "loss/train") if math.isfinite(v)]
                if pts:
                    bar = PLATEAU * math.log(_classes(run))
                    label = {PLAIN: "plain", RESIDUAL: "residual"}.get(model, model)
                    ax.plot(*zip(*pts), color=colors.get(model, "gray"), lw=1,
                            label=label if i == 0 else None)  # fmt: skip
        if bar is not None:
            ax.axhline(bar, color="k", ls="--", lw=0.8, label=f"{PLATEAU} ln C")
            ax.set_ylim(0, bar / PLATEAU * 1.2)
        ax.set_title(f"depth {depth}, BatchNorm, He init (one line per seed)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss/train (one batch)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not any(ax.lines for ax in axes[0]):
        plt.close(fig)
        return None
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "residual_loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate(runs: list[RunRow], out: Path) -> Result:
    arms: dict[tuple[str, str], list[RunRow]] = {}
    for model, of_model in group(runs, "model").items():
        for depth, of_depth in group(of_model, "model.depth").items():
            arms[(model, depth)] = of_depth
    order = [PLAIN, RESIDUAL]
    arms = dict(
        sorted(
            arms.items(),
            key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 2, kv[0][0],
                            _width_key(kv[0][1])),
        )
    )  # fmt: skip
    rows = [
        [
            {PLAIN: "plain (mlp)", RESIDUAL: "residual (resmlp)"}.get(model, model),
            depth,
            str(len(arm)),
            _plateau_cell(arm),
            spread([final_train_loss(r) for r in arm]),
            spread([metric(r, "acc/test") for r in arm]),
            spread([bwd_ratio_at_init(r) for r in arm]),
            ", ".join(sorted({r.status for r in arm})),
        ]
        for (model, depth), arm in arms.items()
    ]
    table = markdown_table(
        [
            "net",
            "depth",
            "seeds",
            f"steps to loss/train < {PLATEAU} ln C (mean of {WINDOW} logged)",
            f"final loss/train (last {TAIL} logged)",
            "acc/test",
            "bwd first/head at step 0",
            "status",
        ],
        rows,
    )
    depths = sorted({d for _, d in arms}, key=_width_key)
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
    figures = [p for p in [_figure(arms, out)] if p is not None]
    return Result(
        verdict=verdict, result="; ".join(notes) + ".", why=why, table=table, figures=figures
    )
