"""Every config option composes against its schema and runs; train.run end to end.

The options are read from src/gradexp/configs/<group>/*.yaml, so a new option file is
tested without touching this file. Hydra's compose costs ~0.2 s, so each option is
composed once and the combinations are assembled from the composed groups.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from rich.console import Console

import gradexp
from conftest import composed
from gradexp import config as C
from gradexp.clipping import Clipper
from gradexp.data import DATASETS, DataSpec, load_data
from gradexp.init import INITS, init_weights
from gradexp.layers import ACTIVATIONS, NORMS, get_act_layer
from gradexp.metrics import NullLogger
from gradexp.models import MODELS, create_model
from gradexp.optim import create_optimizer
from gradexp.telemetry import LayerMap, SignalProbe
from gradexp.train import run

CONFIG_DIR = Path(gradexp.__file__).parent / "configs"
GROUPS = sorted(
    d.name
    for d in CONFIG_DIR.iterdir()
    # experiment and arm files set several groups at once (tests/test_experiments.py)
    if d.is_dir() and any(d.glob("*.yaml")) and d.name not in ("hydra", "experiment", "arm")
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


ALL_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]

C.register_configs()  # the schemas the option files name (idempotent)


# Options that need another choice to make sense (weight standardization is for convs).
CONTEXT = {("norm", "weight_std"): ("model=cnn",)}


def group_cfg(group: str, option: str):
    return getattr(composed(*CONTEXT.get((group, option), ()), f"{group}={option}"), group)


TINY = (
    "model.depth=3",
    "model.width=8",
    "data.features=6",
    "data.classes=4",
    "data.n_train=64",
    "data.n_test=32",
)


def tiny(**groups) -> C.Config:
    """A tiny config with the given groups swapped in, validated as a whole."""
    base = composed(*TINY)
    cfg = dataclasses.replace(base, **groups)
    C.validate(cfg)
    return cfg


# --- composition ---------------------------------------------------------------------------


def test_every_group_has_options():
    assert {"model", "activation", "init", "norm", "clip", "optim", "data", "trainer"} <= set(
        GROUPS
    )
    for group in GROUPS:
        assert options(group), group


@pytest.mark.parametrize("group, option", ALL_OPTIONS)
def test_option_file_composes_against_its_schema(group, option):
    node = group_cfg(group, option)
    assert dataclasses.is_dataclass(node), f"{group}={option} composed without a schema"
    assert type(node) in C.SCHEMAS[group].values()
    if hasattr(node, "name"):
        assert node.name == option, "the option's name must match its file (registries use it)"
    # every key of the file is a field of the schema (a typo fails compose, but check)
    raw = OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")
    fields = {f.name for f in dataclasses.fields(node)}
    assert set(raw) - {"defaults"} <= fields


@pytest.mark.parametrize("group, option", ALL_OPTIONS)
def test_option_name_is_known_to_the_code(group, option):
    node = group_cfg(group, option)
    registry = {
        "activation": ACTIVATIONS,
        "init": INITS,
        "norm": NORMS,
        "model": MODELS,
        "data": DATASETS,
    }.get(group)
    if isinstance(node, C.IdentityInitConfig):  # init_weights handles identity itself
        assert node.fallback in INITS
    elif registry is not None:
        assert node.name in registry
    elif group == "optim":
        opt = create_optimizer(node, [torch.nn.Parameter(torch.zeros(2))])
        expected = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop",
                    "hessian_free": "HessianFree"}  # fmt: skip
        assert type(opt).__name__ == expected[node.name]
        assert opt.param_groups[0]["lr"] == node.lr
    elif group == "clip":
        kinds = {
            "none": C.ClipConfig,
            "value": C.ValueClipConfig,
            "norm": C.NormClipConfig,
            "agc": C.AGCConfig,
        }
        assert type(node) is kinds[node.name]
    elif group == "trainer":
        assert isinstance(node, C.TrainerConfig)
    else:
        pytest.fail(f"new config group {group}: add it to this test")


def test_schema_rejects_unknown_keys_and_bad_types():
    with pytest.raises(Exception, match="nonexistent"):
        composed("activation=leaky_relu", "activation.nonexistent=1")
    with pytest.raises(Exception, match="negative_slope"):
        composed("activation=leaky_relu", "activation.negative_slope=abc")


@pytest.mark.parametrize("name", options("data"))
def test_data_options_load(name):
    data = load_data(dataclasses.replace(group_cfg("data", name)), torch.device("cpu"))
    assert len(data.x_train) > 0 and len(data.x_test) > 0
    if not data.spec.regression:
        assert data.y_train.max().item() < data.num_classes
    assert tuple(data.x_train.shape[1:]) == data.spec.input_shape
    assert data.spec.kind == C.DATA_KINDS[name]
    assert torch.isfinite(data.x_train).all()
    assert 0 < data.baseline < math.log(max(data.num_classes, 2)) + 1e-6


# --- every option runs ---------------------------------------------------------------------


def forward_backward(cfg: C.Config, seed: int = 0) -> None:
    """Build, init, forward/backward with telemetry and clipping; everything finite."""
    torch.manual_seed(seed)
    spec = DataSpec((cfg.data.features,), cfg.data.classes)
    model = create_model(cfg, spec)
    init_weights(model, cfg.init, cfg.activation)
    act_type = get_act_layer(cfg.activation.name)
    assert all(isinstance(block.act, act_type) for block in model.hidden)
    layers = LayerMap.of(model)
    assert [t.split("_", 1)[1] for t in layers.tags] == ["hidden.0", "hidden.1", "hidden.2", "head"]
    clipper = Clipper(cfg.clip, layers.params, layers.param_names, layers.layer_of, len(layers))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, spec.input_shape[0], generator=g)
    y = torch.randint(spec.num_classes, (8,), generator=g)
    with SignalProbe(layers.modules) as probe:
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
    assert out.shape == (8, spec.num_classes)
    assert torch.isfinite(loss)
    grads = layers.grads()
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert layers.layer_sq_norms(grads).sum() > 0
    fwd, bwd = probe.result(torch.device("cpu"))
    assert torch.isfinite(fwd).all() and torch.isfinite(bwd).all()
    stats = clipper(measure=True)
    if "layer_frac" in stats:  # AGC: NaN marks the excluded head, every other layer finite
        assert torch.isfinite(stats["layer_frac"][:-1]).all()
        assert torch.isnan(stats["layer_frac"][-1])
        stats.pop("layer_frac")
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert all(torch.isfinite(p.grad).all() for p in layers.params)


@pytest.mark.parametrize("init", options("init"))
@pytest.mark.parametrize("activation", options("activation"))
def test_activation_x_init_runs(activation, init):
    cfg = tiny(
        activation=group_cfg("activation", activation),
        init=group_cfg("init", init),
        norm=group_cfg("norm", "none"),
        clip=group_cfg("clip", "none"),
    )
    forward_backward(cfg)


@pytest.mark.parametrize("clip", options("clip"))
@pytest.mark.parametrize("norm", C.MODEL_NORMS["mlp"])
def test_norm_x_clip_runs(norm, clip):
    cfg = tiny(
        activation=group_cfg("activation", "relu"),
        init=group_cfg("init", "kaiming_normal"),
        norm=group_cfg("norm", norm),
        clip=group_cfg("clip", clip),
    )
    forward_backward(cfg)


# --- train.run end to end ---------------------------------------------------------------------

RUN = (
    *TINY,
    "trainer.steps=4",
    "trainer.batch_size=16",
    "trainer.log_every=2",
    "trainer.hist_every=2",
    "trainer.eval_every=2",
    "trainer.progress=off",
    "trainer.device=cpu",
)


@pytest.mark.parametrize(
    "extra", [(), ("clip=agc", "norm=batch"), ("clip=norm", "optim=adam"), ("clip=value",)]
)
def test_train_run_end_to_end(tmp_path, extra):
    from gradexp.rundir import SUMMARY_FILE

    cfg = composed(*RUN, *extra)
    console = Console(file=io.StringIO(), width=200)
    summary = run(cfg, tmp_path, logger=NullLogger(), console=console)
    assert summary["status"] == "completed"
    assert summary["error"] is None
    assert summary["steps"] == 4
    assert summary["nonfinite"] is None
    assert [layer["name"] for layer in summary["layers"]] == [
        "hidden.0",
        "hidden.1",
        "hidden.2",
        "head",
    ]
    assert [layer["index"] for layer in summary["layers"]] == [0, 1, 2, 3]
    for layer in summary["layers"]:
        for key in ("grad_norm", "signal_bwd", "signal_fwd", "weight_norm", "update_ratio"):
            for when in ("first", "last"):
                v = layer[key][when]
                assert v is not None and math.isfinite(v) and v >= 0, (layer["name"], key)
    metrics = summary["metrics"]
    for key in (
        "loss/train",
        "acc/train",
        "loss/test",
        "acc/test",
        "flow/grad_norm_ratio",
        "flow/signal_bwd_ratio",
    ):
        assert math.isfinite(metrics[key]), key
    first, last = summary["layers"][0], summary["layers"][-1]
    assert metrics["flow/signal_bwd_ratio"] == pytest.approx(
        first["signal_bwd"]["last"] / last["signal_bwd"]["last"], rel=1e-6
    )
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == summary
    assert "completed" in console.file.getvalue()


# --- divergence ------------------------------------------------------------------------------


def run_quietly(cfg: C.Config, out: Path) -> dict:
    return run(cfg, out, logger=NullLogger(), console=Console(file=io.StringIO()))


@pytest.mark.parametrize(
    "overrides",
    [
        # SGD at a huge rate: the weights blow up within a few updates.
        ("optim.lr=1e6", "init=normal", "activation=relu"),
        # A deep linear net with N(0, 25) weights: finite at step 0, non-finite at step 1,
        # a step that logs only when logging every step.
        (
            "optim.lr=1e-2",
            "init=normal",
            "init.std=5",
            "activation=identity",
            "model.depth=12",
            "model.bias=false",
        ),
    ],
)
def test_divergence_is_located_the_same_on_and_between_log_steps(tmp_path, overrides):
    # Logging every step checks every gradient; logging rarely checks only the loss between
    # log steps and works back from the parameters. Both must name the same step and layer.
    base = (*TINY, "trainer.steps=20", "trainer.progress=off", *overrides)
    every = run_quietly(composed(*base, "trainer.log_every=1"), tmp_path / "every")
    rare = run_quietly(
        composed(
            *base, "trainer.log_every=100", "trainer.hist_every=100", "trainer.eval_every=100"
        ),
        tmp_path / "rare",
    )
    assert every["status"] == rare["status"] == "diverged"
    assert every["nonfinite"] == rare["nonfinite"]
    assert every["steps"] == rare["steps"] == every["nonfinite"]["step"]
    assert every["nonfinite"]["step"] > 0
