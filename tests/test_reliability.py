"""Nothing lost and nothing misleading: what a run does when used the wrong way, or when
the machine fails it. Each case asserts the exit code, the one line on stderr, and that
nothing already written was lost or changed (README.md, "Reliability", lists them).

The full-disk cases mount a small tmpfs, which needs root (CI runs as root); elsewhere
they are skipped with the reason.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TINY, cli_env, describe, gradexp_command, load_summary, run_cli

# A run long enough to be caught running (thousands of tiny steps), stopped by the test.
LONG = (*TINY, "trainer.steps=1000000", "trainer.progress=off")


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root``: its path and a hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_line(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """The command exited ``code`` with exactly one line on stderr holding ``fragments``."""
    assert proc.returncode == code, describe(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, describe(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradexp: error: "), describe(proc)
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def start(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*gradexp_command(), *args],
        cwd=cwd,
        env=cli_env(),
        stdout=kwargs.pop("stdout", subprocess.DEVNULL),
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def holds_lock(run_dir: Path, proc: subprocess.Popen[str]) -> bool:
    lock = run_dir / ".gradexp.lock"
    return lock.is_file() and f"pid {proc.pid} " in lock.read_text()


def checkpoint_step(run_dir: Path) -> int:
    import torch

    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["step"]


# --- a run dir belongs to one run ------------------------------------------------------


def test_a_running_run_dir_refuses_a_second_run_and_a_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = start(["train", *LONG, f"hydra.run.dir={run}"], tmp_path)
    try:
        wait_for(lambda: holds_lock(run, first) and any(run.glob("events.*")), "the first run")
        overrides = (run / ".hydra" / "overrides.yaml").read_bytes()
        # Another run (other overrides, so a rewrite would show) and a resume: refused.
        second = run_cli(["train", *LONG, "seed=1", f"hydra.run.dir={run}"], tmp_path)
        one_line(second, 2, str(run), "in use by another gradexp run", f"pid {first.pid} ")
        resumed = run_cli(["resume", str(run)], tmp_path)
        one_line(resumed, 2, "in use by another gradexp run", f"pid {first.pid} ")
        assert (run / ".hydra" / "overrides.yaml").read_bytes() == overrides
        assert len(list(run.glob("events.*"))) == 1
    finally:
        first.send_signal(signal.SIGTERM)  # stops between two steps, with its checkpoint
        first.wait(timeout=120)
    assert first.returncode == 130, first.stderr.read()
    assert load_summary(run)["status"] == "interrupted"
    step = checkpoint_step(run)
    # The lock went with its process: the run resumes and trains on.
    proc = run_cli(["resume", str(run), f"trainer.steps={step + 4}"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert load_summary(run)["steps"] == step + 4


def test_a_killed_run_leaves_no_lock_behind(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start(["train", *LONG, "trainer.checkpoint_every=20", f"hydra.run.dir={run}"], tmp_path)
    try:
        wait_for(lambda: (run / "checkpoint.pt").is_file(), "a periodic checkpoint")
    finally:
        proc.kill()  # kill -9: no handler runs, the kernel drops the flock
        proc.wait()
    step = checkpoint_step(run)
    resumed = run_cli(["resume", str(run), f"trainer.steps={step + 4}"], tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    assert load_summary(run)["status"] == "completed"


def test_train_into_a_finished_run_dir_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli(["train", *TINY, f"hydra.run.dir={run}"], tmp_path).returncode == 0
    before = snapshot(run)
    proc = run_cli(["train", *TINY, "seed=3", f"hydra.run.dir={run}"], tmp_path)
    one_line(proc, 2, "already holds a completed run (6 steps)", f"gradexp resume {run}")
    assert snapshot(run) == before


def test_a_sweep_into_another_sweeps_dir_is_refused(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["train", "-m", *TINY, "model.width=7,8", f"hydra.sweep.dir={sweep}"]
    assert run_cli(args, tmp_path).returncode == 0
    before = snapshot(sweep)
    # Same job names (0_model.width=7, ...), another shared config: it would rewrite them.
    proc = run_cli([*args, "model.depth=2"], tmp_path)
    one_line(proc, 2, f"hydra.sweep.dir={sweep} already holds 2 job(s)", "gradexp resume")
    assert snapshot(sweep) == before


# --- a full disk ----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[callable]:
    """``mount(size)``: a tmpfs of that size at tmp_path/disk (remounted on a second call)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = False

    def mount(size: str) -> Path:
        nonlocal mounted
        options = f"{'remount,' if mounted else ''}size={size}"
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted = True
        return disk

    yield mount
    if mounted:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_stops_the_run_and_keeps_its_checkpoint(tmp_path: Path, small_disk) -> None:
    run = small_disk("1200k") / "run"
    # Statistics and histograms every step: the events fill 1.2 MB within ~30 steps.
    args = [
        "trainer.steps=200",
        "trainer.log_every=1",
        "trainer.hist_every=1",
        "trainer.checkpoint_every=10",
        "trainer.progress=off",
    ]
    proc = run_cli(["train", *args, f"hydra.run.dir={run}"], tmp_path)
    one_line(proc, 1, "no space left on device", f"gradexp resume {run}")
    summary = load_summary(run)
    assert summary["status"] == "failed" and "no space left on device" in summary["error"]
    step = checkpoint_step(run)  # the last good one: whole, loadable
    assert 0 < step < 200 and step % 10 == 0
    assert not list(run.glob(".*.tmp")), "temporaries left behind"
    # Space freed: the run resumes from its checkpoint and finishes.
    small_disk("64m")
    proc = run_cli(["resume", str(run)], tmp_path)
    assert proc.returncode == 0, describe(proc)
    summary = load_summary(run)
    assert summary["status"] == "completed" and summary["steps"] == 200


def test_a_disk_too_small_for_a_run_is_refused_before_anything(tmp_path: Path, small_disk) -> None:
    disk = small_disk("300k")
    proc = run_cli(["train", *TINY, f"hydra.run.dir={disk / 'run'}"], tmp_path)
    one_line(proc, 2, "KiB free on its filesystem", "free some space")
    assert not list(disk.iterdir())


# --- output that cannot kill a run ------------------------------------------------------


def test_a_closed_stdout_ends_the_printing_not_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*TINY, "trainer.steps=300", "trainer.progress=plain", f"hydra.run.dir={run}"]
    proc = start(["train", *args], tmp_path, stdout=subprocess.PIPE)
    assert proc.stdout.readline().startswith("step 1/300")
    proc.stdout.close()  # `| head -1`: the reader is gone
    proc.wait(timeout=300)
    stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    summary = load_summary(run)
    assert summary["status"] == "completed" and summary["steps"] == 300
    assert checkpoint_step(run) == 300


# --- one line for every bad value, before anything runs ---------------------------------

LONG_NAME = "a" * 5000
BAD_VALUES = {
    "a float key given 400 digits": (
        [f"optim.lr=1{'0' * 400}"],
        ["optim.lr=1000", "(410 characters)", "too large for a float"],
    ),
    "a model torch cannot address": (
        ["model.width=2147483647"],
        ["model.width=2147483647", "more elements than torch can address"],
    ),
    "unknown module in clip.exclude": (
        ["clip=agc", "clip.exclude=[nonexistent]"],
        ["clip.exclude=[nonexistent]", "hidden, head"],
    ),
    "model too large for the machine": (
        ["model.width=100000", "model.depth=100"],
        ["model.width=100000 model.depth=100", "TiB", "free; choose a smaller model"],
    ),
    "5000-character job name": (
        [f"hydra.job.name={LONG_NAME}"],
        ["hydra.job.name=aaa", "(5000 characters)", "too long for a file name"],
    ),
    "unquoted unicode path": (
        ["hydra.run.dir=runs/ü"],
        ["Hydra cannot read this value unquoted", """'hydra.run.dir="runs/ü"'"""],
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_a_bad_value_fails_in_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    overrides, fragments = BAD_VALUES[case]
    given = any(o.startswith("hydra.run.dir=") for o in overrides)
    run_dir = [] if given else [f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_cli(["train", *TINY, *overrides, *run_dir], tmp_path)
    line = one_line(proc, 2, *fragments)
    assert len(line) < 400, line
    assert not list(tmp_path.iterdir()), "a refused run left files behind"


def test_a_model_too_large_fails_the_same_in_a_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["train", "-m", *TINY, "model.width=8,100000", "model.depth=100"]
    proc = run_cli([*args, f"hydra.sweep.dir={sweep}"], tmp_path)
    one_line(proc, 2, "model.width=100000 model.depth=100", "free; choose a smaller model")
    assert not sweep.exists()


def test_a_truncated_checkpoint_fails_resume_in_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli(["train", *TINY, f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    checkpoint = run / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    before = snapshot(run)
    proc = run_cli(["resume", str(run), "trainer.steps=8"], tmp_path)
    one_line(proc, 2, str(checkpoint), "truncated or corrupt")
    assert snapshot(run) == before


def test_a_corrupt_summary_is_a_row_of_the_report(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for name in ("good", "bad"):
        assert run_cli(["train", *TINY, f"hydra.run.dir={runs / name}"], tmp_path).returncode == 0
    (runs / "bad" / "summary.json").write_text('{"status": "compl')  # a half-written file
    before = snapshot(runs)
    proc = run_cli(["report", str(runs)], tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "corrupt summary" in proc.stdout and "completed" in proc.stdout
    assert snapshot(runs) == before


# Every numeric key has a stated range (config.Range); the ones a user found open.
OUT_OF_RANGE = [
    pytest.param(
        ["optim.momentum=-1"], "optim.momentum=-1.0: must be in [0, 1)", id="momentum-neg"
    ),
    pytest.param(["optim.momentum=2"], "optim.momentum=2.0: must be in [0, 1)", id="momentum-2"),
    pytest.param(["optim.lr=inf"], "optim.lr=inf: must be > 0 and finite", id="lr-inf"),
    pytest.param(["optim.lr=nan"], "optim.lr=nan: must be > 0 and finite", id="lr-nan"),
    pytest.param(
        [f"seed={'9' * 400}"],
        ": must be >= -9223372036854775808 and <= 18446744073709551615",
        id="seed-400-digits",
    ),
    pytest.param(
        ["trainer.steps=100000000000000000000"],
        "trainer.steps=100000000000000000000: must be > 0 and <= 1000000000",
        id="steps-huge",
    ),
    pytest.param(
        ["norm=batch", "norm.momentum=1.5"],
        "norm.momentum=1.5: must be in [0, 1]",
        id="batchnorm-momentum",
    ),
    pytest.param(
        ["optim=adam", "optim.beta2=1"], "optim.beta2=1.0: must be in [0, 1)", id="adam-beta2"
    ),
    pytest.param(
        ["data.seed=-9223372036854775809"],
        "data.seed=-9223372036854775809: must be >= -9223372036854775808 and"
        " <= 18446744073709551615",
        id="data-seed",
    ),
    pytest.param(
        ["objective.penalty=-inf"], "objective.penalty=-inf: must be finite", id="penalty-inf"
    ),
]


@pytest.mark.parametrize(("bad", "message"), OUT_OF_RANGE)
def test_a_value_out_of_range_fails_in_one_line_before_any_run(
    tmp_path: Path, bad: list[str], message: str
) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(["train", *TINY, f"hydra.run.dir={run_dir}", *bad], cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, describe(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradexp: error: "), describe(proc)
    key = bad[-1].split("=", 1)[0]
    if key == "seed":  # the value's 400 digits may be cut short in the line
        assert lines[0].startswith("gradexp: error: seed=9999") and lines[0].endswith(message)
    else:
        assert lines[0] == f"gradexp: error: {message}"
    assert not run_dir.exists(), "a rejected command must leave no run directory"


# --- completion and hints -------------------------------------------------------------


def complete(line: str, cwd: Path) -> list[str]:
    """What bash completes at the end of ``line``, through gradexp's installed script."""
    script = f"""
eval "$({" ".join(gradexp_command())} train -sc install=bash)"
COMP_LINE={line!r}
COMP_POINT=${{#COMP_LINE}}
COMP_WORDS=($COMP_LINE)
[[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))
hydra_bash_completion
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    proc = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=cli_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, describe(proc)
    return [w for w in proc.stdout.splitlines() if w]


@pytest.mark.skipif(sys.platform == "win32", reason="bash completion")
def test_completion_of_subcommands_overrides_and_paths(tmp_path: Path) -> None:
    (tmp_path / "outputs").mkdir()
    assert complete("gradexp tr", tmp_path) == ["train"]
    assert complete("gradexp re", tmp_path) == ["resume", "report"]
    assert "model=resnet" in complete("gradexp train model=res", tmp_path)
    # After report and resume, the shell's own path completion (no Hydra parse error).
    assert complete("gradexp report out", tmp_path) == ["outputs"]


def test_an_unknown_launcher_is_named_without_the_sweep_hint(tmp_path: Path) -> None:
    proc = run_cli(["train", "-m", "hydra/launcher=foo", "init=normal,xavier"], tmp_path)
    line = one_line(proc, 2, "hydra/launcher=foo: unknown option", "joblib", "submitit_slurm")
    assert "swept values" not in line
