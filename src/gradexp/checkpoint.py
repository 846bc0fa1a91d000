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
