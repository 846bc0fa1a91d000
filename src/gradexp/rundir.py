"""A run directory's files: one name per file, and summary.json written whole.

No torch here: a sweep's driver and ``gradexp report`` use it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"
FIGURE_FILE = "gradient_flow.png"
CHECKPOINT_FILE = "checkpoint.pt"


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (or a
    kill mid-write) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_summary(output_dir: Path, summary: dict[str, Any]) -> None:
    write_text_atomic(Path(output_dir) / SUMMARY_FILE, summary_text(summary))


def minimal_summary(status: str, error: str | None) -> dict[str, Any]:
    """The summary of a run that never reached its loop (failed early, or not started)."""
    return {"status": status, "error": error, "steps": 0, "verdicts": []}


def record_failure(output_dir: Path, exc: BaseException) -> str:
    """Make sure a run that raised has a summary.json saying so; returns the error line.

    A run that got as far as its training loop has written its own (status failed);
    one that failed before (building the model, loading data) gets a minimal one.
    """
    error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    path = Path(output_dir) / SUMMARY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_summary(path.parent, minimal_summary("failed", error))
    return error
