"""Sweeps on a real single-node SLURM cluster (munged, slurmdbd with MariaDB, slurmctld,
slurmd: scripts/cluster/slurm_local.sh, started and stopped by the fixture) through
Hydra's submitit launcher: a sweep is one SLURM array; SLURM's time-limit signal to one
job (SIGUSR2) makes it checkpoint and submitit requeue it, and it ends bit-identical to
an uninterrupted run; `scontrol requeue` of a running job does the same; a job submitit
will not requeue ends interrupted, alone, and `gradexp resume SWEEP_DIR` finishes it; a
job killed hard (also without accounting) or signalled while Python starts is one line
of the driver's, never a traceback; the launcher benchmark's SLURM arm runs. Root only
(CI installs the packages); skipped elsewhere with the reason."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import cli_env, describe, gradexp_command, load_summary, run_cli
from slurm_cluster import slurm_cluster
from test_resume import CONFIG
from test_sweep_resume import assert_same_run, job_pid

pytestmark = pytest.mark.cluster

BASE = [c for c in CONFIG if not c.startswith("trainer.steps=")] + ["trainer.steps=10000"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    with slurm_cluster(tmp_path_factory.mktemp("cluster")) as facts:
        yield facts


def slurm_sweep(
    tmp_path: Path, sweep: Path, slurm: dict, *extra: str, path: str | None = None
) -> subprocess.Popen:
    """The driver of a SLURM sweep; ``path``: a directory put first on its PATH."""
    args = [*gradexp_command(), "train", "-m", "hydra/launcher=submitit_slurm",
            f"hydra.launcher.partition={slurm['partition']}", *BASE, *extra,
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    env = cli_env(slurm["env"])
    if path is not None:
        env["PATH"] = os.pathsep.join([path, env["PATH"]])
    return subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def training(proc: subprocess.Popen, job: Path) -> None:
    """Wait until the job is inside its training loop (its first checkpoint)."""
    deadline = time.monotonic() + 180
    while not (job / "checkpoint.pt").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the job did not start"
        time.sleep(0.2)


def slurm_job_ids(sweep: Path) -> list[str]:
    """The array's tasks, as submitit's folders name them under .submitit/ (14_0, 14_1;
    the array's own folder, 14, holds the submission)."""
    names = [p.name for p in (sweep / ".submitit").iterdir()]
    return sorted(n for n in names if re.fullmatch(r"\d+_\d+", n))


def sacct_states(job: str, slurm: dict) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", job, "--format=State"],
                         capture_output=True, text=True, env={**os.environ, **slurm["env"]},
                         check=True).stdout  # fmt: skip
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, never interrupted, on this machine (the basic launcher)."""
    root = tmp_path_factory.mktemp("whole")
    proc = run_cli(["train", *BASE, "seed=0", f"hydra.run.dir={root / 'run'}"], root)
    assert proc.returncode == 0, describe(proc)
    return root / "run"


def sweep_with_task_0(tmp_path: Path, slurm: dict, command: list[str], *extra: str):
    """A 2-job sweep (seed=0,1) on SLURM; once task 0 trains, ``command`` + its id (scancel,
    scontrol requeue ...). Returns (the sweep dir, the tasks' ids, the finished driver)."""
    sweep = tmp_path / "sweep"
    proc = slurm_sweep(tmp_path, sweep, slurm, "seed=0,1", *extra)
    training(proc, sweep / "0_seed=0")
    ids = slurm_job_ids(sweep)
    subprocess.run([*command, ids[0]], env={**os.environ, **slurm["env"]}, check=True)
    return sweep, ids, finish(proc)


def test_a_time_limit_signal_to_one_job_requeues_it_alone(tmp_path, slurm, whole):
    """A two-job sweep is one SLURM array. SIGUSR2 (what SLURM sends before the time
    limit) to job 0 only: it checkpoints, submitit requeues it (a preemption: within
    its budget), it continues from the checkpoint; job 1 runs on untouched; the sweep
    exits 0 and job 0 ends bit-identical to an uninterrupted run, one series."""
    sweep, ids, done = sweep_with_task_0(tmp_path, slurm, ["scancel", "--signal=USR2"])
    assert len(ids) == 2 and ids[0].endswith("_0") and ids[1].endswith("_1"), ids  # one array
    assert done.returncode == 0, describe(done)
    assert "Traceback" not in done.stderr
    assert sacct_states(ids[0], slurm)[0] == "REQUEUED"
    assert sacct_states(ids[1], slurm) == ["COMPLETED"]
    log = (sweep / "0_seed=0" / "train.log").read_text()
    assert "signal 12: stopping before step" in log
    assert_same_run(whole, sweep / "0_seed=0")
    assert load_summary(sweep / "1_seed=1")["status"] == "completed"


def test_scontrol_requeue_continues_from_the_checkpoint(tmp_path, slurm, whole):
    """What a preemptible partition does to a running job: SLURM stops it (SIGTERM: the
    job checkpoints) and runs it again, which continues from that checkpoint instead of
    starting over; it ends bit-identical to an uninterrupted run, one series."""
    sweep, ids, done = sweep_with_task_0(tmp_path, slurm, ["scontrol", "requeue"])
    assert done.returncode == 0, describe(done)
    assert sacct_states(ids[0], slurm)[0] == "REQUEUED"
    err = "".join(p.read_text() for p in (sweep / ".submitit" / ids[0]).glob("*_log.err"))
    assert "(0_seed=0): run again: continuing from its checkpoint" in err
    assert_same_run(whole, sweep / "0_seed=0")


def time_limit(max_num_timeout: int) -> list[str]:
    """Three minutes, SLURM's warning (SIGUSR2) 30 s before: not before the jobs end."""
    return ["hydra.launcher.timeout_min=3", "hydra.launcher.signal_delay_s=30",
            f"hydra.launcher.max_num_timeout={max_num_timeout}"]  # fmt: skip


def test_a_time_out_within_max_num_timeout_is_requeued_and_finishes(tmp_path, slurm, whole):
    """max_num_timeout=1: the time-limit signal to job 0 (a time-out to submitit: its
    limit is under 10 minutes) checkpoints it and submitit requeues it; it finishes
    bit-identical to an uninterrupted run, and the sweep exits 0."""
    sweep, ids, done = sweep_with_task_0(
        tmp_path, slurm, ["scancel", "--signal=USR2"], *time_limit(max_num_timeout=1)
    )
    assert done.returncode == 0, describe(done)
    err = "".join(p.read_text() for p in (sweep / ".submitit" / ids[0]).glob("*_log.err"))
    assert "this job is timed-out" in err  # not a preemption: a time-out, requeued
    assert "(0_seed=0): run again: continuing from its checkpoint" in err
    assert_same_run(whole, sweep / "0_seed=0")


def test_a_job_not_requeued_stops_alone_and_gradexp_resume_finishes_it(tmp_path, slurm):
    """A three-minute limit (submitit counts any signal under 10 minutes as a time-out)
    and no time-outs allowed (max_num_timeout=0): the time-limit signal makes job 0
    checkpoint, submitit says why it does not requeue it, the job ends interrupted; job
    1 finishes; the driver says so and exits 1. `gradexp resume SWEEP_DIR` submits the
    sweep again: job 1 is not run again, job 0 finishes."""
    sweep, ids, done = sweep_with_task_0(
        tmp_path, slurm, ["scancel", "--signal=USR2"], *time_limit(max_num_timeout=0)
    )
    assert done.returncode == 1, describe(done)
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "gradexp: error: the sweep did not finish: 1 finished, 1 stopped (0_seed=0):"
        f" `gradexp resume {sweep}` finishes the sweep"
    )
    assert load_summary(sweep / "0_seed=0")["status"] == "interrupted"
    resumed = run_cli(["resume", str(sweep)], tmp_path, env=slurm["env"], timeout=300)
    assert resumed.returncode == 0, describe(resumed)
    for name in ("0_seed=0", "1_seed=1"):
        summary = load_summary(sweep / name)
        assert summary["status"] == "completed" and summary["steps"] == 10000, name


def test_a_cancelled_job_stops_alone_without_a_traceback(tmp_path, slurm):
    """`scancel` of one task (SIGTERM, no requeue: its restart count does not move): the
    task saves its checkpoint and ends interrupted, a result submitit hands back; the
    other finishes; the driver says so in one line and exits 1."""
    sweep, ids, done = sweep_with_task_0(tmp_path, slurm, ["scancel"])
    assert done.returncode == 1, describe(done)
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "gradexp: error: the sweep did not finish: 1 finished, 1 stopped (0_seed=0):"
        f" `gradexp resume {sweep}` finishes the sweep"
    )
    assert sacct_states(ids[0], slurm) == ["CANCELLED"]
    summary = load_summary(sweep / "0_seed=0")
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < 10000


def test_a_job_killed_hard_without_accounting_is_one_line_and_resumes(tmp_path, slurm, whole):
    """A cluster without accounting (a `sacct` that fails, first on the driver's PATH:
    submitit then cannot tell a lost job from a running one, and waited forever).
    SIGKILL to task 0's process once it trains (`scancel --signal=KILL` is a cancel to
    SLURM, SIGTERM first): squeue no longer runs the task, so the driver says so in one
    line, waits for task 1, reports and exits 1, no traceback.
    `gradexp resume SWEEP_DIR` continues task 0 from its checkpoint and it ends
    bit-identical to an uninterrupted run, with one TensorBoard series."""
    fake = tmp_path / "no-accounting"
    fake.mkdir()
    (fake / "sacct").write_text(
        "#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n"
    )
    (fake / "sacct").chmod(0o755)
    sweep = tmp_path / "sweep"
    proc = slurm_sweep(tmp_path, sweep, slurm, "seed=0,1", path=str(fake))
    training(proc, sweep / "0_seed=0")
    ids = slurm_job_ids(sweep)
    os.kill(job_pid(sweep / "0_seed=0"), signal.SIGKILL)  # what the OOM killer does
    done = finish(proc)
    assert done.returncode == 1, describe(done)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    lost = [line for line in lines if "ended without a result" in line]
    assert len(lost) == 1 and lost[0].startswith(f"gradexp: job 0 (id {ids[0]}) "), describe(done)
    assert lines[-1] == (
        "gradexp: error: the sweep did not finish: 1 finished, 1 without summary.json"
        f" (0_seed=0): `gradexp resume {sweep}` finishes the sweep"
    )
    assert load_summary(sweep / "1_seed=1")["status"] == "completed"
    resumed = run_cli(["resume", str(sweep)], tmp_path, env=slurm["env"], timeout=300)
    assert resumed.returncode == 0, describe(resumed)
    assert_same_run(whole, sweep / "0_seed=0")


def test_a_signal_while_the_job_starts_never_gives_a_traceback(tmp_path, slurm):
    """SLURM's signal (SIGUSR2) to task 0 the moment its step starts (its log appears),
    while Python is still starting: whichever handler is there yet (none: the process
    dies, seen here; submitit's: it requeues a preemption; gradexp's: it checkpoints),
    the driver prints no traceback, and the sweep finishes, or says in one line that
    `gradexp resume SWEEP_DIR` will, and that finishes it."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, **slurm["env"]}
    proc = slurm_sweep(tmp_path, sweep, slurm, "seed=0,1")
    deadline = time.monotonic() + 120
    while not (logs := list(sweep.glob(".submitit/*_0/*_0_log.err"))):  # its step started
        assert time.monotonic() < deadline and proc.poll() is None, "task 0 did not start"
        time.sleep(0.02)
    task = logs[0].parent.name
    subprocess.run(["scancel", "--signal=USR2", task], env=env, check=True)
    done = finish(proc)
    assert "Traceback" not in done.stderr, describe(done)
    if done.returncode != 0:
        assert done.returncode == 1, describe(done)
        assert (
            done.stderr.strip()
            .splitlines()[-1]
            .startswith("gradexp: error: the sweep did not finish: 1 finished,")
        ), describe(done)
        resumed = run_cli(["resume", str(sweep)], tmp_path, env=slurm["env"], timeout=300)
        assert resumed.returncode == 0, describe(resumed)
    for name in ("0_seed=0", "1_seed=1"):
        summary = load_summary(sweep / name)
        assert summary["status"] == "completed" and summary["steps"] == 10000, name


def test_the_launcher_benchmark_times_slurm_against_basic(slurm):
    from test_bench import run_launcher_bench

    out = run_launcher_bench(
        "--launchers", "submitit_slurm", "--partition", slurm["partition"], env=slurm["env"]
    )
    assert re.search(r"^submitit_slurm: \d+\.\d s per sweep .* s per job against basic$", out,
                     re.M), out  # fmt: skip
