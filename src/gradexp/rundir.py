"""A run directory: one name per file, every result written whole, one run at a time.

- Every result file (summary.json, the figure, the checkpoint) is written to a temporary
  file beside it and renamed: a reader, a crash or a full disk leaves the old file or the
  new one, never half of one.
- A run holds an exclusive lock on its directory for its lifetime (``claim``): a second
  process is refused in one line naming the holder. The lock is an ``flock`` on
  ``.gradexp.lock``, so the kernel releases it when its process ends, however it ends: a
  killed run leaves no stale lock to clean up.

No torch here: a sweep's driver and ``gradexp report`` use it.
"""

from __future__ import annotations

import datetime
import errno
import json
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gradexp.errors import ConfigError, RunError

SUMMARY_FILE = "summary.json"
FIGURE_FILE = "gradient_flow.png"
CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = ".gradexp.lock"
# A filesystem full (or over its quota): the run stops and says so in one line.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def json_safe(obj: Any) -> Any:
    """NaN and infinities as null: summary.json must be strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def summary_text(summary: dict[str, Any]) -> str:
    """summary.json's text: strict JSON, indented."""
    return json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n"


def temporary(path: Path) -> Path:
    """The temporary file ``path`` is written through."""
    return path.with_name(f".{path.name}.tmp")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: a reader (or a
    kill or a full disk mid-write) sees the old file or the new one, never half of one.
    The temporary file is gone afterwards, whatever happened."""
    tmp = temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


# Space a run holds back for its summary from its start (RESERVE_FILE, written with real
# bytes so the filesystem allocates them): when the disk fills, it is freed first, so the
# summary saying so fits however full the events left the disk.
RESERVE_FILE = ".gradexp.reserve"
RESERVE_BYTES = 256 << 10


def reserve_space(run_dir: Path) -> None:
    """Hold RESERVE_BYTES in ``run_dir`` (OSError: not even that much is free)."""
    path = Path(run_dir) / RESERVE_FILE
    try:
        with open(path, "wb") as f:
            f.write(bytes(RESERVE_BYTES))
    except OSError:
        path.unlink(missing_ok=True)
        raise


def free_reserve(run_dir: Path) -> None:
    """Give the held-back space to what comes next (the summary), or at the run's end."""
    (Path(run_dir) / RESERVE_FILE).unlink(missing_ok=True)


def disk_full(exc: BaseException) -> bool:
    """An error that says the filesystem is full (or the user's quota is spent)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def disk_full_error(run_dir: Path, what: str) -> RunError:
    """The one line a run that ran out of space ends with."""
    return RunError(
        f"no space left on device ({what}) in {run_dir}; the last checkpoint is kept:"
        f" free some space, then `gradexp resume {run_dir}`"
    )


def write_summary(output_dir: Path, summary: dict[str, Any]) -> None:
    write_text_atomic(Path(output_dir) / SUMMARY_FILE, summary_text(summary))


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json, or None when there is none to read (missing, truncated,
    not a summary)."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def minimal_summary(status: str, error: str | None) -> dict[str, Any]:
    """The summary of a run that never reached its loop (failed early, or not started)."""
    return {"status": status, "error": error, "steps": 0, "verdicts": []}


def holds_run(run_dir: Path) -> str | None:
    """What of a run ``run_dir`` already holds (its summary's status, or "a checkpoint",
    or "a run's files"), or None for a directory no run has used."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    if summary is not None:
        return f"a {summary.get('status', 'finished')} run ({summary.get('steps', '?')} steps)"
    if (run_dir / CHECKPOINT_FILE).exists():
        return "an interrupted run (checkpoint.pt)"
    if any(run_dir.glob("events.out.tfevents.*")):
        return "a run that saved no checkpoint"
    return None


class RunDirBusy(ConfigError):
    """Another process holds the run directory."""


# The locks this process holds: path -> open file (the flock lives as long as it does).
_held: dict[Path, Any] = {}


def _busy_error(run_dir: Path, holder: str) -> RunDirBusy:
    return RunDirBusy(
        f"{run_dir}: in use by another gradexp run ({holder or 'another process'}); wait for"
        " it to end, or choose another hydra.run.dir"
    )


def check_free(run_dir: Path) -> None:
    """RunDirBusy (one line naming the holder) when another process holds ``run_dir``;
    creates nothing. (A check, not a claim: ``claim`` takes the lock.)"""
    import fcntl

    run_dir = Path(run_dir).absolute()
    if run_dir in _held:
        return
    try:
        f = open(run_dir / LOCK_FILE)  # noqa: SIM115 (closed below, on every path)
    except OSError:
        return  # no lock file: no run has held it
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise _busy_error(run_dir, f.read().strip()) from None


def claim(run_dir: Path, resume: bool) -> bool:
    """Lock ``run_dir`` for this process (until ``release`` or the process ends) and make
    sure it may be written: ConfigError (one line) when another process holds it, or when
    it already holds a run and this is not a resume. True if this call took the lock,
    False if this process held it already."""
    import fcntl

    run_dir = Path(run_dir).absolute()
    if run_dir in _held:
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 (held open: the lock lives with it)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise _busy_error(run_dir, holder) from None
    if not resume and (held := holds_run(run_dir)):
        f.close()
        raise ConfigError(
            f"{run_dir} already holds {held}: continue it with `gradexp resume {run_dir}`"
            " (trainer.steps=N to train a finished run on), or choose another"
            " hydra.run.dir"
        )
    f.seek(0)
    f.truncate()
    since = datetime.datetime.now().isoformat(timespec="seconds")
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n")
    f.flush()
    _held[run_dir] = f
    return True


def release(run_dir: Path) -> None:
    """Give up this process's lock on ``run_dir`` (the file stays: removing it would let
    two processes lock two different files of the same name)."""
    f = _held.pop(Path(run_dir).absolute(), None)
    if f is not None:
        f.close()  # closing the last descriptor releases the flock


@contextmanager
def claimed(run_dir: Path, resume: bool) -> Iterator[None]:
    """``claim`` for a block: released at its end if this block took it."""
    took = claim(run_dir, resume)
    try:
        yield
    finally:
        if took:
            release(run_dir)


def record_failure(output_dir: Path, exc: BaseException) -> str:
    """Make sure a run that raised has a summary.json saying so; returns the error line.

    A run that got as far as its training loop has written its own (status failed);
    one that failed before (building the model, loading data) gets a minimal one.
    """
    # RunError's message is the whole story; anything else is named by its type.
    error = str(exc) if isinstance(exc, RunError) else f"{type(exc).__name__}: {exc}"
    error = error.splitlines()[0] if error.strip() else type(exc).__name__
    path = Path(output_dir) / SUMMARY_FILE
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_summary(path.parent, minimal_summary("failed", error))
        except OSError as e:
            if not disk_full(e):
                raise  # a full disk leaves no room even for this: the error line says it
    return error
