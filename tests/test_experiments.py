"""Every experiment preset composes, and so does every job of its sweep; each has its page
under docs/experiments/ with the command and a table from a real run. The arms of the
presets whose sweep is not a grid (configs/arm/) select what their names say."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT, composed, describe, load_summary, run_cli
from gradexp.cli import CONFIG_DIR
from gradexp.config import to_config
from gradexp.data import DataSpec
from gradexp.init import init_weights
from gradexp.models import create_model
from gradexp.report import load_runs, table_columns

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
ARMS = sorted(p.stem for p in (Path(CONFIG_DIR) / "arm").glob("*.yaml"))


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
        "rnn_adding",
        "nfnet_agc",
    }


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_job_of_the_experiment_composes(name: str):
    params = sweep_params(name)
    assert params, f"experiment={name} sweeps nothing"
    jobs = [
        [f"experiment={name}", *(f"{k}={v}" for k, v in zip(params, values))]
        for values in itertools.product(*params.values())
    ]
    assert 2 <= len(jobs) <= 60, "a preset finishes in minutes on 2 cores"
    seeds = params.get("seed", [])
    assert len(seeds) >= 3, f"experiment={name} sweeps seeds {seeds}: results across >= 3 seeds"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for overrides in jobs:
            cfg = to_config(compose("config", overrides=overrides))  # validated
            for key, value in (o.split("=", 1) for o in overrides[1:]):
                if key == "arm":  # sets several groups: see test_the_arms_of_*
                    continue
                if "." in key:  # a value, e.g. model.depth=30
                    node = cfg
                    for part in key.split("."):
                        node = getattr(node, part)
                    assert str(node) == value, (overrides, key)
                elif key == "seed":  # a top-level value
                    assert str(cfg.seed) == value, (overrides, key)
                else:  # a group, e.g. activation=relu
                    assert getattr(cfg, key).name == value, (overrides, key)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_has_its_page(name: str):
    page = REPO_ROOT / "docs" / "experiments" / f"{name}.md"
    assert page.is_file(), page
    text = page.read_text()
    assert f"gradexp train -m experiment={name}" in text
    # the measured block scripts/reproduce.py writes (tests/test_reproduce.py checks it)
    assert text.count("<!-- reproduce:begin -->") == 1
    assert text.count("<!-- reproduce:end -->") == 1


def test_an_experiment_sweeps_for_real(tmp_path: Path):
    """The smallest preset, shortened: one job per combination, named by what varies."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["train", "-m", "experiment=batchnorm", "trainer.steps=4", "data.n_train=256",
         "data.n_test=64", "model.depth=3", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    jobs = sorted(
        (p.name for p in sweep.iterdir() if p.is_dir()), key=lambda n: int(n.split("_")[0])
    )
    grid = itertools.product(("none", "batch"), ("4", "128"), ("0", "1", "2"))
    assert jobs == [
        f"{i}_norm={norm},seed={seed},trainer.batch_size={batch}"
        for i, (norm, batch, seed) in enumerate(grid)
    ]
    for job in jobs:
        assert load_summary(sweep / job)["status"] == "completed"


# --- arms: the non-grid sweeps (configs/arm/) ------------------------------------------------


# Arms no preset sweeps by default, each with the preset it belongs to (its page says so).
OPTIONAL_ARMS = {"gru": "rnn_adding"}  # not in Le et al.'s Figure 2; add it with arm=...,gru


def test_every_arm_is_swept_by_an_experiment():
    swept = {arm for name in EXPERIMENTS for arm in sweep_params(name).get("arm", [])}
    assert swept | set(OPTIONAL_ARMS) == set(ARMS)
    for arm, preset in OPTIONAL_ARMS.items():
        assert f"arm={arm}" in (REPO_ROOT / "docs" / "experiments" / f"{preset}.md").read_text()
        composed(f"experiment={preset}", f"arm={arm}")


@pytest.mark.parametrize("arm", ARMS)
def test_an_arm_composes_on_its_own(arm: str):
    composed(f"arm={arm}")  # validated; `gradexp train arm=irnn` is model=irnn


def test_an_unknown_arm_is_one_line(tmp_path: Path):
    proc = run_cli(["train", "arm=foo"], cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.strip() == (
        f"gradexp: error: arm=foo: unknown option; choose from {', '.join(ARMS)}"
    ), describe(proc)
    assert not (tmp_path / "outputs").exists()


# model.name, activation, W_hh's init, optimizer: what Le et al. 2015 compare on the adding
# problem (SGD), and the small-init nets again with Adam (the adaptive optimizer's rescue).
RNN_ADDING = {
    "tanh_rnn": ("rnn", "tanh", "normal", "sgd"),
    "relu_rnn": ("rnn", "relu", "normal", "sgd"),
    "relu_rnn_small": ("irnn", "relu", "normal", "sgd"),  # the IRNN but W_hh
    "irnn": ("irnn", "relu", "identity", "sgd"),
    "lstm": ("lstm", "tanh", "same", "sgd"),
    "tanh_rnn_adam": ("rnn", "tanh", "normal", "adam"),
    "relu_rnn_small_adam": ("irnn", "relu", "normal", "adam"),
}


def test_rnn_adding_sweeps_its_five_arms():
    assert sweep_params("rnn_adding") == {"arm": list(RNN_ADDING), "seed": ["0", "1", "2"]}


@pytest.mark.parametrize("arm", RNN_ADDING)
def test_the_arms_of_rnn_adding(arm: str):
    cfg = composed("experiment=rnn_adding", f"arm={arm}")
    model, activation, recurrent, optim = RNN_ADDING[arm]
    assert (cfg.model.name, cfg.activation.name, cfg.model.recurrent_init) == RNN_ADDING[arm][:3]
    # the same task and clipping for every arm; the paper's SGD (lr 0.01, clip 1, batch 16)
    # but for the Adam arms
    assert (cfg.data.name, cfg.data.length, cfg.model.hidden_size) == ("adding", 20, 100)
    assert (cfg.clip.name, cfg.clip.max_norm, cfg.trainer.batch_size) == ("norm", 1.0, 16)
    if optim == "sgd":
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.01, 0.9)
    else:
        assert (cfg.optim.name, cfg.optim.lr) == ("adam", 0.01)
    assert (cfg.init.name, cfg.norm.name, cfg.trainer.tbptt) == ("xavier_uniform", "none", 0)

    # and the net it builds: W_hh as the arm says
    torch.manual_seed(0)
    net = create_model(cfg, DataSpec((cfg.data.length, 2), 1, "sequence", regression=True))
    init_weights(net, cfg.init, cfg.activation)
    (layer,) = net.recurrent
    assert type(layer.act).__name__.lower() == activation
    w_hh = layer.cell.weight_hh_l0.detach()
    if recurrent == "normal":  # Le et al.'s small Gaussian: N(0, 0.001^2), 100 x 100
        assert cfg.model.recurrent_std == 0.001
        assert 0.0009 < w_hh.std().item() < 0.0011
    elif recurrent == "identity":
        assert torch.equal(w_hh, torch.eye(cfg.model.hidden_size))
    else:  # the gated cells: Xavier-uniform recurrent weights, not the baselines' noise
        assert w_hh.std().item() > 0.05
    if model == "lstm":
        assert cfg.model.forget_bias == 1.0


# model.name, norm, clip of Brock et al. 2021's comparison.
NFNET_AGC = {
    "nf_resnet": ("nfnet", "none", "none"),
    "nf_resnet_agc": ("nfnet", "none", "agc"),
    "bn_resnet": ("resnet", "batch", "none"),
}


def test_nfnet_agc_sweeps_its_arms_across_seeds():
    assert sweep_params("nfnet_agc") == {"arm": list(NFNET_AGC), "seed": ["0", "1", "2"]}


@pytest.mark.parametrize("arm", NFNET_AGC)
def test_the_arms_of_nfnet_agc(arm: str):
    cfg = composed("experiment=nfnet_agc", f"arm={arm}")
    assert (cfg.model.name, cfg.norm.name, cfg.clip.name) == NFNET_AGC[arm]
    assert (cfg.model.blocks, cfg.model.width, cfg.activation.name) == ([2, 2, 2], 16, "relu")
    # the lr where the unclipped NF-ResNet diverges (docs/experiments/nfnet_agc.md)
    assert (cfg.data.name, cfg.optim.name, cfg.optim.lr) == ("synthetic_images", "sgd", 1.0)
    assert cfg.trainer.batch_size == 128
    if cfg.clip.name == "agc":
        assert (cfg.clip.clipping, cfg.clip.exclude) == (0.01, ["head"])


def test_an_arm_sweep_is_named_by_its_arms(tmp_path: Path):
    """nfnet_agc, shortened (two seeds of three): job directories and report columns name
    the arm and the seed, nothing else of the command line."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["train", "-m", "experiment=nfnet_agc", "trainer.steps=2", "data.n_train=256",
         "data.n_test=64", "model.width=4", "model.blocks=[1,1]", "seed=0,1",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    jobs = [f"arm={a},seed={s}" for a in NFNET_AGC for s in (0, 1)]
    names = sorted((p.name for p in sweep.iterdir() if p.is_dir()), key=lambda n: int(n[0]))
    assert names == [f"{i}_{job}" for i, job in enumerate(jobs)]
    for name in names:
        assert load_summary(sweep / name)["status"] == "completed"
    rows = load_runs([sweep])
    assert table_columns(rows)[:4] == ["run", "arm", "seed", "status"]
    assert [row.overrides["arm"] for row in rows] == [a for a in NFNET_AGC for _ in (0, 1)]
