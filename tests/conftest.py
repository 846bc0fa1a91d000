"""Shared helpers for the tests: run the ``gradexp`` CLI in a subprocess, read a run back.

A run's outputs are read the way a user reads them: summary.json as JSON, the event
file through TensorBoard's own EventAccumulator.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# A configuration that trains in well under a second once torch is imported: log steps
# 0, 2, 4, 5; hist/eval every 3 steps (0, 3) and the last step (5).
TINY: tuple[str, ...] = (
    "model.depth=3",
    "model.width=8",
    "trainer.steps=6",
    "trainer.log_every=2",
    "trainer.hist_every=3",
    "trainer.eval_every=3",
    "data.n_train=256",
    "data.n_test=64",
)
TINY_DEPTH = 3


def layer_tags(depth: int) -> list[str]:
    """The TensorBoard tag suffix of each layer of an MLP of this depth, input to output."""
    width = max(2, len(str(depth)))
    return [f"{i:0{width}d}_hidden.{i}" for i in range(depth)] + [f"{depth:0{width}d}_head"]


def gradexp_command() -> list[str]:
    """The console script of the interpreter running the tests, else ``python -m gradexp``."""
    bindir = Path(sys.executable).parent
    script = bindir / "gradexp"
    if script.is_file():
        return [str(script)]
    found = shutil.which("gradexp", path=str(bindir))  # gradexp.exe on Windows
    if found:
        return [found]
    return [sys.executable, "-m", "gradexp"]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # One torch thread: these models are tiny, and two runs (or this suite and another
    # process) competing for 2 cores with spinning OpenMP threads run ~10x slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("HYDRA_FULL_ERROR", None)  # would turn one-line errors into tracebacks
    # This interpreter's scripts first: Hydra's completion script finds `gradexp` on PATH,
    # also when the suite runs from a virtualenv that is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def run_cli(
    args: Sequence[str],
    cwd: Path,
    *,
    env: dict[str, str] | None = None,
    command: Sequence[str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run ``gradexp ARGS`` in ``cwd``; stdout and stderr captured as text."""
    return subprocess.run(
        [*(command or gradexp_command()), *args],
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    """What to print when an assertion on a CLI run fails."""
    return (
        f"exit {proc.returncode}: {' '.join(map(str, proc.args))}\n"
        f"--- stdout (tail) ---\n{proc.stdout[-3000:]}\n"
        f"--- stderr (tail) ---\n{proc.stderr[-3000:]}"
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_summary(run_dir: Path, *, strict: bool = True) -> dict[str, Any]:
    """summary.json; ``strict`` rejects NaN/Infinity, which strict JSON parsers refuse."""
    text = (Path(run_dir) / "summary.json").read_text()
    if strict:
        return json.loads(text, parse_constant=_reject_constant)
    return json.loads(text)


def event_file(run_dir: Path) -> Path:
    """The run's one TensorBoard event file (a second one would be a stray sub-run)."""
    files = sorted(Path(run_dir).glob("events.out.tfevents.*"))
    assert len(files) == 1, f"expected one event file in {run_dir}, found {files}"
    return files[0]


def load_events(run_dir: Path) -> Any:
    """The run's event file, read back completely by TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(
        str(event_file(run_dir)), size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE}
    )
    acc.Reload()
    return acc


def scalar_series(acc: Any, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@dataclass
class Run:
    """One finished CLI run and its output directory."""

    proc: subprocess.CompletedProcess[str]
    dir: Path
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def ok(self) -> Run:
        assert self.proc.returncode == 0, describe(self.proc)
        return self

    @property
    def summary(self) -> dict[str, Any]:
        if "summary" not in self._cache:
            self._cache["summary"] = load_summary(self.dir, strict=False)
        return self._cache["summary"]

    @property
    def events(self) -> Any:
        if "events" not in self._cache:
            self._cache["events"] = load_events(self.dir)
        return self._cache["events"]


def train(root: Path, *args: str, run_dir: Path | None = None, **kwargs: Any) -> Run:
    """``gradexp train ARGS hydra.run.dir=...`` with cwd ``root``."""
    run_dir = run_dir or root / "run"
    proc = run_cli(["train", *args, f"hydra.run.dir={run_dir}"], cwd=root, **kwargs)
    return Run(proc, run_dir)


@functools.cache
def composed(*overrides: str) -> Any:
    """The typed, validated Config for these overrides, as the CLI composes it (cached)."""
    from hydra import compose, initialize_config_dir

    from gradexp.cli import CONFIG_DIR
    from gradexp.config import to_config

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return to_config(cfg)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread, as the trainer's default (trainer.threads=1): the test nets are
    tiny, and with two, OpenMP threads spinning against a process beside us make them
    ~10x slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``cli(args, cwd)``: run ``gradexp ARGS`` in a subprocess; a CompletedProcess."""
    return run_cli


@pytest.fixture
def tiny() -> list[str]:
    """Overrides for a run of a few seconds, most of them Python and torch start-up."""
    return list(TINY)


@pytest.fixture(scope="session")
def read_events() -> Callable[[Path], Any]:
    """``read_events(run_dir)``: the run's EventAccumulator, fully loaded."""
    return load_events
