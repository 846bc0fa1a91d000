"""Sweeps on an external Ray cluster joined by address (hydra.launcher.ray.init.address):
a head started by the test (`ray start --head --block` in a session of its own, stopped
by its process group, never `ray stop`, which kills every Ray process on the machine).
A sweep by address completes; Ctrl-C stops its jobs, which run in Ray's workers outside
the driver's process group, through the stop file in the sweep's directory, each with
its checkpoint, and `gradexp resume SWEEP_DIR` finishes them; an address where nothing
answers fails in one line."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import cli_env, describe, gradexp_command, load_summary, run_cli

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
        reason="the Ray launcher is not installed",
    ),
]
TINY = ["model.depth=3", "model.width=8", "trainer.progress=off", "trainer.figure_every=0"]
JOBS = ["0_seed=0", "1_seed=1"]
CURRENT = Path("/tmp/ray/ray_current_cluster")  # where `address=auto` finds the head


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on this machine for the module's tests; stopped by its process group."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray is None:
        pytest.skip("Ray's `ray` command is not installed")
    # One head on the machine at a time: another xdist worker's tests of this module wait
    # for this one's to end (address=auto finds whichever head runs).
    lock = open(Path(tempfile.gettempdir()) / "gradexp-ray-head.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        yield from _head(ray)
    finally:
        lock.close()


def _head(ray: str):
    if CURRENT.exists():
        pytest.skip(f"a Ray cluster already runs on this machine ({CURRENT})")
    start = time.monotonic()
    head = subprocess.Popen(
        [ray, "start", "--head", "--port=6399", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", "--block"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=cli_env(),
    )  # fmt: skip
    try:
        while not CURRENT.exists():
            assert head.poll() is None, head.stdout.read() if head.stdout else "ray start failed"
            assert time.monotonic() - start < 120, "the Ray head did not start in 120 s"
            time.sleep(0.2)
        yield {"started_in_s": time.monotonic() - start}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        time.sleep(1)
        with contextlib.suppress(ProcessLookupError):  # gcs_server and raylet outlive it
            os.killpg(head.pid, signal.SIGKILL)
        CURRENT.unlink(missing_ok=True)


BY_ADDRESS = ["hydra/launcher=ray", "hydra.launcher.ray.init.address=auto"]


def test_a_sweep_by_address_completes(tmp_path: Path, ray_head) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(["train", "-m", *BY_ADDRESS, *TINY, "trainer.steps=20", "seed=0,1",
                    f"hydra.sweep.dir={sweep}"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    for job in JOBS:
        assert load_summary(sweep / job)["status"] == "completed"


def test_ctrl_c_reaches_jobs_on_the_cluster(tmp_path: Path, ray_head) -> None:
    """The jobs run in Ray's workers, which the terminal's Ctrl-C does not reach: they stop
    through the stop file, each with a checkpoint; the driver exits 130 in one line."""
    sweep = tmp_path / "sweep"
    args = [*gradexp_command(), "train", "-m", *BY_ADDRESS, *TINY, "trainer.steps=100000",
            "trainer.checkpoint_every=200", "seed=0,1", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not all((sweep / job / "checkpoint.pt").exists() for job in JOBS):
            assert time.monotonic() < deadline and proc.poll() is None, "jobs did not start"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, describe(subprocess.CompletedProcess(args, proc.returncode,
                                                                      out, err))  # fmt: skip
    assert err.strip().splitlines()[-1] == (
        f"gradexp: error: the sweep was stopped: 0 finished, 2 stopped ({', '.join(JOBS)}):"
        f" `gradexp resume {sweep}` finishes the sweep"
    )
    for job in JOBS:
        summary = load_summary(sweep / job)
        assert summary["status"] == "interrupted" and 0 < summary["steps"] < 100000, job
    resumed = run_cli(["resume", str(sweep), "trainer.steps=1000"], tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    for job in JOBS:
        summary = load_summary(sweep / job)
        assert summary["status"] == "completed" and summary["steps"] == 1000, job


def test_an_address_where_nothing_answers_fails_in_one_line(tmp_path: Path) -> None:
    address = "hydra.launcher.ray.init.address=127.0.0.1:1"
    proc = run_cli(["train", "-m", "hydra/launcher=ray", address, "seed=0,1"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    assert proc.stderr.strip() == (
        "gradexp: error: hydra.launcher.ray.init.address=127.0.0.1:1: nothing answers there"
        " (Connection refused); start the cluster (ray start --head) or check its address"
    )
