"""Checkpoints that resume a run bit for bit, and stopping cleanly on SIGINT/SIGTERM.

A checkpoint holds everything the next step depends on: the model, optimizer,
scheduler and gradient-scaler states, the batch generator's and torch's random
states, and the run's own bookkeeping (logged history, non-finite state, dead-unit
tracker). It is written atomically (a temporary file, then a rename), so a kill
during the write leaves the previous one intact.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from gradexp.config import Config, Schedule, flat
from gradexp.errors import ConfigError

CHECKPOINT_FILE = "checkpoint.pt"


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    """The state saved by ``save`` (tensors on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class StopOnSignal:
    """While entered, SIGINT and SIGTERM (what SLURM sends before preemption) set
    ``signum`` instead of interrupting: the loop stops between two steps, so the state
    it saves is consistent. A second SIGINT interrupts at once (KeyboardInterrupt).
    Outside the main thread (a launcher's worker) signals cannot be caught: a no-op.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

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


# What a resumed run may change: how it runs, not what it computes. trainer.steps may
# grow (train on) unless a cosine schedule has fixed the run's length.
RESUME_MAY_CHANGE = (
    "trainer.steps",
    "trainer.resume",
    "trainer.progress",
    "trainer.threads",
    "trainer.device",
    "trainer.checkpoint_every",
    "trainer.figure_every",
)


def resume_state(checkpoint: Path, cfg: Config) -> dict[str, Any]:
    """The checkpoint a resumed run continues from; ConfigError when there is none to
    continue (no checkpoint, or one already at the last step) or when ``cfg`` differs
    from the config it was trained with."""
    steps = cfg.trainer.steps
    if not checkpoint.is_file():
        raise ConfigError(f"trainer.resume=true: no {checkpoint.name} in {checkpoint.parent}")
    state = load(checkpoint)
    saved, now = state.get("config"), flat(cfg)
    if saved is not None:
        may_change = [k for k in RESUME_MAY_CHANGE if cfg.optim.schedule != Schedule.cosine
                      or k != "trainer.steps"]  # fmt: skip
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
