"""Interruption and resumption: SIGINT/SIGTERM stop a run between two steps with a
checkpoint and summary.json (status interrupted); resuming the run dir ends bit for
bit where an uninterrupted run ends (CPU)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import cli_env, describe, gradexp_command, load_summary, run_cli, scalar_series

# rrelu draws from torch's global RNG every training step, momentum SGD keeps a state:
# both must come back exactly. Fast enough that 4000 steps take a few seconds.
CONFIG = (
    "model.depth=3",
    "model.width=8",
    "activation=rrelu",
    "data.n_train=256",
    "data.n_test=64",
    "trainer.steps=4000",
    "trainer.progress=off",
    "trainer.figure_every=0",
)
MACHINE_DEPENDENT = ("wall_time_s", "steps_per_s")


def tensorboard_series(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """A tag read from every event file of the run dir, as TensorBoard shows it."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return scalar_series(acc, tag)


def interrupt(run_dir: Path, signum: int) -> subprocess.CompletedProcess[str]:
    """Start the run, send ``signum`` once it is training, wait for it to stop."""
    args = [*gradexp_command(), "train", *CONFIG, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        args, cwd=run_dir.parent, env=cli_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = run_dir / "train.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.exists() and "start:" in log.read_text()):
        time.sleep(0.1)
    time.sleep(0.5)  # into the training loop
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("whole")
    proc = run_cli(["train", *CONFIG, f"hydra.run.dir={root / 'run'}"], cwd=root)
    assert proc.returncode == 0, describe(proc)
    return root / "run"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_run_resumes_bit_identical(tmp_path: Path, uninterrupted: Path, signum):
    run_dir = tmp_path / "run"
    stopped = interrupt(run_dir, signum)
    assert stopped.returncode == 130, describe(stopped)
    assert "Traceback" not in stopped.stderr
    summary = load_summary(run_dir)
    assert summary["status"] == "interrupted"
    assert 0 < summary["steps"] < 4000, "the signal must land inside the training loop"
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["step"] == summary["steps"]

    proc = run_cli(["train", *CONFIG, f"hydra.run.dir={run_dir}", "trainer.resume=true"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    resumed, whole = load_summary(run_dir), load_summary(uninterrupted)
    assert resumed["status"] == "completed" and resumed["steps"] == 4000
    for key in whole:
        if key not in MACHINE_DEPENDENT:
            assert resumed[key] == whole[key], key  # exact: floats compared as written
    a = torch.load(uninterrupted / "checkpoint.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    for name in ("optimizer", "batches", "torch_rng"):
        assert str(a[name]) == str(b[name]), name
    # TensorBoard: one series without the steps logged twice, equal to the whole run's
    assert tensorboard_series(run_dir, "loss/train") == tensorboard_series(
        uninterrupted, "loss/train"
    )


def test_checkpoints_every_n_steps(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [*CONFIG[:-3], "trainer.steps=30", "trainer.checkpoint_every=20"]
    proc = run_cli(["train", *overrides, f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 30


def test_resume_errors_are_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(["train", *CONFIG, f"hydra.run.dir={run_dir}", "trainer.resume=true"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    assert (
        proc.stderr.strip() == f"gradexp: error: trainer.resume=true: no checkpoint.pt in {run_dir}"
    )
    short = ["model.depth=3", "model.width=8", "trainer.steps=3", "trainer.progress=off"]
    assert run_cli(["train", *short, f"hydra.run.dir={run_dir}"], tmp_path).returncode == 0
    proc = run_cli(["train", *short, f"hydra.run.dir={run_dir}", "trainer.resume=true"], tmp_path)
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr, describe(proc)
    assert len(proc.stderr.strip().splitlines()) == 1
