"""A sweep's jobs on their own: a job that is launched again into its directory (SLURM's
requeue, `gradexp resume SWEEP_DIR`) continues from its checkpoint bit for bit, or is
not run again when it finished; one job's stop is that job's, not the sweep's; the
driver says what happened to each job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import cli_env, describe, gradexp_command, load_summary, run_cli
from test_resume import CONFIG, MACHINE_DEPENDENT, tensorboard_series

BASE = [c for c in CONFIG if not c.startswith("trainer.steps=")]  # each test its length
JOBS = ["0_seed=0", "1_seed=1"]
SWEEP = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1"]


def start_sweep(
    tmp_path: Path, sweep: Path, steps: int, launcher: list[str] = SWEEP
) -> subprocess.Popen[str]:
    args = [*gradexp_command(), "train", "-m", *BASE, f"trainer.steps={steps}", *launcher,
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    return subprocess.Popen(
        args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def wait_for_checkpoints(proc: subprocess.Popen[str], sweep: Path) -> None:
    deadline = time.monotonic() + 120
    while not all((sweep / job / "checkpoint.pt").exists() for job in JOBS):
        assert time.monotonic() < deadline and proc.poll() is None, "the jobs did not start"
        time.sleep(0.05)


def signal_job_0(proc: subprocess.Popen[str], sweep: Path, signum: int):
    """``signum`` to job 0's process once both jobs train; the driver, run to its end."""
    try:
        wait_for_checkpoints(proc, sweep)
        os.kill(job_pid(sweep / JOBS[0]), signum)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def job_pid(job_dir: Path) -> int:
    """The process running a job: its run dir's lock names it ("pid N on HOST, since")."""
    return int((job_dir / ".gradexp.lock").read_text().split()[1])


def assert_same_run(a: Path, b: Path) -> None:
    """Two runs ended alike: summary (but timings), parameters, TensorBoard's series."""
    sa, sb = load_summary(a), load_summary(b)
    for key in sa:
        if key not in MACHINE_DEPENDENT:
            assert sa[key] == sb[key], key
    ma = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    mb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert tensorboard_series(a, "loss/train") == tensorboard_series(b, "loss/train")


def test_a_sweep_killed_hard_is_finished_by_gradexp_resume(tmp_path: Path) -> None:
    """SIGKILL to the whole sweep once both jobs have a checkpoint (a node lost, a job
    preempted without grace): no summary, a checkpoint each. `gradexp resume SWEEP_DIR`
    continues both from their checkpoints through the sweep's own launcher, and each
    ends as the uninterrupted sweep's job does, with one TensorBoard series."""
    sweep = tmp_path / "sweep"
    proc = start_sweep(tmp_path, sweep, 4000)
    try:
        wait_for_checkpoints(proc, sweep)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    killed_at = [torch.load(sweep / j / "checkpoint.pt", weights_only=True)["step"] for j in JOBS]
    assert all(0 < step < 4000 for step in killed_at)
    resumed = run_cli(["resume", str(sweep)], tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    for job in JOBS:
        assert f"({job}): run again: continuing from its checkpoint" in resumed.stderr
    whole = tmp_path / "whole"
    proc = run_cli(["train", "-m", *CONFIG, *SWEEP, f"hydra.sweep.dir={whole}"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    for job in JOBS:
        assert_same_run(sweep / job, whole / job)
    # finished: launched again, nothing runs
    again = run_cli(["resume", str(sweep)], tmp_path)
    assert again.returncode == 0, describe(again)
    for job in JOBS:
        assert f"({job}): already completed (4000 steps): not run again" in again.stderr
    assert_same_run(sweep / JOBS[0], whole / JOBS[0])


def test_one_jobs_stop_is_that_jobs(tmp_path: Path) -> None:
    """SIGTERM to one job's process (what SLURM sends a job it preempts): that job stops
    with a checkpoint, the other finishes, the driver says which did what and exits 1;
    `gradexp resume SWEEP_DIR` then finishes the stopped one and leaves the other."""
    sweep = tmp_path / "sweep"
    done = signal_job_0(start_sweep(tmp_path, sweep, 10000), sweep, signal.SIGTERM)
    assert done.returncode == 1, describe(done)
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"gradexp: error: the sweep did not finish: 1 finished, 1 stopped ({JOBS[0]}):"
        f" `gradexp resume {sweep}` finishes the sweep"
    )
    first, second = load_summary(sweep / JOBS[0]), load_summary(sweep / JOBS[1])
    assert first["status"] == "interrupted" and 0 < first["steps"] < 10000
    assert second["status"] == "completed" and second["steps"] == 10000
    resumed = run_cli(["resume", str(sweep)], tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    assert f"({JOBS[1]}): already completed (10000 steps): not run again" in resumed.stderr
    assert load_summary(sweep / JOBS[0])["status"] == "completed"
    assert load_summary(sweep / JOBS[0])["steps"] == 10000


def test_a_job_without_checkpoint_starts_again_with_one_series(tmp_path: Path) -> None:
    """A job stopped before its first checkpoint: launched again it starts from step 0,
    and TensorBoard shows one series (the old events purged), equal to a whole run's."""
    sweep = tmp_path / "sweep"
    proc = run_cli(["train", "-m", *BASE, "trainer.steps=300", *SWEEP,
                    f"hydra.sweep.dir={sweep}"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    job = sweep / JOBS[1]
    whole_series = tensorboard_series(job, "loss/train")
    (job / "checkpoint.pt").unlink()
    summary = json.loads((job / "summary.json").read_text())
    (job / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    resumed = run_cli(["resume", str(sweep)], tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    assert f"({JOBS[1]}): run again: no checkpoint to continue from" in resumed.stderr
    assert load_summary(job)["status"] == "completed"
    assert len(list(job.glob("events.out.tfevents.*"))) == 2  # nothing deleted
    assert tensorboard_series(job, "loss/train") == whole_series


def test_resume_of_a_sweep_dir_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "multirun.yaml").write_text("hydra: {}\n")
    proc = run_cli(["resume", str(broken)], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    assert "not a sweep's directory" in proc.stderr


def multirun_yaml(root: Path, hydra: list[str], task: list[str]) -> Path:
    root.mkdir()
    (root / "multirun.yaml").write_text(
        json.dumps({"hydra": {"overrides": {"hydra": hydra, "task": task}}})  # YAML too
    )
    return root


def test_resume_args_are_the_sweeps_own_with_another_launcher_if_asked(tmp_path: Path):
    from gradexp.errors import ConfigError
    from gradexp.sweep import resume_args

    saved = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}",
             "hydra.mode=MULTIRUN"]  # fmt: skip
    sweep = multirun_yaml(tmp_path / "s", saved, ["init=normal,xavier_normal", "seed=0"])
    assert resume_args(sweep, []) == [
        "-m", "init=normal,xavier_normal", "seed=0", "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    assert resume_args(sweep, ["hydra/launcher=submitit_slurm", "trainer.steps=9"]) == [
        "-m", "init=normal,xavier_normal", "seed=0", "hydra/launcher=submitit_slurm",
        "trainer.steps=9", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    search = multirun_yaml(
        tmp_path / "o", ["hydra/sweeper=optuna"], ["optim.lr=interval(0.001, 1)"]
    )
    try:
        resume_args(search, [])
    except ConfigError as e:
        assert "a search's trials are sampled as it goes" in str(e)
    else:
        raise AssertionError("an optuna sweep was not refused")


def test_a_jobs_signal_goes_on_to_submitits_handler_only(capsys, monkeypatch):
    """After the job has saved its checkpoint: SIGUSR2 to submitit's handler (which
    requeues, or says why not); SIGTERM of a job SLURM requeues ends the process without
    a result (its next run continues), of a cancelled one returns (a result); another
    launcher's handler (Ray's) is left alone."""
    import signal as sig

    import pytest

    from gradexp import checkpoint
    from gradexp.checkpoint import StopOnSignal, pass_on_signal

    calls = []

    class Handler:  # as submitit's SignalHandler
        def requeue(self, signum, frame):
            calls.append(signum)
            raise RuntimeError("Job not requeued because: timed-out too many times.")

    Handler.__module__ = "submitit.core.job_environment"
    StopOnSignal.last = (sig.SIGUSR2, Handler().requeue)
    pass_on_signal("gradexp: job 0 (0_seed=0)")
    assert calls == [sig.SIGUSR2]
    assert capsys.readouterr().err == (
        "gradexp: job 0 (0_seed=0): Job not requeued because: timed-out too many times.\n"
    )
    StopOnSignal.last = (sig.SIGTERM, Handler().requeue)
    monkeypatch.setattr(checkpoint, "slurm_requeued", lambda: True)
    with pytest.raises(SystemExit) as stopped:
        pass_on_signal("job")
    assert stopped.value.code == 128 + sig.SIGTERM and calls == [sig.SIGUSR2]
    monkeypatch.setattr(checkpoint, "slurm_requeued", lambda: False)
    pass_on_signal("job")  # cancelled: the job returns its (interrupted) result
    assert calls == [sig.SIGUSR2]

    class Other(Handler):
        pass

    Other.__module__ = "ray._private.worker"
    StopOnSignal.last = (sig.SIGUSR2, Other().requeue)
    pass_on_signal("job")
    assert calls == [sig.SIGUSR2]
    StopOnSignal.last = None


def test_a_slurm_stop_before_the_training_loop_is_a_stop(tmp_path, monkeypatch, capsys):
    """SLURM's signal while the job is still being built (submitit's handler, not yet
    gradexp's) and submitit will not requeue it: the job is stopped, not failed; its
    summary.json says so, and a resume starts it again from step 0."""
    from types import SimpleNamespace

    from gradexp import cli, config, train
    from gradexp.checkpoint import SWEEP_STOP_ENV, continuation
    from gradexp.sweep import report

    class UncompletedJobError(Exception):  # submitit's, by name
        pass

    def stopped(cfg, output_dir):
        raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    monkeypatch.delenv(SWEEP_STOP_ENV, raising=False)
    monkeypatch.setattr(config, "to_config", lambda cfg: cfg)
    monkeypatch.setattr(train, "run", stopped)
    hydra = SimpleNamespace(job=SimpleNamespace(num=3))
    monkeypatch.setattr("hydra.core.hydra_config.HydraConfig.get", lambda: hydra)
    job = tmp_path / "sweep" / "3_seed=3"
    (job / ".hydra").mkdir(parents=True)
    summary = cli._run_job(None, job, True, False, lambda s: s)
    assert summary["status"] == "interrupted"
    assert "stopped before training: Job not requeued" in summary["error"]
    assert capsys.readouterr().err == (
        "gradexp: job 3 (3_seed=3): Job not requeued because: timed-out too many times.\n"
    )
    assert json.loads((job / "summary.json").read_text())["status"] == "interrupted"
    assert report(job.parent).stopped == ["3_seed=3"]
    assert continuation(job, 100)[0] == "restart"


def test_a_job_killed_hard_is_one_line_and_the_others_are_waited_for(tmp_path: Path):
    """submitit_local (the SLURM launcher's path on one machine): SIGKILL to job 0's
    process once it trains (the OOM killer, `scancel --signal=KILL`, a node lost: no
    result). The driver says so in one line, waits for job 1 (the plugin raised the
    first job's error as a traceback and stopped waiting), reports and exits 1;
    `gradexp resume SWEEP_DIR` continues job 0 from its checkpoint to the end an
    uninterrupted run reaches, with one TensorBoard series."""
    sweep, steps = tmp_path / "sweep", 4000
    launcher = ["seed=0,1", "hydra/launcher=submitit_local"]
    done = signal_job_0(start_sweep(tmp_path, sweep, steps, launcher), sweep, signal.SIGKILL)
    assert done.returncode == 1, describe(done)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    lost = [line for line in lines if "ended without a result" in line]
    assert len(lost) == 1 and lost[0].startswith("gradexp: job 0 (id "), describe(done)
    assert lines[-1] == (
        f"gradexp: error: the sweep did not finish: 1 finished, 1 without summary.json"
        f" ({JOBS[0]}): `gradexp resume {sweep}` finishes the sweep"
    )
    assert load_summary(sweep / JOBS[1])["status"] == "completed"
    logs = {p: p.read_text() for p in sweep.glob(".submitit/*/*_log.err")}
    resumed = run_cli(["resume", str(sweep)], tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    # the jobs' own lines are in their logs, as on SLURM
    err = "".join(
        p.read_text()[len(logs.get(p, "")) :] for p in sweep.glob(".submitit/*/*_log.err")
    )
    assert f"({JOBS[0]}): run again: continuing from its checkpoint" in err
    assert f"({JOBS[1]}): already completed ({steps} steps): not run again" in err
    whole = run_cli(["train", *BASE, f"trainer.steps={steps}", "seed=0",
                     f"hydra.run.dir={tmp_path / 'whole'}"], tmp_path)  # fmt: skip
    assert whole.returncode == 0, describe(whole)
    assert_same_run(sweep / JOBS[0], tmp_path / "whole")


def test_the_report_lists_a_lost_job_that_left_no_directory(tmp_path: Path) -> None:
    """A job killed while Python was still starting leaves no job directory: the driver's
    report still counts it, by its number, as unfinished."""
    from gradexp.sweep import report

    for name, status in (("0_seed=0", "completed"), ("2_seed=2", "interrupted")):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(json.dumps({"status": status}))
    jobs = report(tmp_path, lost=[1, 2])
    assert (jobs.finished, jobs.stopped, jobs.missing) == (["0_seed=0"], ["2_seed=2"], ["#1"])
    assert jobs.line(tmp_path) == (
        f"1 finished, 1 stopped (2_seed=2), 1 without summary.json (#1):"
        f" `gradexp resume {tmp_path}` finishes the sweep"
    )


def test_a_job_that_raised_before_gradexps_code_is_named_by_its_error(tmp_path, capsys):
    """A real submitit job whose error came before gradexp's own handling (submitit's
    time-out handler while Hydra builds the job): one line with the error's last line,
    a return the sweep reads and goes on, and the summary.json the job could not write
    (interrupted before training: a resume starts it again)."""
    import submitit

    from gradexp.checkpoint import SweepStop, continuation
    from gradexp.launchers import result
    from gradexp.sweep import report

    sweep = tmp_path / "sweep"
    for name in ("4_seed=4", "40_seed=40"):  # job 40 is another's
        (sweep / name / ".hydra").mkdir(parents=True)
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="local")
    job = executor.submit(int, "not a number")
    with SweepStop() as stop:
        ret = result(job, 4, ["seed=4"], None, sweep)
    why = "ValueError: invalid literal for int() with base 10: 'not a number'"
    assert ret.return_value is None and ret.overrides == ["seed=4"]
    assert stop.lost == {4: why}
    assert capsys.readouterr().err == (
        f"gradexp: job 4 (id {job.job_id}) ended without a result ({why});"
        f" its log: {job.paths.stderr}\n"
    )
    summary = load_summary(sweep / "4_seed=4")
    assert summary["status"] == "interrupted" and summary["steps"] == 0
    assert summary["error"] == f"ended before its first checkpoint: {why}"
    assert not (sweep / "40_seed=40" / "summary.json").exists()
    assert report(sweep).stopped == ["4_seed=4"]
    assert continuation(sweep / "4_seed=4", 100)[0] == "restart"
    # killed while training: its checkpoint is what a resume continues from, untouched
    (sweep / "40_seed=40" / "checkpoint.pt").write_bytes(b"a checkpoint")
    with SweepStop():
        result(job, 40, ["seed=40"], "state FAILED", sweep)
    assert not (sweep / "40_seed=40" / "summary.json").exists()


def test_a_job_gone_without_a_result_file(tmp_path, capsys):
    """squeue said the job ended and no result file comes: lost, one line. To an
    optimizing sweeper (optuna) a failed trial: its max_failure_rate decides, as for a
    trial that stopped. A result file that comes late (a shared filesystem) is read."""
    import submitit

    from gradexp.checkpoint import SweepStop
    from gradexp.launchers import result

    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="local")
    job = executor.submit(int, "7")
    job.wait()
    saved = job.paths.result_pickle.with_suffix(".saved")
    job.paths.result_pickle.rename(saved)
    job._results_timeout_s = 0  # submitit's wait for a late file (15 s), not needed here
    with SweepStop() as stop:
        failed = result(job, 5, ["seed=5"], "state NODE_FAIL", tmp_path, optimizing=True)
    assert stop.lost == {5: "state NODE_FAIL"}
    with pytest.raises(RuntimeError, match=r"^ended without a result \(state NODE_FAIL\): not"):
        _ = failed.return_value
    assert "gradexp: job 5 (id " in capsys.readouterr().err
    job._results_timeout_s = 5
    threading.Timer(1.0, saved.rename, [job.paths.result_pickle]).start()
    with SweepStop() as stop:
        assert result(job, 5, ["seed=5"], "state COMPLETED", tmp_path) == 7
    assert stop.lost == {} and "ended without a result" not in capsys.readouterr().err


def test_gradexp_resume_of_a_job_stopped_before_training_starts_it(tmp_path: Path) -> None:
    """`gradexp resume JOB_DIR` of a job that ended before its training loop (the summary
    the driver writes for it: interrupted at step 0, no checkpoint) starts it from step 0
    and says so; TensorBoard shows one series, the whole run's. One stopped later
    without its checkpoint still has nothing to continue from."""
    run = tmp_path / "run"
    proc = run_cli(["train", *BASE, "trainer.steps=300", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    whole_series = tensorboard_series(run, "loss/train")
    (run / "checkpoint.pt").unlink()
    stopped = {"status": "interrupted", "error": "ended before its first checkpoint: state FAILED",
               "steps": 0, "verdicts": []}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(stopped))
    resumed = run_cli(["resume", str(run)], tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    assert (
        f"gradexp: {run} stopped before its first checkpoint: starting it from step 0"
        in resumed.stderr
    )
    assert load_summary(run)["status"] == "completed"
    assert tensorboard_series(run, "loss/train") == whole_series
    (run / "checkpoint.pt").unlink()
    (run / "summary.json").write_text(json.dumps({**stopped, "steps": 120}))
    again = run_cli(["resume", str(run)], tmp_path)
    assert again.returncode == 2 and f"no checkpoint.pt in {run}" in again.stderr, describe(again)


def test_squeues_word_on_a_job_counts_twice_in_a_row_and_only_for_jobs_it_knew():
    """gradexp.launchers.Queue: a SLURM job has ended when squeue says so twice in a
    row (an ended state, or no longer listing a job it listed); a job it never listed
    (another cluster's) is not concluded on, nor is anything when squeue cannot answer."""
    from gradexp.launchers import Queue

    queue = Queue(["7_0", "7_1", "7_2"])
    queue.update({"7_0": "RUNNING", "7_1": "PENDING"})  # 7_2: never listed
    queue.update({"7_0": "FAILED", "7_1": "REQUEUE_HOLD"})
    assert [queue.said.get(i) for i in queue.job_ids] == ["state FAILED", None, None]
    assert queue.strikes == {"7_0": 1, "7_1": 0, "7_2": 0}
    queue.update(None)  # no answer: nothing moves
    assert queue.strikes == {"7_0": 1, "7_1": 0, "7_2": 0}
    queue.update({"7_0": "FAILED", "7_1": "RUNNING"})
    queue.asked = float("inf")  # no new question: what it has
    assert queue.ended("7_0") == "state FAILED" and queue.ended("7_2") is None
    queue.update({})  # it has forgotten all of them (MinJobAge)
    queue.update({})
    assert queue.ended("7_1") == "no longer known to SLURM"
    assert queue.ended("7_2") is None  # never listed: left to submitit
    queue.update({"7_1": "RUNNING"})  # a job it listed again (requeued): not ended
    assert queue.ended("7_1") is None
