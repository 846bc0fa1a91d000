"""The MLP presets that reproduce a paper (init_depth, dying_relu, batchnorm, residual):
their sweeps (arms x seeds 0-2), their claim modules (scripts/claims/) judging hand-built
runs whose answer is known, and, slow, the mechanism init_depth rests on in real runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT, describe, load_summary, run_cli
from gradexp.cli import CONFIG_DIR
from gradexp.report import RunRow

sys.path.insert(0, str(REPO_ROOT / "scripts"))

from claims import batchnorm, dying_relu, init_depth, residual  # noqa: E402

SEEDS = ["0", "1", "2"]


def sweep_params(name: str) -> dict[str, list[str]]:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


@pytest.mark.parametrize(
    ("name", "arms"),
    [
        ("init_depth", {"init": ["xavier_normal", "kaiming_normal"], "model.width": ["16", "64"]}),
        ("dying_relu", {"activation": ["relu", "leaky_relu", "rrelu", "prelu", "elu"]}),
        ("batchnorm", {"norm": ["none", "batch"], "trainer.batch_size": ["4", "128"]}),
        ("residual", {"model": ["mlp", "resmlp"], "model.depth": ["30", "60"]}),
    ],
)
def test_each_preset_sweeps_its_arms_over_three_seeds(name: str, arms: dict[str, list[str]]):
    assert sweep_params(name) == {**arms, "seed": SEEDS}


def test_residual_compares_both_nets_with_batchnorm():
    from conftest import composed

    for model in ("mlp", "resmlp"):
        cfg = composed("experiment=residual", f"model={model}")
        assert (cfg.norm.name, cfg.activation.name, cfg.init.name) == (
            "batch",
            "relu",
            "kaiming_normal",
        )


# --- the claims, judged on hand-built runs ---------------------------------------------------


def fake_run(
    root: Path,
    overrides: dict[str, str],
    loss: list[float],
    *,
    status: str = "completed",
    metrics: dict[str, float] | None = None,
    layers: list[dict] | None = None,
    extra_scalars: dict[str, list[float]] | None = None,
) -> RunRow:
    """A run dir with an event file of loss/train (and loss/test) every 10 steps."""
    from torch.utils.tensorboard import SummaryWriter

    name = ",".join(f"{k}={v}" for k, v in overrides.items())
    path = root / name
    path.mkdir(parents=True)
    writer = SummaryWriter(str(path))
    for i, value in enumerate(loss):
        writer.add_scalar("loss/train", value, 10 * i)
        writer.add_scalar("loss/test", value, 10 * i)
        for tag, series in (extra_scalars or {}).items():
            writer.add_scalar(tag, series[min(i, len(series) - 1)], 10 * i)
    writer.close()
    summary = {
        "status": status,
        "steps": 10 * len(loss),
        "metrics": {"loss/train": loss[-1], "loss/test": loss[-1], **(metrics or {})},
        "layers": layers or [],
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return RunRow(name, path, dict(overrides), summary, status, None)


LN10 = math.log(10)
PLATEAU = [LN10] * 100
LEARNS = [LN10] * 5 + [1.0] * 95


def layers_bwd(first: float, head: float) -> list[dict]:
    return [
        {"name": "hidden.0", "signal_bwd": {"first": first, "last": first}},
        {"name": "head", "signal_bwd": {"first": head, "last": head}},
    ]


def init_depth_runs(root: Path, xavier_64_learns: bool) -> list[RunRow]:
    runs = []
    for init in ("xavier_normal", "kaiming_normal"):
        for width in ("16", "64"):
            for seed in SEEDS:
                learns = init == "kaiming_normal" or (width == "64" and xavier_64_learns)
                over = {"init": init, "model.width": width, "seed": seed, "data.classes": "10"}
                runs.append(
                    fake_run(root, over, LEARNS if learns else PLATEAU, layers=layers_bwd(1e-5, 1))
                )
    return runs


def test_init_depth_reads_the_step_that_leaves_the_plateau(tmp_path: Path):
    """The mean of 5 logged losses must be below 0.9 ln 10 = 2.07: one low batch is not
    enough, a non-finite loss never counts."""
    run = fake_run(tmp_path, {"init": "x"}, [LN10] * 3 + [1.5] * 5)
    assert init_depth.leave_step(run) == 40  # (3 ln 10 + 2 x 1.5) / 5 = 1.98
    dip = fake_run(tmp_path, {"init": "y"}, [LN10] * 4 + [1.5] + [LN10] * 5)
    assert init_depth.leave_step(dip) is None  # (4 ln 10 + 1.5) / 5 = 2.14
    nan = fake_run(tmp_path, {"init": "z"}, [LN10] * 4 + [float("nan")] + [1.0] * 3)
    assert init_depth.leave_step(nan) is None


def test_init_depth_is_reproduced_only_where_xavier_stalls(tmp_path: Path):
    result = init_depth.evaluate(init_depth_runs(tmp_path / "a", False), tmp_path / "fig")
    assert result.verdict == "reproduced", result
    assert "not within 1000 steps (0/3)" in result.table
    assert result.figures and result.figures[0].is_file()
    result = init_depth.evaluate(init_depth_runs(tmp_path / "b", True), tmp_path / "fig")
    assert result.verdict == "partly", result
    assert "Xavier's stalls at width 64" in result.why.split("Did not hold")[1]


def test_residual_needs_the_plain_net_to_fail_at_depth(tmp_path: Path):
    def runs(root: Path, plain_60_learns: bool) -> list[RunRow]:
        out = []
        for model in ("mlp", "resmlp"):
            for depth in ("30", "60"):
                learns = model == "resmlp" or depth == "30" or plain_60_learns
                for seed in SEEDS:
                    over = {"model": model, "model.depth": depth, "seed": seed}
                    out.append(fake_run(root, over, LEARNS if learns else PLATEAU))
        return out

    assert residual.evaluate(runs(tmp_path / "a", False), tmp_path / "f").verdict == "reproduced"
    assert residual.evaluate(runs(tmp_path / "b", True), tmp_path / "f").verdict == "partly"


def test_dying_relu_counts_dead_units_and_reports_divergence(tmp_path: Path):
    def hidden(dead: float, grad: float) -> list[dict]:
        unit = {"never_recovered": dead, "ever": dead, "recovered": 0.0}
        return [
            {"name": f"hidden.{i}", "dead_units": unit, "grad_norm": {"first": 1, "last": grad}}
            for i in range(4)
        ] + [{"name": "head", "dead_units": None, "grad_norm": {"first": 1, "last": 1}}]

    def runs(root: Path, elu_status: str, elu_grad: float = 0.3) -> list[RunRow]:
        out = []
        for act in ("relu", "leaky_relu", "elu"):
            for seed in SEEDS:
                layers = hidden(0.5, 0.0) if act == "relu" else hidden(0.0, 0.3)
                if act == "elu":
                    layers = hidden(0.0, elu_grad)
                status = elu_status if act == "elu" else "completed"
                series = {"dead_frac/hidden.0": [0.0, 0.5]}
                out.append(
                    fake_run(
                        root,
                        {"activation": act, "seed": seed},
                        LEARNS,
                        status=status,
                        layers=layers,
                        extra_scalars=series,
                    )  # fmt: skip
                )
        return out

    good = dying_relu.evaluate(runs(tmp_path / "a", "completed"), tmp_path / "f")
    assert good.verdict == "reproduced", good
    assert "50%" in good.table
    exploded = dying_relu.evaluate(runs(tmp_path / "b", "diverged"), tmp_path / "f")
    assert exploded.verdict == "reproduced", exploded  # exploding, not dying: reported
    assert "elu kept every unit and a gradient on 3/3 (but blew up on 3/3)" in exploded.result
    starved = dying_relu.evaluate(runs(tmp_path / "c", "completed", 0.0), tmp_path / "f")
    assert starved.verdict == "partly", starved


def test_batchnorm_judges_training_and_small_batch_noise(tmp_path: Path):
    def runs(root: Path, bn4_train_loss: float) -> list[RunRow]:
        out = []
        for norm in ("none", "batch"):
            for batch in ("4", "128"):
                for seed in SEEDS:
                    over = {"norm": norm, "trainer.batch_size": batch, "seed": seed}
                    if norm == "none":
                        out.append(fake_run(root, over, PLATEAU))
                        continue
                    train = bn4_train_loss if batch == "4" else 1.0
                    run = fake_run(root, over, [LN10] * 5 + [train] * 95)
                    run.summary["metrics"]["loss/test"] = 1.0  # eval mode, running stats
                    out.append(run)
        return out

    noisy = batchnorm.evaluate(runs(tmp_path / "a", 1.5), tmp_path / "f")
    assert noisy.verdict == "reproduced", noisy
    quiet = batchnorm.evaluate(runs(tmp_path / "b", 1.0), tmp_path / "f")
    assert quiet.verdict == "partly", quiet


@pytest.mark.parametrize("claim", [init_depth, dying_relu, batchnorm, residual])
def test_a_claim_survives_runs_with_nothing_in_them(tmp_path: Path, claim):
    empty = tmp_path / "empty"
    empty.mkdir()
    row = RunRow("empty", empty, {"seed": "0"}, None, "no summary", "no summary")
    result = claim.evaluate([row], tmp_path / "f")
    assert result.verdict in ("partly", "not reproduced")


# --- the mechanism, in real runs -------------------------------------------------------------


@pytest.mark.slow
def test_xavier_starves_the_first_layer_of_a_30_layer_relu_net(tmp_path: Path):
    """He et al.'s point at step 0, at both widths: Xavier's first layer gets about
    2^-14.5 ~ 4e-5 of the head's backward signal (measured 7e-6 to 3e-5), He's 0.2-0.7."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["train", "-m", "experiment=init_depth", "seed=0", "trainer.steps=1",
         "data.n_train=256", "data.n_test=64", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    ratios = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        layers = load_summary(job)["layers"]
        ratios[job.name] = layers[0]["signal_bwd"]["first"] / layers[-1]["signal_bwd"]["first"]
    assert len(ratios) == 4, ratios
    for name, ratio in ratios.items():
        if "xavier" in name:
            assert ratio < 1e-3, ratios
        else:
            assert ratio > 1e-2, ratios
