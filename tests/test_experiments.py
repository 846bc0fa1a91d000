"""Every experiment preset composes, and so does every job of its sweep; each has its page
under docs/experiments/ with the command and a table from a real run."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT, describe, load_summary, run_cli
from gradexp.cli import CONFIG_DIR
from gradexp.config import to_config

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def sweep_params(name: str) -> dict[str, list[str]]:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    return {key: str(value).split(",") for key, value in params.items()}


def test_the_presets_are_there():
    assert set(EXPERIMENTS) >= {
        "saturation",
        "init_depth",
        "batchnorm",
        "rnn_clipping",
        "residual",
        "dying_relu",
        "truncated_bptt",
    }


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_job_of_the_experiment_composes(name: str):
    params = sweep_params(name)
    assert params, f"experiment={name} sweeps nothing"
    jobs = [
        [f"experiment={name}", *(f"{k}={v}" for k, v in zip(params, values))]
        for values in itertools.product(*params.values())
    ]
    assert 2 <= len(jobs) <= 12, "a preset finishes in a few minutes on 2 cores"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for overrides in jobs:
            cfg = to_config(compose("config", overrides=overrides))  # validated
            for key, value in (o.split("=", 1) for o in overrides[1:]):
                if "." in key:  # a value, e.g. model.depth=30
                    node = cfg
                    for part in key.split("."):
                        node = getattr(node, part)
                    assert str(node) == value, (overrides, key)
                else:  # a group, e.g. activation=relu
                    assert getattr(cfg, key).name == value, (overrides, key)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_has_its_page(name: str):
    page = REPO_ROOT / "docs" / "experiments" / f"{name}.md"
    assert page.is_file(), page
    text = page.read_text()
    assert f"gradexp train -m experiment={name}" in text
    assert "| run |" in text  # the table gradexp report printed


def test_an_experiment_sweeps_for_real(tmp_path: Path):
    """The smallest preset, shortened: one job per combination, named by what varies."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["train", "-m", "experiment=batchnorm", "trainer.steps=4", "data.n_train=256",
         "data.n_test=64", "model.depth=3", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == [
        "0_norm=none,trainer.batch_size=4",
        "1_norm=none,trainer.batch_size=128",
        "2_norm=batch,trainer.batch_size=4",
        "3_norm=batch,trainer.batch_size=128",
    ]
    for job in jobs:
        assert load_summary(sweep / job)["status"] == "completed"
