"""Sweeps through Hydra's plugins, for real: the joblib launcher (parallel local jobs),
submitit_local (the SLURM launcher's path on one machine), Ray (a local Ray instance)
and the Optuna sweeper (it minimizes the runs' objective; a run that diverges returns a
finite penalty); a plugin that is missing fails in one line naming its extra."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY, describe, load_summary, run_cli

# The launcher's own settings, as a user would set them.
LAUNCHERS = {
    "joblib": ["hydra.launcher.n_jobs=2"],
    "submitit_local": [],
    # A local Ray instance of 2 CPUs; each job asks for 1 (configs/hydra/launcher/ray.yaml).
    "ray": ["hydra.launcher.ray.init.num_cpus=2"],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_sweep_runs_through_the_launcher(tmp_path: Path, launcher: str) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "train",
            "-m",
            f"hydra/launcher={launcher}",
            *LAUNCHERS[launcher],
            *TINY,
            "init=normal,lecun_normal",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr
    assert "Warning" not in proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [j.name for j in jobs] == ["0_init=normal", "1_init=lecun_normal"]
    for job in jobs:
        summary = load_summary(job)
        assert summary["status"] == "completed" and summary["steps"] == 6
        assert summary["verdicts"]
    hydra = yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]
    target = hydra["launcher"]["_target_"].split(".")[1]
    if launcher.startswith("submitit"):  # the plugin's launcher, each job waited for alone
        assert target == "gradexp_submitit_launcher"
    else:
        assert target == f"hydra_{launcher}_launcher"
    if launcher == "ray":
        assert hydra["launcher"]["ray"]["init"]["num_cpus"] == 2
        assert hydra["launcher"]["ray"]["remote"] == {"num_cpus": 1, "num_gpus": 0}


def optuna_sweep(tmp_path: Path, *extra: str) -> tuple[list[Path], dict]:
    """Two trials, lr 0.05 (trains) and 1e8 (diverges at step 1), by Optuna's grid sampler."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "train",
            "-m",
            "hydra/sweeper=optuna",
            "hydra/sweeper/sampler=grid",
            "hydra.sweeper.n_trials=2",
            *TINY,
            "activation=relu",
            "init=kaiming_normal",
            "optim.lr=choice(0.05,1e8)",
            *extra,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    # named by what the search varies, not by the keys every trial shares
    assert sorted(j.name.split("_", 1)[1] for j in jobs) == [
        "optim.lr=0.05",
        "optim.lr=100000000.0",
    ]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    return jobs, results


def test_optuna_minimizes_the_final_test_loss(tmp_path: Path) -> None:
    jobs, results = optuna_sweep(tmp_path)
    by_lr = {j.name.split("=", 1)[1]: load_summary(j) for j in jobs}
    assert by_lr["100000000.0"]["status"] == "diverged"
    completed = by_lr["0.05"]
    assert completed["status"] == "completed"
    # The diverged trial's penalty (1e6) loses to the finished run's own test loss.
    assert results["best_params"] == {"optim.lr": 0.05}
    assert results["best_value"] == completed["metrics"]["loss/test"]


def test_optuna_reads_a_diverged_trial_as_its_finite_penalty(tmp_path: Path) -> None:
    # A penalty below any loss makes the diverged trial the best: its value is the penalty.
    _, results = optuna_sweep(tmp_path, "objective.penalty=-5")
    assert results["best_params"] == {"optim.lr": 100000000.0}
    assert results["best_value"] == -5.0


def test_an_optuna_trial_with_a_bad_sample_is_recorded_and_the_search_goes_on(tmp_path: Path):
    # Preflight cannot check a value Optuna has not drawn yet: vanishing_ratio must be < 1.
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["train", "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=random",
         "hydra.sweeper.sampler.seed=0", "hydra.sweeper.n_trials=2", *TINY,
         "diagnose.vanishing_ratio=interval(1.5,2)", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, describe(proc)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    for job in jobs:
        summary = load_summary(job)
        assert summary["status"] == "failed"
        assert "diagnose.vanishing_ratio" in summary["error"]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == 1e6


@pytest.mark.parametrize(
    ("status", "value", "penalty", "maximize", "expected"),
    [
        ("completed", 0.25, None, False, 0.25),
        ("completed", 0.25, None, True, 0.25),
        ("diverged", 0.25, None, False, 1e6),  # its last loss may even be finite
        ("diverged", 0.25, None, True, -1e6),
        ("failed", None, None, False, 1e6),
        ("interrupted", 0.25, None, False, 1e6),
        ("completed", float("nan"), 7.0, False, 7.0),
        ("completed", float("inf"), None, False, 1e6),
        ("completed", None, -2.0, True, -2.0),  # the metric is missing
    ],
)
def test_objective_value(status, value, penalty, maximize, expected) -> None:
    from gradexp.cli import objective_value

    metrics = {} if value is None else {"loss/test": value}
    summary = {"status": status, "metrics": metrics}
    assert objective_value(summary, "loss/test", penalty, maximize) == expected
    assert objective_value(None, "loss/test", penalty, maximize) == (
        penalty if penalty is not None else (-1e6 if maximize else 1e6)
    )


# What a user without the extra sees: the CLI with the plugin's module made invisible.
HIDE_PLUGIN = """
import importlib.util, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == {module!r} else find_spec(name, *a)
from gradexp.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize(
    ("override", "module", "extra"),
    [
        ("hydra/launcher=joblib", "hydra_plugins.hydra_joblib_launcher", "joblib"),
        ("hydra/launcher=submitit_slurm", "hydra_plugins.hydra_submitit_launcher", "submitit"),
        ("hydra/launcher=ray", "hydra_plugins.hydra_ray_launcher", "ray"),
        ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "optuna"),
    ],
)
def test_a_missing_plugin_names_its_extra(tmp_path: Path, override, module, extra) -> None:
    command = [sys.executable, "-c", HIDE_PLUGIN.format(module=module)]
    proc = run_cli(["train", "-m", override, *TINY], cwd=tmp_path, command=command)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    assert proc.stderr.strip() == (
        f"gradexp: error: {override}: its Hydra plugin is not installed;"
        f" pip install 'gradexp[{extra}]'"
    )
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()
