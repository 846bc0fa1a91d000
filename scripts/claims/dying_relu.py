"""dying_relu: at a high learning rate ReLU units die; the leaky variants and ELU keep a
gradient (Maas et al. 2013; Xu et al. 2015; Clevert et al. 2016).

A unit is dead for good when it output exactly 0 for every example of the batch at every
log step since it died (summary.json ``layers[i].dead_units.never_recovered``, a share of
the layer's units). Judged on every seed: ReLU loses at least DEAD of its hidden units for
good; every other activation loses none and still sends a gradient to its first layer at
the end (a blow-up is reported; it fails the claim only when it leaves the first layer
without a gradient).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from claims.common import (
    Result,
    _events,
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

PRESET = "dying_relu"
PAPER = (
    "Maas et al. 2013 (leaky ReLU), Xu et al. 2015 (RReLU), He et al. 2015 (PReLU), "
    "Clevert et al. 2016 (ELU)"
)
CLAIM = (
    "At a high learning rate ReLU units die (output 0 and no gradient for every input, for "
    "good); leaky ReLU, RReLU, PReLU and ELU keep a gradient for negative inputs, so theirs "
    "do not."
)
SHORT = ["trainer.steps=30", "data.n_train=512", "data.n_test=128", "trainer.eval_every=10"]

DEAD = 0.1  # ReLU "dies": at least this share of its hidden units dead for good


def _hidden(run: RunRow) -> list[dict]:
    layers = (run.summary or {}).get("layers") or []
    return [layer for layer in layers if layer.get("name") != "head"]


def dead_for_good(run: RunRow) -> float | None:
    """The share of the hidden units dead for good (the layers are equally wide)."""
    shares = [(layer.get("dead_units") or {}).get("never_recovered") for layer in _hidden(run)]
    shares = [s for s in shares if s is not None]
    return statistics.fmean(shares) if shares else None


def dead_layers(run: RunRow) -> int | None:
    """Hidden layers whose every unit is dead for good."""
    shares = [(layer.get("dead_units") or {}).get("never_recovered") for layer in _hidden(run)]
    return sum(1 for s in shares if s is not None and s >= 1.0) if shares else None


def first_grad_last(run: RunRow) -> float | None:
    """The first hidden layer's gradient norm at the last logged step."""
    layers = _hidden(run)
    value = (layers[0].get("grad_norm") or {}).get("last") if layers else None
    return None if value is None or not math.isfinite(value) else float(value)


def dead_series(run: RunRow) -> list[tuple[int, float]]:
    """The mean over hidden layers of dead_frac/<layer> (dead in that batch), per step."""
    tags: set[str] = set()
    for events in sorted(run.path.glob("events.out.tfevents.*")):
        tags.update(_events(events).Tags()["scalars"])
    hidden = [t for t in tags if t.startswith("dead_frac/") and not t.endswith("head")]
    per_step: dict[int, list[float]] = {}
    for tag in hidden:
        for step, value in scalars(run, tag):
            per_step.setdefault(step, []).append(value)
    return sorted((s, statistics.fmean(v)) for s, v in per_step.items() if v)


def blew_up(run: RunRow) -> bool:
    """Diverged: a non-finite loss (status), or a finite blow-up (the diverged verdict)."""
    verdicts = (run.summary or {}).get("verdicts") or []
    return run.status == "diverged" or any(v.get("kind") == "diverged" for v in verdicts)


def _figure(by_act: dict[str, list[RunRow]], out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    colors = dict(zip(by_act, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    drawn = False
    for act, runs in by_act.items():
        for i, run in enumerate(runs):
            pts = dead_series(run)
            if pts:
                drawn = True
                ax.plot(*zip(*pts), color=colors[act], lw=1, label=act if i == 0 else None)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("share of hidden units dead in the batch")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("dead units, mean over the hidden layers (one line per seed)")
    ax.legend(fontsize=8)
    return save(fig, out, "dying_relu_dead.png")


def evaluate(runs: list[RunRow], out: Path) -> Result:
    by_act = group(runs, "activation", order=["relu", "leaky_relu", "rrelu", "prelu", "elu"])
    rows = []
    parts: list[bool] = []
    notes: list[str] = []
    for act, arm in by_act.items():
        dead = [dead_for_good(r) for r in arm]
        grads = [first_grad_last(r) for r in arm]
        statuses = [r.status for r in arm]
        rows.append(
            [
                act,
                str(len(arm)),
                spread([100 * d if d is not None else None for d in dead], "%"),
                spread([float(n) if n is not None else None for n in map(dead_layers, arm)]),
                spread(grads),
                spread([metric(r, "acc/test") for r in arm]),
                ", ".join(f"{s} {statuses.count(s)}/{len(arm)}" for s in sorted(set(statuses)))
                + f"; blew up {sum(map(blew_up, arm))}/{len(arm)}",
            ]
        )
        if act == "relu":
            died = sum(d is not None and d >= DEAD for d in dead)
            parts.append(died == len(arm))
            notes.append(
                f"ReLU lost >= {DEAD:.0%} of its units for good on {died}/{len(arm)} seeds"
            )
        else:
            kept = sum(
                d is not None and d == 0 and g is not None and g > 0 for d, g in zip(dead, grads)
            )
            parts.append(kept == len(arm))
            diverged = sum(map(blew_up, arm))
            note = f"{act} kept every unit and a gradient on {kept}/{len(arm)}"
            if diverged:
                note += f" (but blew up on {diverged}/{len(arm)})"
            notes.append(note)
    table = markdown_table(
        [
            "activation",
            "seeds",
            "hidden units dead for good",
            "hidden layers all dead",
            "first layer's |grad| at the end",
            "acc/test",
            "status",
        ],
        rows,
    )
    if "relu" not in by_act or len(by_act) < 2:
        parts.append(False)
        notes.append("the sweep lacks ReLU or an alternative")
    verdict = judge(parts)
    why = (
        f"Criteria, on every seed: ReLU loses at least {DEAD:.0%} of its hidden units for "
        "good; each other activation loses none and ends with a non-zero first-layer gradient "
        "(at its last finite logged step). A run that blows up (a non-finite loss, or the "
        "diverged verdict's finite blow-up) is counted in the status column; it does not fail "
        "the claim by itself (it is exploding, not dying), but a blown-up net whose first layer "
        "ends with no gradient does."
    )
    figures = [p for p in [_figure(by_act, out)] if p is not None]
    return Result(
        verdict=verdict, result="; ".join(notes) + ".", why=why, table=table, figures=figures
    )
