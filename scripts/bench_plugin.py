"""How long the gradexp tab takes to show a sweep, measured in the browser.

Writes a logdir shaped like a real sweep (N runs x L layers x S logged steps of every
per-layer quantity the tab reads, plus each run's verdicts and summary text), starts
``tensorboard`` on it, opens the gradexp tab in Debian's Chromium (Playwright, no
download) and times, per repeat in a fresh page, from navigation to every run's heatmap
drawn (the sweep view: the tab's first view when a logdir holds several runs; its first
screen of 16 runs comes first), and to a single run's view. TensorBoard's own page load is
part of every figure (about 1 s here). The first visit is reported on its own: the tab's
server keeps the grids it read (until a run logs more), so later visits read less.

    python scripts/bench_plugin.py [--runs 100] [--layers 30] [--steps 100] [--repeats 3]
                                   [--logdir DIR]

``--logdir DIR`` writes the logdir there once and reuses it later (same shape): runs of
two versions of the tab, interleaved, then time the same events.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

QUANTITIES = ("signal_bwd", "grad_norm", "signal_fwd", "update_ratio", "sat_frac")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def write_logdir(root: Path, runs: int, layers: int, steps: int) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary

    from gradexp.metrics import TensorBoardLogger
    from gradexp.record import SUMMARY_DATA

    rng = random.Random(0)
    width = max(2, len(str(layers)))
    for r in range(runs):
        decay = rng.uniform(0.3, 1.2)  # per layer, in log10: vanishing to exploding
        logger = TensorBoardLogger(root / f"{r}_init=x{r % 5},seed={r}")
        for s in range(steps):
            step = s * 10
            values = []
            for i in range(layers):
                depth = layers - 1 - i
                for q in QUANTITIES:
                    v = 10 ** (-decay * depth * (1 + 0.1 * math.sin(s / 7))) * rng.uniform(0.8, 1.2)
                    values.append(
                        Summary.Value(tag=f"{q}/{i:0{width}d}_hidden.{i}", simple_value=v)
                    )
            logger.writer.file_writer.add_summary(Summary(value=values), step)
        verdict = "vanishing" if decay > 0.5 else "healthy"
        logger.text(
            "run/verdicts",
            "| verdict | layer | step | evidence |\n|---|---|---|---|\n"
            f"| {verdict} | hidden.0 | 0 | synthetic |",
            steps * 10,
        )
        summary = {"status": "completed", "steps": steps * 10, "verdicts": [], "options": {}}
        logger.data(SUMMARY_DATA, summary, steps * 10)
        logger.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--logdir", type=Path, help="write the logdir here once; reuse it")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no Chromium: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.logdir or Path(tmp)
        t = time.perf_counter()
        if args.logdir and args.logdir.is_dir() and any(args.logdir.iterdir()):
            print(f"logdir: {root}, as written before")
        else:
            write_logdir(root, args.runs, args.layers, args.steps)
            print(f"logdir: {args.runs} runs x {args.layers} layers x {args.steps} steps "
                  f"({time.perf_counter() - t:.1f} s to write)")  # fmt: skip
        port = free_port()
        exe = Path(sys.executable).parent / "tensorboard"
        tb = subprocess.Popen(
            [str(exe), "--logdir", str(root), "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}/#gradexp"
        t = time.perf_counter()
        # Until TensorBoard has read every run to its end (each run's summary is its last
        # event), as a user finds it later; neither route reads the tab's grids.
        while True:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/data/plugin/gradexp/runs"
                ) as r:
                    listed = len(json.loads(r.read())["runs"])
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/data/plugin/gradexp/statuses"
                ) as r:
                    if listed == len(json.loads(r.read())["statuses"]) == args.runs:
                        break
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        print(f"tensorboard read the logdir in {time.perf_counter() - t:.1f} s")
        screen, sweep, single, cold = [], [], [], []
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
                for repeat in range(args.repeats + 1):  # the first: nothing cached yet
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    start = time.perf_counter()
                    page.goto(url)
                    frame = page.frame_locator("iframe")
                    first_n = min(16, args.runs)  # the first screen (index.js FIRST_SCREEN)
                    frame.locator("#sweep .card").nth(first_n - 1).wait_for(timeout=300_000)
                    first = time.perf_counter() - start
                    every = frame.locator("#sweep[data-complete] .card").nth(args.runs - 1)
                    every.wait_for(timeout=300_000)
                    shown = time.perf_counter() - start
                    frame.locator("#sweep .card button").first.click()
                    start2 = time.perf_counter()
                    frame.locator("#heatmap").wait_for()
                    opened = time.perf_counter() - start2
                    if repeat:
                        screen.append(first)
                        sweep.append(shown)
                        single.append(opened)
                    else:
                        cold = [first, shown, opened]
                    page.close()
                browser.close()
        finally:
            tb.terminate()
            tb.wait()
    views = (
        ("sweep view, first screen drawn", screen),
        ("sweep view, every run drawn", sweep),
        ("one run opened from it", single),
    )
    print("first visit (nothing cached): first screen {:.2f} s, every run {:.2f} s, "
          "one run {:.2f} s".format(*cold))  # fmt: skip
    print(f"then {args.repeats} visits:")
    for name, xs in views:
        print(f"  {name}: {statistics.median(xs):.2f} s median ({min(xs):.2f} to {max(xs):.2f})")


if __name__ == "__main__":
    main()
