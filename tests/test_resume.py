"""Interruption and resumption: SIGINT/SIGTERM stop a run between two steps with a
checkpoint and summary.json (status interrupted); resuming the run dir ends bit for
bit where an uninterrupted run ends (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import cli_env, describe, gradexp_command, load_summary, run_cli, scalar_series

# rrelu draws from torch's global RNG every training step, momentum SGD keeps a state:
# both must come back exactly. Fast enough that 4000 steps take a few seconds.
CONFIG = (
    "model.depth=3",
    "model.width=8",
    "activation=rrelu",
    "data.n_train=256",
    "data.n_test=64",
    "trainer.steps=4000",
    "trainer.progress=off",
    "trainer.figure_every=0",
    "trainer.checkpoint_every=200",  # the interrupting tests wait for the first one
)
MACHINE_DEPENDENT = ("wall_time_s", "steps_per_s")


def tensorboard_series(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """A tag read from every event file of the run dir, as TensorBoard shows it."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return scalar_series(acc, tag)


def interrupt(run_dir: Path, signum: int) -> subprocess.CompletedProcess[str]:
    """Start the run, send ``signum`` once it is training, wait for it to stop."""
    args = [*gradexp_command(), "train", *CONFIG, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        args, cwd=run_dir.parent, env=cli_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Into the training loop: its first periodic checkpoint is written.
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint.pt").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the run did not start"
            time.sleep(0.05)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("whole")
    proc = run_cli(["train", *CONFIG, f"hydra.run.dir={root / 'run'}"], cwd=root)
    assert proc.returncode == 0, describe(proc)
    return root / "run"


# The two ways to resume: the same command with trainer.resume=true and the run dir, and
# `gradexp resume RUN_DIR` (the overrides read back from the run dir).
@pytest.mark.parametrize(
    ("signum", "how"),
    [(signal.SIGTERM, "train"), (signal.SIGINT, "resume")],
    ids=["SIGTERM-train", "SIGINT-resume"],
)
def test_interrupted_run_resumes_bit_identical(tmp_path: Path, uninterrupted: Path, signum, how):
    run_dir = tmp_path / "run"
    stopped = interrupt(run_dir, signum)
    assert stopped.returncode == 130, describe(stopped)
    assert "Traceback" not in stopped.stderr
    summary = load_summary(run_dir)
    assert summary["status"] == "interrupted"
    assert 0 < summary["steps"] < 4000, "the signal must land inside the training loop"
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["step"] == summary["steps"]

    if how == "train":
        args = ["train", *CONFIG, f"hydra.run.dir={run_dir}", "trainer.resume=true"]
    else:
        args = ["resume", str(run_dir)]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, describe(proc)
    resumed, whole = load_summary(run_dir), load_summary(uninterrupted)
    assert resumed["status"] == "completed" and resumed["steps"] == 4000
    for key in whole:
        if key not in MACHINE_DEPENDENT:
            assert resumed[key] == whole[key], key  # exact: floats compared as written
    a = torch.load(uninterrupted / "checkpoint.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    for name in ("optimizer", "batches", "torch_rng"):
        assert str(a[name]) == str(b[name]), name
    # TensorBoard: one series without the steps logged twice, equal to the whole run's
    assert tensorboard_series(run_dir, "loss/train") == tensorboard_series(
        uninterrupted, "loss/train"
    )


def test_checkpoints_every_n_steps(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [*CONFIG[:-4], "trainer.steps=30", "trainer.checkpoint_every=20"]
    proc = run_cli(["train", *overrides, f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 30


def test_resume_errors_are_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(["train", *CONFIG, f"hydra.run.dir={run_dir}", "trainer.resume=true"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    assert (
        proc.stderr.strip() == f"gradexp: error: trainer.resume=true: no checkpoint.pt in {run_dir}"
    )
    short = ["model.depth=3", "model.width=8", "trainer.steps=3", "trainer.progress=off"]
    assert run_cli(["train", *short, f"hydra.run.dir={run_dir}"], tmp_path).returncode == 0
    proc = run_cli(["train", *short, f"hydra.run.dir={run_dir}", "trainer.resume=true"], tmp_path)
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr, describe(proc)
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_resume_with_another_config_is_refused_and_loses_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    short = ["model.depth=3", "model.width=8", "trainer.steps=3", "trainer.progress=off"]
    assert run_cli(["train", *short, f"hydra.run.dir={run_dir}"], tmp_path).returncode == 0
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    changed = [*short, "model.depth=4", "trainer.steps=10"]
    proc = run_cli(["train", *changed, f"hydra.run.dir={run_dir}", "trainer.resume=true"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "model.depth=4" in line and "trained with model.depth=3" in line
    assert f"gradexp resume {run_dir}" in line
    # Hydra has not rewritten the run dir's .hydra/ files: gradexp resume still reads them.
    assert {
        p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
    } == before


def test_gradexp_resume_trains_a_sweep_job_on(tmp_path: Path) -> None:
    """A finished sweep job (its dir name holds "=" and ","), trained on to 10 steps, ends
    with the parameters of a 10-step run; bad uses of the command are one line."""
    tiny = ["model.depth=3", "model.width=8", "trainer.progress=off", "activation=relu"]
    sweep = tmp_path / "sweep"
    args = ["train", "-m", *tiny, "trainer.steps=6", "init=normal,lecun_normal", "seed=1,2"]
    proc = run_cli([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    job = sweep / "3_init=lecun_normal,seed=2"
    proc = run_cli(["resume", str(job), "trainer.steps=10"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    summary = load_summary(job)
    assert summary["status"] == "completed" and summary["steps"] == 10
    whole = tmp_path / "whole"
    proc = run_cli(
        ["train", *tiny, "trainer.steps=10", "init=lecun_normal", "seed=2",
         f"hydra.run.dir={whole}"], tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    a = torch.load(whole / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(job / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    for bad, fragment in [
        ([str(tmp_path)], "not a gradexp run dir"),
        ([str(job), "-m"], "only KEY=VALUE overrides"),
        ([str(job)], "nothing to resume"),
        ([], "usage: gradexp resume RUN_DIR"),
    ]:
        proc = run_cli(["resume", *bad], tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
        assert fragment in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("launcher", "running"),
    [
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], 2),
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=8"], 3),  # no idle worker
        ([], 1),  # the basic launcher: one job after the other, in the driver's process
    ],
    ids=["joblib", "joblib-more-workers-than-jobs", "basic"],
)
def test_ctrl_c_stops_a_sweep_cleanly(tmp_path: Path, launcher: list[str], running: int) -> None:
    """Ctrl-C (SIGINT to the process group) during a sweep of 3 jobs: the running jobs
    stop with a checkpoint and summary.json, the jobs not started yet do not start (and
    say so), the sweep exits 130 in one line; an unstarted job resumes from step 0."""
    sweep = tmp_path / "sweep"
    names = ["0_init=normal", "1_init=lecun_normal", "2_init=xavier_normal"]
    args = [
        *gradexp_command(), "train", "-m", *launcher, *CONFIG[:-4], "trainer.steps=100000",
        "trainer.progress=off", "trainer.figure_every=0", "trainer.checkpoint_every=100",
        "init=normal,lecun_normal,xavier_normal", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        # Into the training loops: each running job has saved a checkpoint.
        started = [sweep / name / "checkpoint.pt" for name in names[:running]]
        deadline = time.monotonic() + 120
        while not all(c.exists() for c in started):
            assert time.monotonic() < deadline and proc.poll() is None, "jobs did not start"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    stopped = subprocess.CompletedProcess(args, proc.returncode, out, err)
    assert stopped.returncode == 130, describe(stopped)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    stopped_jobs = ", ".join(names[:running])
    unstarted = f", {len(names) - running} never started ({', '.join(names[running:])})"
    assert err.strip().splitlines()[-1] == (
        f"gradexp: error: the sweep was stopped: 0 finished, {running} stopped ({stopped_jobs})"
        f"{unstarted if running < len(names) else ''}: `gradexp resume {sweep}` finishes the"
        " sweep"
    )
    assert not (sweep / ".gradexp-stop").exists()  # the driver cleans up its stop
    for name in names[:running]:
        summary = load_summary(sweep / name)
        assert summary["status"] == "interrupted" and 0 < summary["steps"] < 100000, name
        saved = torch.load(sweep / name / "checkpoint.pt", weights_only=True)
        assert saved["step"] == summary["steps"]
    for name in names[running:]:
        summary = load_summary(sweep / name)
        assert summary["error"] == "the sweep was stopped before this job started"
        assert not (sweep / name / "checkpoint.pt").exists()
    if running < len(names):
        unstarted = sweep / names[-1]
        proc2 = run_cli(["resume", str(unstarted), "trainer.steps=20"], tmp_path)
        assert proc2.returncode == 0, describe(proc2)
        assert load_summary(unstarted)["status"] == "completed"
        assert load_summary(unstarted)["steps"] == 20
