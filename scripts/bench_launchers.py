"""What a launcher costs a sweep: the wall time of the same small sweep through Hydra's
launchers, against the basic launcher (the jobs one after another in the driver).

Each sweep is ``gradexp train -m`` of JOBS tiny jobs (seed=0..JOBS-1, 20 steps, a
3-layer MLP: a second or so of training each), so what is measured is mostly the
launcher: submitting, starting a Python with torch per job, waiting, collecting. The
launchers are interleaved, repeat after repeat (this machine is noisy); the report
gives each one's median and range, and its difference from basic per job.

    python scripts/bench_launchers.py [--launchers basic submitit_local ray submitit_slurm]
                                      [--jobs 2] [--repeats 3] [--partition NAME]

``submitit_slurm`` needs a running cluster (SLURM_CONF, ``--partition``): e.g.
``scripts/cluster/slurm_local.sh up DIR`` as root. ``ray`` starts a local Ray instance
per sweep (its own start-up is part of the figure).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["model.depth=3", "model.width=8", "trainer.steps=20", "trainer.log_every=5",
        "data.n_train=256", "data.n_test=64"]  # fmt: skip
SETTINGS = {  # the launcher's own settings
    "basic": [],
    "submitit_local": ["hydra/launcher=submitit_local"],
    "ray": ["hydra/launcher=ray", "hydra.launcher.ray.init.num_cpus=2"],
    "submitit_slurm": ["hydra/launcher=submitit_slurm"],
}


def sweep(launcher: str, jobs: int, root: Path, partition: str | None) -> float:
    """Seconds for one sweep, driver start to exit (which must be 0)."""
    extra = SETTINGS[launcher]
    if launcher == "submitit_slurm" and partition:
        extra = [*extra, f"hydra.launcher.partition={partition}"]
    seeds = ",".join(str(s) for s in range(jobs))
    directory = Path(tempfile.mkdtemp(prefix=f"{launcher}-", dir=root))
    gradexp = shutil.which("gradexp", path=str(Path(sys.executable).parent)) or "gradexp"
    command = [gradexp, "train", "-m", *extra, *TINY, f"seed={seeds}",
               f"hydra.sweep.dir={directory / 'sweep'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{launcher}: the sweep failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    shutil.rmtree(directory, ignore_errors=True)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launchers", nargs="+", default=["basic", "submitit_local", "ray"],
                        choices=list(SETTINGS))  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--partition", help="submitit_slurm: the partition to submit to")
    args = parser.parse_args()
    launchers = ["basic", *[name for name in args.launchers if name != "basic"]]
    times: dict[str, list[float]] = {name: [] for name in launchers}
    with tempfile.TemporaryDirectory(prefix="bench-launchers-") as root:
        for repeat in range(args.repeats):
            order = launchers if repeat % 2 == 0 else launchers[::-1]  # interleaved
            for name in order:
                times[name].append(sweep(name, args.jobs, Path(root), args.partition))
    base = statistics.median(times["basic"])
    print(f"{args.jobs} jobs of 20 steps per sweep, {args.repeats} interleaved repeats")
    for name in launchers:
        median = statistics.median(times[name])
        line = (f"{name}: {median:.1f} s per sweep (range {min(times[name]):.1f}-"
                f"{max(times[name]):.1f})")  # fmt: skip
        if name != "basic":
            line += f", {(median - base) / args.jobs:+.1f} s per job against basic"
        print(line)


if __name__ == "__main__":
    main()
