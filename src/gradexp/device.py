"""Where a run computes and writes: device selection and the writability check.

preflight uses these before any job starts, without importing the trainer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gradexp.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """``trainer.device`` as a torch device; ConfigError for a GPU that is not here."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.device={name}: CUDA is not available here; choose from auto, cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"trainer.device={name}: no such GPU; choose from "
                + ", ".join(f"cuda:{i}" for i in range(torch.cuda.device_count()))
            )
    return device


def check_writable(output_dir: Path) -> None:
    """ConfigError (one line) when ``output_dir`` cannot be created or written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise ConfigError(f"output dir {output_dir}: cannot be written ({e.strerror})") from None
