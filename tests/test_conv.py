"""cnn, resnet, resmlp and nfnet: every norm and a few activations run, and each part
computes what its formula says, checked against an independent computation."""

from __future__ import annotations

import dataclasses
import functools
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import Run, composed, describe, train
from gradexp import config as C
from gradexp.data import DataSpec
from gradexp.fold import batchnorm_pairs
from gradexp.init import init_weights
from gradexp.layers import (
    LayerNorm2d,
    WSConv2d,
    activation_gamma,
    get_act_layer,
    normal_variance,
)
from gradexp.models import create_model
from gradexp.models.residual import NFBlock
from gradexp.telemetry import LayerMap

C.register_configs()

RELU_GAMMA = math.sqrt(2 / (1 - 1 / math.pi))

# Tiny versions of each family; images are 3 x 8 x 8, vectors 6 features.
FAMILIES = {
    "cnn": ("model=cnn", "model.depth=3", "model.channels=8", "model.downsample=[1]"),
    "resnet": ("model=resnet", "model.blocks=[1,1]", "model.width=8"),
    "nfnet": ("model=nfnet", "model.blocks=[1,1]", "model.width=8"),
    "resmlp": ("model=resmlp", "model.depth=3", "model.width=8"),
}
LAYERS = {
    "cnn": ["conv.0", "conv.1", "conv.2", "head"],
    "resnet": ["stem", "blocks.0", "blocks.1", "head"],
    "nfnet": ["stem", "blocks.0", "blocks.1", "head"],
    "resmlp": ["stem", "blocks.0", "blocks.1", "head"],
}
# config.yaml defaults to sigmoid (the failure demo); relu unless a test says otherwise
IMAGES = ("data=synthetic_images", "data.size=8", "data.channels=3", "activation=relu")
VECTORS = ("data=synthetic", "data.features=6", "data.classes=4")
ACTIVATIONS = ("relu", "tanh", "prelu")


@functools.cache
def group_cfg(group: str, option: str, *extra: str):
    """One group's config, composed once (with model=cnn, which takes every norm)."""
    return getattr(composed("model=cnn", f"{group}={option}", *extra), group)


def family_cfg(
    family: str, norm: str = "none", act: str = "relu", *extra: str, zero_init_last: bool = False
) -> C.Config:
    """A tiny config of ``family`` with this norm and activation, validated as a whole."""
    overrides = [*FAMILIES[family], *(VECTORS if family == "resmlp" else IMAGES)]
    if family != "cnn":
        overrides.append(f"model.zero_init_last={str(zero_init_last).lower()}")
    base = composed(*overrides, "init=kaiming_normal", *extra)
    # 4 features per group at width 8 (the default 8 groups would normalize single values)
    norm_cfg = group_cfg("norm", norm, *(["norm.num_groups=2"] if norm == "group" else []))
    cfg = dataclasses.replace(base, norm=norm_cfg, activation=group_cfg("activation", act))
    C.validate(cfg)
    return cfg


def spec_of(cfg: C.Config) -> DataSpec:
    d = cfg.data
    if isinstance(d, C.SyntheticImagesDataConfig):
        return DataSpec((d.channels, d.size, d.size), d.classes, "image")
    return DataSpec((d.features,), d.classes)


def build(cfg: C.Config, seed: int = 0) -> tuple[nn.Module, DataSpec, list[str]]:
    torch.manual_seed(seed)
    spec = spec_of(cfg)
    model = create_model(cfg, spec)
    notes = init_weights(model, cfg.init, cfg.activation)
    return model, spec, notes


CASES = [
    (family, norm, act)
    for family in FAMILIES
    for norm in C.MODEL_NORMS[family]
    for act in ACTIVATIONS
]


# --- every family x norm x activation ---------------------------------------------------


@pytest.mark.parametrize("family, norm, act", CASES)
def test_forward_backward(family, norm, act):
    cfg = family_cfg(family, norm, act)
    model, spec, _ = build(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, *spec.input_shape, generator=g)
    y = torch.randint(spec.num_classes, (8,), generator=g)
    out = model(x)
    assert out.shape == (8, spec.out_features)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, y).backward()

    assert [t.split("_", 1)[1] for t in LayerMap.of(model).tags] == LAYERS[family]
    act_type = get_act_layer(act)
    acts = [m for m in model.modules() if isinstance(m, act_type)]
    assert acts and not any(getattr(m, "inplace", False) for m in acts)
    # A bias right before a BatchNorm gets no gradient: the norm subtracts its mean.
    before_bn = {f"{layer}.bias" for layer, _ in batchnorm_pairs(model)}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name in before_bn:
            assert p.grad.abs().max() < 1e-5, name
        else:
            assert p.grad.abs().max() > 0, name


@pytest.mark.parametrize("family", ["cnn", "resnet"])
@pytest.mark.parametrize("norm", ["batch", "layer", "group", "none", "weight_std"])
def test_conv_norm_modules(family, norm):
    model, _, _ = build(family_cfg(family, norm))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [
        m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm))
    ]
    assert all(isinstance(c, WSConv2d) == (norm == "weight_std") for c in convs)
    expected = {"batch": nn.BatchNorm2d, "layer": LayerNorm2d, "group": nn.GroupNorm}.get(norm)
    if expected is None:
        assert norms == []
    else:
        assert norms and all(type(n) is expected for n in norms)
        assert len(norms) == len(convs)  # one after every conv, shortcuts included
    if norm == "group":
        assert all(n.num_groups == 2 for n in norms)
    if norm == "batch":
        assert all(n.momentum == 0.1 and n.eps == 1e-5 for n in norms)


# --- layers ------------------------------------------------------------------------------


def test_layer_norm_2d_normalizes_over_channels_at_each_position():
    model, _, _ = build(family_cfg("cnn", "layer"))
    norm = model.conv[0].norm
    assert isinstance(norm, LayerNorm2d)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
        norm.bias.copy_(torch.randn(8, generator=g))
    x = 3 * torch.randn(4, 8, 5, 6, generator=g) + torch.arange(8.0)[:, None, None]
    mean = x.mean(dim=1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + norm.eps)
    expected = expected * norm.weight[:, None, None] + norm.bias[:, None, None]
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


def test_weight_std_convs_use_standardized_weights():
    model, _, _ = build(family_cfg("cnn", "weight_std"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    for block in model.conv:
        conv = block.conv
        assert isinstance(conv, WSConv2d) and conv.eps == 1e-4
        with torch.no_grad():
            conv.gain.copy_(torch.rand(conv.gain.shape, generator=g) + 0.5)
        w = conv.weight.detach().double()
        flat = w.flatten(1)
        manual = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, unbiased=False, keepdim=True))
        manual = manual / math.sqrt(flat.shape[1]) * conv.gain.detach().double().flatten(1)
        w_hat = conv.standardized_weight().detach().double()
        torch.testing.assert_close(w_hat.flatten(1), manual, rtol=1e-5, atol=1e-6)
        # Each output channel: zero mean, squared norm gain^2.
        assert w_hat.flatten(1).mean(1).abs().max() < 1e-7
        torch.testing.assert_close(
            w_hat.flatten(1).square().sum(1),
            conv.gain.detach().double().flatten().square(),
            rtol=1e-5,
            atol=0,
        )
        expected = F.conv2d(x, w_hat.float(), conv.bias, conv.stride, conv.padding)
        torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-5)
        x = block(x)


def test_ws_conv_output_has_unit_variance_on_scaled_relu():
    torch.manual_seed(0)
    conv = WSConv2d(16, 32, 3)  # no padding: every output sees 144 inputs
    nn.init.normal_(conv.weight)  # the scale of W does not matter
    nn.init.zeros_(conv.bias)
    x = torch.relu(torch.randn(64, 16, 10, 10)) * RELU_GAMMA
    with torch.no_grad():
        out = conv(x)
    var = out.var(dim=(0, 2, 3))
    assert (var - 1).abs().max() < 0.15, var
    assert abs(var.mean().item() - 1) < 0.05
    # Zero-mean rows remove ReLU's mean (x has mean 0.68): no mean shift.
    assert out.mean(dim=(0, 2, 3)).abs().max() < 0.1


def test_relu_gamma():
    gamma = activation_gamma(C.ActivationConfig("relu"))
    assert abs(gamma - RELU_GAMMA) < 2e-3
    # The quadrature used for every other activation, against ReLU's closed form.
    assert abs(normal_variance(torch.relu) - (0.5 - 1 / (2 * math.pi))) < 1e-9


@pytest.mark.parametrize(
    "cfg, slope",
    [
        (C.LeakyReLUConfig("leaky_relu", negative_slope=0.2), 0.2),
        (C.PReLUConfig("prelu", init=0.25), 0.25),
        (C.RReLUConfig("rrelu", lower=0.1, upper=0.3), 0.2),  # eval: the mean slope
    ],
)
def test_leaky_gamma_against_closed_form(cfg, slope):
    # g = max(z, a z): E[g] = (1 - a) / sqrt(2 pi), E[g^2] = (1 + a^2) / 2.
    var = (1 + slope**2) / 2 - (1 - slope) ** 2 / (2 * math.pi)
    assert activation_gamma(cfg) == pytest.approx(1 / math.sqrt(var), abs=1e-6)


def test_selu_gamma_is_one():
    # SELU's constants make N(0, 1) -> unit variance (Klambauer et al. 2017).
    assert activation_gamma(C.ActivationConfig("selu")) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "gelu", "silu", "elu"])
def test_gamma_against_monte_carlo(name):
    cfg = C.ELUConfig("elu") if name == "elu" else C.ActivationConfig(name)
    z = torch.randn(2**22, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    act = get_act_layer(name)().double()
    mc = 1 / act(z).var().sqrt().item()
    # Standard error of a variance from 4M samples: < 0.1 %.
    assert activation_gamma(cfg) == pytest.approx(mc, rel=4e-3)


# --- resnet --------------------------------------------------------------------------------


def test_resnet_three_stages_shrink_16_to_4():
    cfg = composed(*IMAGES, "data.size=16", "model=resnet", "model.blocks=[1,2,1]", "model.width=4")
    model, spec, _ = build(cfg)
    shapes = []
    hooks = [b.register_forward_hook(lambda m, i, o: shapes.append(o.shape)) for b in model.blocks]
    model(torch.randn(2, *spec.input_shape))
    for h in hooks:
        h.remove()
    assert shapes == [(2, 4, 16, 16), (2, 8, 8, 8), (2, 8, 8, 8), (2, 16, 4, 4)]
    projections = [not isinstance(b.shortcut, nn.Identity) for b in model.blocks]
    assert projections == [False, True, False, True]
    assert model.head.in_features == 16


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_cnn_downsample_and_kernel_size():
    cfg = composed(
        *IMAGES, "model=cnn", "model.depth=4", "model.channels=4", "model.downsample=[0,2]"
    )
    model, _, _ = build(cfg)
    shapes = []
    hooks = [b.register_forward_hook(lambda m, i, o: shapes.append(o.shape)) for b in model.conv]
    model(torch.randn(2, 3, 8, 8))
    for h in hooks:
        h.remove()
    assert [s[-1] for s in shapes] == [4, 4, 2, 2]
    even = composed(
        *IMAGES, "model=cnn", "model.depth=2", "model.channels=4", "model.kernel_size=2"
    )
    model, _, _ = build(even)
    assert model.conv[1](model.conv[0](torch.randn(2, 3, 8, 8))).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("norm", C.MODEL_NORMS["resnet"])
def test_resnet_zero_init_last_starts_each_block_as_its_shortcut(norm):
    model, _, notes = build(family_cfg("resnet", norm, zero_init_last=True))
    assert notes == ["zero_init_last: 2 blocks start as their shortcut"]
    x0 = torch.randn(4, 8, 8, 8)
    x = x0
    for block in model.blocks:
        torch.testing.assert_close(block(x), block.act2(block.shortcut(x)), rtol=0, atol=1e-6)
        x = block(x)
    # and without it the branch contributes
    model, _, notes = build(family_cfg("resnet", norm))
    assert notes == []
    assert (model.blocks[0](x0) - model.blocks[0].act2(x0)).abs().max() > 0.1


def test_resmlp_zero_init_last_blocks_are_identities():
    model, _, notes = build(family_cfg("resmlp", "batch", zero_init_last=True))
    assert notes == ["zero_init_last: 2 blocks start as the identity"]
    h = torch.randn(4, 8)
    for block in model.blocks:
        torch.testing.assert_close(block(h), h, rtol=0, atol=0)
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), model.head(model.stem(x)))


def test_resmlp_matches_mlp_depth():
    res, _, _ = build(family_cfg("resmlp"))
    mlp_cfg = composed(*VECTORS, "model=mlp", "model.depth=3", "model.width=8", "norm=none")
    mlp, _, _ = build(mlp_cfg)
    n_linear = [sum(isinstance(m, nn.Linear) for m in net.modules()) for net in (res, mlp)]
    assert n_linear == [4, 4]


# --- nfnet ---------------------------------------------------------------------------------


def test_nf_expected_variance_bookkeeping():
    alpha = 0.3
    cfg = composed(
        *IMAGES, "model=nfnet", "model.blocks=[3,2,2]", "model.width=4", f"model.alpha={alpha}"
    )
    model, _, _ = build(cfg)
    # Independently: var starts at 1, + alpha^2 per block, 1 + alpha^2 after a transition.
    var, channels, expected = 1.0, 4, []
    for stage, n in enumerate([3, 2, 2]):
        for j in range(n):
            transition = stage > 0 and j == 0
            expected.append((math.sqrt(var), transition, channels * (2 if transition else 1)))
            channels *= 2 if transition else 1
            var = 1 + alpha**2 if transition else var + alpha**2
    got = [(b.beta, b.transition, b.conv2.out_channels) for b in model.blocks]
    assert [g[1:] for g in got] == [e[1:] for e in expected]
    for (beta, *_), (want, *_) in zip(got, expected, strict=True):
        assert beta == pytest.approx(want, rel=1e-12)
    assert all(b.alpha == alpha and b.gamma == pytest.approx(RELU_GAMMA) for b in model.blocks)
    assert [b.shortcut.stride for b in model.blocks if b.transition] == [(2, 2), (2, 2)]


def channel_variances(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Average channel variance of every block's output (Brock et al.'s SPP)."""
    out: list[float] = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: out.append(o.var(dim=(0, 2, 3)).mean().item()))
        for b in model.blocks
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_nf_signal_tracks_expected_variance_through_a_deep_stack(act):
    deep = ("model.blocks=[16]", "model.width=16", "data.size=16", "model.zero_init_last=false")
    nf, spec, _ = build(composed(*IMAGES, "model=nfnet", *deep, f"activation={act}"))
    x = torch.randn(8, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    measured = channel_variances(nf, x)
    expected = [b.beta**2 + b.alpha**2 for b in nf.blocks]
    assert expected[-1] == pytest.approx(1 + 16 * 0.04)
    # Zero padding at the borders of a 16x16 map costs a few per cent per conv.
    for got, want in zip(measured, expected, strict=True):
        assert 0.7 * want < got < 1.1 * want
    # The same depth without NF scaling and without norm: the variance explodes.
    plain, _, _ = build(composed(*IMAGES, "model=resnet", *deep, "norm=none", f"activation={act}"))
    plain_var = channel_variances(plain, x)
    if act == "relu":
        assert plain_var[-1] > 1e3 * plain_var[0]


def test_nf_zero_init_last_zeroes_every_branch():
    cfg = composed(*IMAGES, "model=nfnet", "model.blocks=[2,1]", "model.width=4")
    assert cfg.model.zero_init_last  # the option file's default
    model, _, notes = build(cfg)
    assert notes == ["zero_init_last: the branches of 3 blocks start at zero"]
    x = model.stem(torch.randn(4, 3, 8, 8))
    for block in model.blocks:
        assert isinstance(block, NFBlock)
        h = block.preact(x)
        assert block.branch(h).abs().max() == 0
        shortcut = x if block.shortcut is None else block.shortcut(h)
        torch.testing.assert_close(block(x), shortcut, rtol=0, atol=0)
        x = block(x)
    # The gains start at zero but learn: they get a gradient.
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    assert all(b.conv2.gain.grad.abs().max() > 0 for b in model.blocks)


def test_nf_preact_scales_the_block_input_to_unit_variance():
    cfg = composed(*IMAGES, "model=nfnet", "model.blocks=[4]", "model.width=4", "activation=tanh")
    model, _, _ = build(cfg)
    block = model.blocks[-1]
    assert block.beta == pytest.approx(math.sqrt(1 + 3 * 0.04))
    x = block.beta * torch.randn(2**16, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    assert block.preact(x).var().item() == pytest.approx(1.0, rel=0.02)


# --- the CLI, end to end --------------------------------------------------------------------

CLI_COMMON = (
    "trainer.steps=4",
    "trainer.log_every=2",
    "data.n_train=64",
    "data.n_test=32",
    "trainer.progress=off",
    "trainer.device=cpu",
)


CLI_RUNS = {
    "cnn": (
        ("model=cnn", "model.depth=3", "model.channels=4", "data.size=8"),
        ["conv.0", "conv.1", "conv.2", "head"],
    ),
    "resnet": (
        ("model=resnet", "norm=batch", "model.blocks=[1,1]", "model.width=4", "data.size=8"),
        ["stem", "blocks.0", "blocks.1", "head"],
    ),
    "nfnet": (
        ("model=nfnet", "clip=agc", "model.blocks=[1,1]", "model.width=4", "data.size=8"),
        ["stem", "blocks.0", "blocks.1", "head"],
    ),
    "resmlp": (
        ("model=resmlp", "model.depth=3", "model.width=8", "activation=relu"),
        ["stem", "blocks.0", "blocks.1", "head"],
    ),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, Run]:
    """One CLI run per family, side by side: each is mostly interpreter start-up."""
    root = tmp_path_factory.mktemp("cli")
    with ThreadPoolExecutor(len(CLI_RUNS)) as pool:
        futures = {
            name: pool.submit(train, root, *args, *CLI_COMMON, run_dir=root / name)
            for name, (args, _) in CLI_RUNS.items()
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("family", CLI_RUNS)
def test_cli_trains_each_family(cli_runs, family):
    run, layers = cli_runs[family], CLI_RUNS[family][1]
    assert run.proc.returncode == 0, describe(run.proc)
    assert run.summary["status"] == "completed"
    assert [layer["name"] for layer in run.summary["layers"]] == layers
    assert [layer["index"] for layer in run.summary["layers"]] == list(range(len(layers)))
