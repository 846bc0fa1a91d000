"""The README's screenshots of the gradexp tab, from real runs, in Debian's Chromium.

Trains the default run (vanishing), the sweep `-m activation=relu
init=normal,xavier_normal,kaiming_normal` and an LSTM on the adding problem into one
logdir, starts `tensorboard` on it, and saves the tab's one-run view of the default run,
its sweep view and the LSTM's view (with its time heatmap) as PNGs.

    python scripts/tab_screenshots.py [--out docs/img] [--logdir DIR] [--steps 1000]
                                      [--lstm-steps 600]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
LSTM = ["model=lstm", "data.length=30", "optim=adam", "optim.lr=0.01"]


def train(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "gradexp", "train", *args, "trainer.progress=off"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def write_runs(root: Path, steps: int, lstm_steps: int) -> None:
    train([f"trainer.steps={steps}", f"hydra.run.dir={root / 'vanishing'}"])
    train(["-m", "activation=relu", "init=normal,xavier_normal,kaiming_normal",
           f"trainer.steps={steps}", f"hydra.sweep.dir={root / 'sweep'}"])  # fmt: skip
    train([*LSTM, f"trainer.steps={lstm_steps}", f"hydra.run.dir={root / 'lstm'}"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--logdir", type=Path, help="reuse (or write into) this logdir")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lstm-steps", type=int, default=600)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no Chromium here (apt-get install -y chromium)")
    root = args.logdir or Path(tempfile.mkdtemp(prefix="gradexp-tab-"))
    if not (root / "lstm" / "summary.json").exists():
        write_runs(root, args.steps, args.lstm_steps)
    port = free_port()
    exe = Path(sys.executable).parent / "tensorboard"
    tb = subprocess.Popen(
        [str(exe), "--logdir", str(root), "--host", "127.0.0.1", "--port", str(port),
         "--reload_interval", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/data/plugin/gradexp/statuses").read()
                break
            except OSError:
                time.sleep(0.5)
        args.out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
            # Tall enough for each view whole: the tab scrolls inside TensorBoard's iframe,
            # which a full-page screenshot does not unroll.
            page = browser.new_page(viewport={"width": 1300, "height": 560})
            page.goto(f"{url}/#gradexp")
            frame = page.frame_locator("iframe")
            frame.locator("#sweep[data-complete]").wait_for(timeout=60_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(args.out / "tab_sweep.png"))
            views = (("vanishing", "tab_vanishing.png", 1250), ("lstm", "tab_recurrent.png", 1500))
            for run, name, height in views:
                page.set_viewport_size({"width": 1300, "height": height})
                frame.locator("#run").select_option(run)
                frame.locator("#heatmap").wait_for()
                page.wait_for_timeout(800)
                page.screenshot(path=str(args.out / name))
            browser.close()
    finally:
        tb.terminate()
    print(f"wrote {', '.join(sorted(p.name for p in args.out.glob('tab_*.png')))} to {args.out}")


if __name__ == "__main__":
    main()
