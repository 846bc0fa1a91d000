"""Checkpoints that resume a run bit for bit, and stopping cleanly on SIGINT/SIGTERM.

A checkpoint holds everything the next step depends on: the model, optimizer,
scheduler and gradient-scaler states, the batch generator's and torch's random
states, and the run's own bookkeeping (logged history, non-finite state, dead-unit
tracker). It is written atomically (a temporary file, then a rename), so a kill
during the write leaves the previous one intact.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from gradexp.config import EXECUTION_KEYS, Config, Schedule, flat
from gradexp.errors import ConfigError, shorten
from gradexp.rundir import SUMMARY_FILE, write_bytes_atomic

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

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


# A sweep's driver names a file here; its jobs (in-process or in launcher workers, which
# inherit the environment) read it.
SWEEP_STOP_ENV = "GRADEXP_SWEEP_STOP"
SWEEP_DRIVER_ENV = "GRADEXP_SWEEP_DRIVER"  # the driver's pid: a job elsewhere is in a worker


class SweepStop:
    """While a sweep runs, SIGINT/SIGTERM stop it cleanly: the running jobs stop between
    two steps and save a checkpoint (they get the signal too: a terminal's Ctrl-C and
    SLURM signal every process of the job, and a job in the driver's own process has its
    StopOnSignal), and the jobs that have not started yet do not start. The stop is a
    file, so that launcher workers in other processes see it. A second SIGINT interrupts
    at once."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gradexp-sweep-"))
        self.path = self.dir / "stop"
        self.previous: dict[int, Any] = {}

    @property
    def stopped(self) -> bool:
        return self.path.exists()

    def _handle(self, signum: int, frame: object) -> None:
        if not self.stopped:
            print(
                f"gradexp: {signal.Signals(signum).name}: stopping the sweep; running jobs"
                " save a checkpoint, the others do not start (Ctrl-C again: at once)",
                file=sys.stderr,
            )
        self.path.touch()
        # A second signal: at once (SIGTERM: the default, which ends the driver).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def __enter__(self) -> SweepStop:
        os.environ[SWEEP_STOP_ENV] = str(self.path)
        os.environ[SWEEP_DRIVER_ENV] = str(os.getpid())
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        os.environ.pop(SWEEP_STOP_ENV, None)
        os.environ.pop(SWEEP_DRIVER_ENV, None)
        shutil.rmtree(self.dir, ignore_errors=True)


def sweep_stop_file() -> Path | None:
    """In a sweep's job: the file whose existence says the sweep was stopped."""
    path = os.environ.get(SWEEP_STOP_ENV)
    return Path(path) if path else None


def sweep_stopped() -> bool:
    """In a sweep's job: has the sweep been stopped?"""
    path = sweep_stop_file()
    return path is not None and path.exists()


def ignore_sigint_between_jobs() -> None:
    """In a launcher's worker process (joblib's loky workers): an idle worker that gets a
    terminal's Ctrl-C would die and break the pool; a job's StopOnSignal catches SIGINT
    while it runs and puts this back after."""
    driver = os.environ.get(SWEEP_DRIVER_ENV)
    in_worker = driver is not None and int(driver) != os.getpid()
    if in_worker and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_sweep() -> None:
    """In a sweep's job that was interrupted: the jobs after it do not start."""
    path = sweep_stop_file()
    if path is not None and path.parent.is_dir():
        path.touch()


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
    from the config it was trained with. None: a sweep's job that never started."""
    steps = cfg.trainer.steps
    if not checkpoint.is_file():
        if never_started(checkpoint.parent):
            return None  # a sweep stopped before this job began: it starts from step 0
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
    """A job that a stopped sweep never started (its summary.json says so)."""
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return False
    return summary.get("status") == "interrupted" and summary.get("error") == NOT_STARTED
