"""What sets the blow-up verdict's thresholds: runs that learn (or merely stall) against
runs whose loss and weights blow up while staying finite.

Trains each configuration (``gradexp train``, one process each, two at a time) and reads
its event file back: how far the training loss rose above where it started (or the
task's baseline, whichever is higher), for how many consecutive log steps, and how far
the weights grew and how large the update/weight ratio got. The default thresholds
(``diagnose.loss_blowup``, ``diagnose.weight_growth``, ``diagnose.update_blowup``)
must sit between the two groups.

    python scripts/verdict_thresholds.py [--steps 300] [--seeds 0 1] [--only healthy]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# name -> (expected: "learns", "stalls" or "blows up", overrides)
CONFIGS = {
    "default (sigmoid, N(0,1))": ("stalls", []),
    "relu + kaiming": ("learns", ["activation=relu", "init=kaiming_normal"]),
    "tanh + xavier": ("learns", ["activation=tanh", "init=xavier_normal"]),
    "adam": ("learns", ["optim=adam", "optim.lr=0.001", "init=xavier_normal"]),
    "resnet": ("learns", ["model=resnet"]),
    "lstm, adding": ("learns", ["model=lstm", "data=adding", "init=xavier_normal"]),
    "rnn, radius 1.5": ("stalls", ["model=rnn", "data=adding", "init=xavier_normal"]),
    "relu, lr 0.5": ("learns", ["activation=relu", "init=kaiming_normal", "optim.lr=0.5"]),
    "sigmoid, lr 100": ("blows up", ["optim.lr=100"]),
    "sigmoid, lr 1000": ("blows up", ["optim.lr=1000"]),
    "tanh, lr 30": ("blows up", ["activation=tanh", "init=xavier_normal", "optim.lr=30"]),
}


def series(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def measure(overrides: list[str], steps: int, seed: int) -> dict:
    from tensorboard.backend.event_processing import event_accumulator

    with tempfile.TemporaryDirectory() as tmp:
        args = [*overrides, f"trainer.steps={steps}", f"seed={seed}", "trainer.progress=off"]
        proc = subprocess.run(
            [sys.executable, "-m", "gradexp", "train", *args, f"hydra.run.dir={tmp}/run"],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        (events,) = Path(tmp, "run").glob("events.out.tfevents.*")
        acc = event_accumulator.EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        loss = series(acc, "loss/train")
        baseline = series(acc, "loss/baseline")
        ref = max(loss[0][1], baseline[0][1]) if loss and baseline else math.nan
        rise = [v / ref for _, v in loss]
        tags = acc.Tags()["scalars"]
        growth, update = 0.0, 0.0
        for tag in (t for t in tags if t.startswith("weight_norm/")):
            values = [v for _, v in series(acc, tag)]
            if values and values[0] > 0 and math.isfinite(values[-1]):
                growth = max(growth, max(values) / values[0])
        for tag in (t for t in tags if t.startswith("update_ratio/")):
            values = sorted(v for _, v in series(acc, tag) if math.isfinite(v))
            if values:  # the median: one large step is not a blow-up
                update = max(update, values[len(values) // 2])
    return {
        "max loss / start": max(rise) if rise else math.nan,
        "final loss / start": rise[-1] if rise else math.nan,
        "weight growth": growth,
        "median upd/w": update,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", choices=["learns", "stalls", "blows up"], default=None)
    args = parser.parse_args()
    jobs = [
        (name, expected, seed, overrides)
        for name, (expected, overrides) in CONFIGS.items()
        if args.only in (None, expected)
        for seed in args.seeds
    ]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda j: measure(j[3], args.steps, j[2]), jobs))
    keys = ["max loss / start", "final loss / start", "weight growth", "median upd/w"]
    print(f"{'run':28} {'expected':9} seed " + " ".join(f"{k:>18}" for k in keys))
    for (name, expected, seed, _), result in zip(jobs, results):
        if "error" in result:
            print(f"{name:28} {expected:9} {seed:4} error: {result['error']}")
            continue
        cells = " ".join(f"{result[k]:18.3g}" for k in keys)
        print(f"{name:28} {expected:9} {seed:4} {cells}")


if __name__ == "__main__":
    main()
