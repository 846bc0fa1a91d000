"""Sweeps through Hydra's launcher plugins, for real: joblib (parallel local jobs) and
submitit_local (the SLURM launcher's path on one machine); a plugin that is missing
fails in one line naming the extra that installs it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import TINY, describe, load_summary, run_cli


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_sweep_runs_through_the_launcher(tmp_path: Path, launcher: str) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "train",
            "-m",
            f"hydra/launcher={launcher}",
            *TINY,
            "init=normal,lecun_normal",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [j.name.split("_", 1)[0] for j in jobs] == ["0", "1"]
    for job, init in zip(jobs, ("normal", "lecun_normal")):
        assert f"init={init}" in job.name
        summary = load_summary(job)
        assert summary["status"] == "completed" and summary["steps"] == 6
        assert summary["verdicts"]


@pytest.mark.parametrize(
    ("override", "module", "extra"),
    [
        ("hydra/launcher=ray", "hydra_plugins.hydra_ray_launcher", "ray"),
        ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "optuna"),
    ],
)
def test_a_missing_plugin_names_its_extra(tmp_path: Path, override, module, extra) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    proc = run_cli(["train", "-m", override, *TINY], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"gradexp: error: {override}: its Hydra plugin is not installed;"
        f" pip install 'gradexp[{extra}]'"
    )
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()
