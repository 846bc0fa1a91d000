"""Checkpoints that resume a run bit for bit, and stopping cleanly on SIGINT/SIGTERM.

A checkpoint holds everything the next step depends on: the model, optimizer,
scheduler and gradient-scaler states, the batch generator's and torch's random
states, and the run's own bookkeeping (logged history, non-finite state, dead-unit
tracker). It is written atomically (a temporary file, then a rename), so a kill
during the write leaves the previous one intact.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from gradexp.config import EXECUTION_KEYS, Config, Schedule, flat
from gradexp.errors import ConfigError, shorten
from gradexp.rundir import CHECKPOINT_FILE, read_summary, write_bytes_atomic

# The layout of a checkpoint (gradexp.train.Trainer.state_dict); another one is refused.
CHECKPOINT_FORMAT = 2


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically. Serialized in memory first: a full disk
    then raises OSError(ENOSPC) from the write (torch's own file writer says only
    "iostream error"), and the temporary file is removed."""
    import torch  # here: a sweep's driver uses this module without torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getbuffer())


def load(path: Path) -> dict[str, Any]:
    """The state saved by ``save`` (tensors on the CPU); ConfigError (one line) for a file
    that is not one (truncated, corrupt, another program's)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, OSError) and not path.is_file():
            raise
        text = str(e).strip()  # torch's first sentence says what is wrong with the file
        why = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        raise ConfigError(
            f"{path}: not a readable checkpoint, truncated or corrupt ({shorten(why, limit=120)});"
            " restore it, or start the run again in another hydra.run.dir"
        ) from None


class StopOnSignal:
    """While entered, SIGINT and SIGTERM (what SLURM sends before preemption) set
    ``signum`` instead of interrupting: the loop stops between two steps, so the state
    it saves is consistent. A second SIGINT interrupts at once (KeyboardInterrupt).
    Outside the main thread (a launcher's worker) signals cannot be caught: a no-op.
    """

    # SIGUSR2: what Hydra's submitit launcher has SLURM send before a time limit.
    SIGNALS = (
        signal.SIGINT,
        signal.SIGTERM,
        *(getattr(signal, n) for n in ("SIGUSR2",) if hasattr(signal, n)),
    )

    # The signal that stopped the last run, and the handler it replaced (submitit's, in a
    # SLURM job): see pass_on_signal.
    last: tuple[int, Any] | None = None

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        StopOnSignal.last = (signum, self.previous.get(signum))
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> StopOnSignal:
        StopOnSignal.last = None
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


# A sweep's stop is a file in the sweep's own directory (shared storage on a cluster, where
# the results are): the driver touches it, every job reads it, wherever it runs.
STOP_FILE = ".gradexp-stop"
SWEEP_STOP_ENV = "GRADEXP_SWEEP_STOP"  # set by each job itself (gradexp.cli), from its dir
SWEEP_DRIVER_ENV = "GRADEXP_SWEEP_DRIVER"  # the driver's pid: a job elsewhere is in a worker


class SweepStop:
    """While a sweep runs, the driver's SIGINT/SIGTERM stop it cleanly: the running jobs
    stop between two steps and save a checkpoint (a terminal's Ctrl-C reaches them too; a
    job elsewhere reads the stop file), and the jobs that have not started yet do not
    start. The stop is ``STOP_FILE`` in the sweep directory, known once Hydra has made it
    (``at``, from gradexp.cli.SweepCallback). One job's own stop (SLURM preempting it) is
    that job's: it does not stop the sweep. A second SIGINT interrupts at once."""

    current: SweepStop | None = None  # the driver's, while it runs

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None
        self.signalled = False
        self.previous: dict[int, Any] = {}
        # Jobs the launcher saw end without a result (gradexp.launchers), by number: why.
        self.lost: dict[int, str] = {}

    @property
    def path(self) -> Path | None:
        return self.sweep_dir / STOP_FILE if self.sweep_dir is not None else None

    @property
    def stopped(self) -> bool:
        """The driver was signalled, or a job in its own process stopped the sweep."""
        return self.signalled or (self.path is not None and self.path.exists())

    def at(self, sweep_dir: Path) -> None:
        """The sweep's directory, as Hydra resolved it: a stop file left there by an
        earlier driver that was killed is not this sweep's."""
        self.sweep_dir = Path(sweep_dir).absolute()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        assert self.path is not None
        if self.signalled:
            self.path.touch()
        else:
            self.path.unlink(missing_ok=True)

    def _handle(self, signum: int, frame: object) -> None:
        if not self.stopped:
            print(
                f"gradexp: {signal.Signals(signum).name}: stopping the sweep; running jobs"
                " save a checkpoint, the others do not start (Ctrl-C again: at once)",
                file=sys.stderr,
            )
        self.signalled = True
        if self.path is not None:
            self.path.touch()
        # A second signal: at once (SIGTERM: the default, which ends the driver).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def __enter__(self) -> SweepStop:
        os.environ[SWEEP_DRIVER_ENV] = str(os.getpid())
        SweepStop.current = self
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        os.environ.pop(SWEEP_DRIVER_ENV, None)
        os.environ.pop(SWEEP_STOP_ENV, None)
        SweepStop.current = None
        if self.path is not None:  # every job has ended: the stop has done its work
            self.path.unlink(missing_ok=True)


def join_sweep(job_dir: Path) -> None:
    """In a sweep's job (wherever it runs): the sweep's stop is the file in the directory
    above the job's own."""
    os.environ[SWEEP_STOP_ENV] = str(Path(job_dir).absolute().parent / STOP_FILE)


def sweep_stop_file() -> Path | None:
    """In a sweep's job: the file whose existence says the sweep was stopped."""
    path = os.environ.get(SWEEP_STOP_ENV)
    return Path(path) if path else None


def sweep_stopped() -> bool:
    """In a sweep's job: has the sweep been stopped?"""
    path = sweep_stop_file()
    return path is not None and path.exists()


def pass_on_signal(job: str) -> None:
    """In a sweep's job that a signal stopped, once its checkpoint and summary are written:
    the signal to the handler gradexp's replaced while training. In a SLURM job that is
    submitit's: on the time-limit or preemption signal (SIGUSR2) it requeues the job
    (``hydra.launcher.max_num_timeout`` times for time-outs), and the job, run again,
    continues from its checkpoint (gradexp.checkpoint.continuation); when submitit will
    not requeue it says why (one line) and the job ends interrupted, to be resumed. On
    SIGTERM (SLURM stopping the job) the process exits without a result."""
    last = StopOnSignal.last
    if last is None:
        return
    signum, handler = last
    owner = type(getattr(handler, "__self__", None)).__module__
    if not owner.startswith("submitit."):  # another launcher's handler (Ray's): not ours to call
        return
    if signum == signal.SIGTERM:
        # SLURM itself is stopping the job. Requeued (a preemption, `scontrol requeue`):
        # no result to submitit, whose driver then waits for the job's next run (which
        # continues from the checkpoint). Cancelled: the job ends interrupted, a result.
        if slurm_requeued():
            raise SystemExit(128 + signum)
        return
    try:
        handler(signum, None)  # submitit's requeue exits the process (SystemExit)
    except Exception as e:  # submitit's UncompletedJobError: "Job not requeued because ..."
        print(f"{job}: {e}", file=sys.stderr)


def slurm_requeued() -> bool:
    """In a SLURM job that got SIGTERM: is SLURM requeueing it (its restart count is past
    this run's), rather than cancelling it? When SLURM cannot be asked: assume so, and
    leave what comes next to SLURM."""
    import re
    import subprocess

    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                             timeout=20, check=False).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return True
    found = re.search(r"\bRestarts=(\d+)", out)
    return found is None or int(found.group(1)) > int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def in_driver() -> bool:
    """In a sweep's job: does it run in the driver's own process (Hydra's basic launcher),
    where a signal the job caught was the driver's?"""
    return os.environ.get(SWEEP_DRIVER_ENV) == str(os.getpid())


def ignore_sigint_between_jobs() -> None:
    """In a launcher's worker process (joblib's loky workers): an idle worker that gets a
    terminal's Ctrl-C would die and break the pool; a job's StopOnSignal catches SIGINT
    while it runs and puts this back after."""
    driver = os.environ.get(SWEEP_DRIVER_ENV)
    in_worker = driver is not None and int(driver) != os.getpid()
    if in_worker and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_sweep() -> None:
    """In a sweep's job that its driver's signal interrupted (in the driver's own
    process): the jobs after it do not start."""
    path = sweep_stop_file()
    if path is not None and path.parent.is_dir():
        path.touch()


def continuation(run_dir: Path, steps: int) -> tuple[str, dict[str, Any] | None]:
    """What a sweep's job does in a directory a run already used (SLURM requeued it, or
    ``gradexp resume SWEEP_DIR`` launched it again), and the summary found there:

    - "complete": it finished (completed with ``steps`` steps or more, or diverged, a
      result too): it does not run again;
    - "resume": from its checkpoint.pt (the config must match: resume_state);
    - "restart": nothing to continue from (stopped before its first checkpoint, or never
      started): from step 0, its old TensorBoard events hidden (purged);
    - "new": the directory holds no run.
    """
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    status = (summary or {}).get("status")
    done = (status == "completed" and (summary or {}).get("steps", 0) >= steps) or (
        status == "diverged"
    )
    if done:
        return "complete", summary
    if (run_dir / CHECKPOINT_FILE).is_file():
        return "resume", summary
    if summary is not None or any(run_dir.glob("events.out.tfevents.*")):
        return "restart", summary
    return "new", None


# What a resumed run may change: how it runs, not what it computes. trainer.steps may
# grow (train on) unless a cosine schedule has fixed the run's length.
# Besides the keys that never change a result (config.EXECUTION_KEYS), how often a run
# saves and draws, and (below) its length.
RESUME_MAY_CHANGE = (
    *EXECUTION_KEYS,
    "trainer.steps",
    "trainer.checkpoint_every",
    "trainer.figure_every",
)


def resume_state(checkpoint: Path, cfg: Config) -> dict[str, Any] | None:
    """The checkpoint a resumed run continues from; ConfigError when there is none to
    continue (no checkpoint, or one already at the last step) or when ``cfg`` differs
    from the config it was trained with. None: a run stopped before its loop."""
    steps = cfg.trainer.steps
    if not checkpoint.is_file():
        if never_started(checkpoint.parent):
            return None  # stopped before its loop: it starts from step 0
        raise ConfigError(f"trainer.resume=true: no {checkpoint.name} in {checkpoint.parent}")
    state = load(checkpoint)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"trainer.resume=true: {checkpoint} was written by another version of gradexp"
            " (its layout differs); start the run again"
        )
    saved, now = state.get("config"), flat(cfg)
    if saved is not None:
        may_change = set(RESUME_MAY_CHANGE)
        if cfg.optim.schedule == Schedule.cosine:  # the schedule has fixed the run's length
            may_change.discard("trainer.steps")
        changed = [k for k in now if k not in may_change and saved.get(k) != now[k]]
        if changed:
            was = ", ".join(f"{k}={saved.get(k)}" for k in changed)
            raise ConfigError(
                f"trainer.resume=true: {', '.join(f'{k}={now[k]}' for k in changed)}, but the "
                f"run was trained with {was}; resume it with its own config "
                f"(gradexp resume {checkpoint.parent})"
            )
    if state["step"] >= steps:
        raise ConfigError(
            f"trainer.resume=true: {checkpoint} is at step {state['step']} of {steps}:"
            " nothing to resume (raise trainer.steps to train on)"
        )
    return state


NOT_STARTED = "the sweep was stopped before this job started"


def never_started(run_dir: Path) -> bool:
    """A run stopped before its training loop: its summary.json says interrupted at step
    0 (a job a stopped sweep never started, one SLURM signalled or killed while it was
    being built). Resuming it is starting it: there is nothing to continue."""
    summary = read_summary(run_dir) or {}
    return summary.get("status") == "interrupted" and summary.get("steps") == 0
