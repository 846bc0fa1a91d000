"""What ``gradexp report TREE --png flow.png`` costs on a tree of N runs: wall time, peak
RSS and the pixel size of each PNG written.

The tree is synthetic, shaped like a real sweep's outputs (no training): N runs over
init x optim.lr x model.depth (5 to 50 hidden layers) and a seed each, every one with
.hydra/overrides.yaml and a summary.json of the size a real run writes (every per-layer
quantity at step 0 and at the last step, metrics, a verdict); every 50th run failed
and the one after it was killed before writing summary.json. Each repeat runs the real
CLI in a fresh subprocess (imports included, as a user runs it); its peak RSS is that
process's own maximum resident set size (os.wait4).

    python scripts/bench_report_png.py [--runs 200] [--repeats 3] [--keep DIR]
    python scripts/bench_report_png.py --src /tmp/old/src   # another checkout's gradexp

``--src`` runs ``python -m gradexp`` with that source directory first on PYTHONPATH:
e.g. ``git archive HEAD~1 | tar -x -C /tmp/old`` to compare before and after a change.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# init -> the gradient's gain a layer (from the head down): < 1 vanishes, > 1 explodes.
INITS = {
    "normal": 0.35,
    "kaiming_normal": 1.0,
    "xavier_normal": 0.8,
    "orthogonal": 0.95,
    "identity": 1.3,
}
LRS = ("0.001", "0.01", "0.1", "1.0")
DEPTHS = tuple(range(5, 55, 5))
QUANTITIES = ("signal_fwd", "weight_norm", "update_ratio", "act_mean", "act_std", "sat_frac")


def _layer(index: int, name: str, grad: tuple[float, float], rnd: random.Random) -> dict:
    def fl(first: float | None, last: float | None) -> dict[str, float | None]:
        return {"first": first, "last": last}

    layer: dict[str, Any] = {"index": index, "name": name, "grad_norm": fl(*grad)}
    layer["signal_bwd"] = fl(grad[0] * 3.2, grad[1] * 3.1)
    for quantity in QUANTITIES:
        layer[quantity] = fl(rnd.uniform(0.1, 1.0), rnd.uniform(0.1, 1.0))
    layer["dead_frac"] = fl(None, None)
    layer["dead_units"] = None
    return layer


def make_tree(root: Path, runs: int, seed: int = 0) -> Path:
    """A synthetic sweep of ``runs`` runs under root/multirun; returns that directory."""
    rnd = random.Random(seed)
    sweep = root / "multirun" / "2024-01-01" / "12-00-00"
    combos = list(itertools.product(INITS, LRS, DEPTHS))
    for i in range(runs):
        init, lr, depth = combos[i % len(combos)]
        run = sweep / f"{i}"
        (run / ".hydra").mkdir(parents=True)
        overrides = [f"init={init}", f"optim.lr={lr}", f"model.depth={depth}", f"seed={i}"]
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        if i % 50 == 9:
            continue  # killed before summary.json
        if i % 50 == 8:
            failed = {"status": "failed", "error": "RuntimeError: boom", "steps": 0}
            (run / "summary.json").write_text(json.dumps({**failed, "verdicts": []}))
            continue
        gain = INITS[init] * rnd.uniform(0.9, 1.1)
        names = [f"hidden.{j}" for j in range(depth)] + ["head"]
        layers = []
        for j, name in enumerate(names):
            g = 1e-2 * gain ** (depth - j)
            layers.append(_layer(j, name, (g, g * rnd.uniform(0.5, 2.0)), rnd))
        metrics = {"loss/train": 2.0, "loss/test": 2.1, "acc/train": 0.3, "acc/test": 0.28}
        verdict = {"kind": "vanishing" if gain < 0.9 else "healthy", "layer": "hidden.0"}
        summary = {
            "status": "completed",
            "error": None,
            "steps": 200,
            "verdicts": [{**verdict, "step": 0, "evidence": {}}],
            "metrics": metrics,
            "layers": layers,
            "time": [],
        }
        (run / "summary.json").write_text(json.dumps(summary))
    return sweep


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR header."""
    data = path.read_bytes()[:24]
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def run_once(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one run of the command, which must exit 0."""
    import subprocess

    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {proc.returncode}:\n{log.read_text()[-2000:]}")
    # ru_maxrss: kilobytes on Linux, bytes on macOS.
    rss = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return wall, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="runs in the tree (200)")
    parser.add_argument("--repeats", type=int, default=3, help="report runs timed (3)")
    parser.add_argument("--src", type=Path, help="run this source directory's gradexp")
    parser.add_argument("--keep", type=Path, help="write tree and PNGs here, and keep them")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tree = make_tree(work / "tree", args.runs)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if args.src:
            path = [str(args.src.resolve()), env.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
        walls, rsss = [], []
        for i in range(args.repeats):
            pngs = work / f"png{i}"
            command = [sys.executable, "-m", "gradexp", "report", str(tree)]
            command += ["--png", str(pngs / "flow.png")]
            wall, rss = run_once(command, env, work / f"report{i}.log")
            walls.append(wall)
            rsss.append(rss)
        written = sorted(pngs.glob("*.png"))
        sizes = ", ".join(f"{p.name} {w}x{h}" for p in written for w, h in [png_size(p)])
        print(f"gradexp report --png, {args.runs} runs, {args.repeats} repeats")
        spread = f"{min(walls):.2f} to {max(walls):.2f}"
        print(f"  wall {statistics.median(walls):.2f} s median ({spread})")
        print(f"  peak RSS {max(rsss):.0f} MB (max over repeats)")
        print(f"  wrote {len(written)} PNG(s): {sizes}")


if __name__ == "__main__":
    main()
