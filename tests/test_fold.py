"""BatchNorm folding: the folded model computes what the eval-mode model computes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import composed
from gradexp import config as C
from gradexp.data import DataSpec
from gradexp.fold import batchnorm_pairs, fold_batchnorm
from gradexp.init import init_weights
from gradexp.layers import WSConv2d
from gradexp.models import create_model
from gradexp.telemetry import LayerMap

C.register_configs()
pytestmark = pytest.mark.usefixtures("one_thread")

VECTORS = ("data=synthetic", "data.features=6", "data.classes=4")
IMAGES = ("data=synthetic_images", "data.size=8", "data.channels=3")
MODELS = {
    "mlp": (*VECTORS, "model=mlp", "model.depth=3", "model.width=8"),
    "resmlp": (*VECTORS, "model=resmlp", "model.depth=3", "model.width=8"),
    "cnn": (*IMAGES, "model=cnn", "model.depth=3", "model.channels=4", "model.downsample=[1]"),
    "resnet": (*IMAGES, "model=resnet", "model.blocks=[1,1]", "model.width=4"),
}
# (layer, BatchNorm) pairs each model must fold; resmlp's block norms read h, not a Linear.
PAIRS = {
    "mlp": [(f"hidden.{i}.linear", f"hidden.{i}.norm") for i in range(3)],
    "resmlp": [("stem.linear", "stem.norm")],
    "cnn": [(f"conv.{i}.conv", f"conv.{i}.norm") for i in range(3)],
    "resnet": [
        ("stem.conv", "stem.norm"),
        ("blocks.0.conv1", "blocks.0.norm1"),
        ("blocks.0.conv2", "blocks.0.norm2"),
        ("blocks.1.conv1", "blocks.1.norm1"),
        ("blocks.1.conv2", "blocks.1.norm2"),
        ("blocks.1.shortcut.0", "blocks.1.shortcut.1"),
    ],
}


def trained(name: str, steps: int = 5) -> tuple[nn.Module, tuple[int, ...]]:
    """A norm=batch model after a few SGD steps in train mode: running stats have moved."""
    cfg = composed(*MODELS[name], "norm=batch", "activation=relu", "init=kaiming_normal")
    d = cfg.data
    shape = (d.features,) if name.endswith("mlp") else (d.channels, d.size, d.size)
    torch.manual_seed(0)
    model = create_model(cfg, DataSpec(shape, d.classes))
    init_weights(model, cfg.init, cfg.activation)
    for m in model.modules():  # gains and shifts away from (1, 0)
        if isinstance(m, _BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x = 1.5 * torch.randn(16, *shape, generator=g) + 0.5
        y = torch.randint(d.classes, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, shape


@pytest.mark.parametrize("name", list(MODELS))
def test_folded_model_computes_the_eval_model(name):
    model, shape = trained(name)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    # the statistics are not the (0, 1) they start at
    assert all(bn.num_batches_tracked == 5 for bn in bns)
    assert all(bn.running_mean.abs().max() > 1e-2 for bn in bns)
    assert all((bn.running_var - 1).abs().max() > 1e-2 for bn in bns)

    before = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    assert model.training  # the input is untouched
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not folded.training and not any(m.training for m in folded.modules())

    assert batchnorm_pairs(model) == PAIRS[name]
    left = [n for n, m in folded.named_modules() if isinstance(m, _BatchNorm)]
    if name == "resmlp":
        assert left == ["blocks.0.norm", "blocks.1.norm"]
    else:
        assert left == []
    for layer, bn in PAIRS[name]:
        assert isinstance(folded.get_submodule(bn), nn.Identity)
        assert folded.get_submodule(layer).bias is not None

    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(2)) + 0.5
    model.eval()
    with torch.no_grad():
        expected, got = model(x), folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # telemetry reads the folded model by the same layer names
    assert LayerMap.of(folded).tags == LayerMap.of(model).tags


def test_fold_formula_by_hand():
    torch.manual_seed(0)
    linear, bn = nn.Linear(5, 3), nn.BatchNorm1d(3, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3))
        bn.running_var.copy_(torch.rand(3) + 0.2)
        bn.weight.copy_(torch.randn(3))
        bn.bias.copy_(torch.randn(3))
    folded = fold_batchnorm(nn.Sequential(linear, bn))
    sigma = torch.sqrt(bn.running_var + bn.eps)
    w = bn.weight[:, None] * linear.weight / sigma[:, None]
    b = bn.weight * (linear.bias - bn.running_mean) / sigma + bn.bias
    torch.testing.assert_close(folded[0].weight, w)
    torch.testing.assert_close(folded[0].bias, b)
    assert isinstance(folded[1], nn.Identity)


def test_a_model_without_batchnorm_is_an_eval_copy():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout(0.5))
    folded = fold_batchnorm(model)
    assert batchnorm_pairs(model) == []
    assert model.training and not folded.training
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(folded(x), model.eval()(x))


class SharedOutput(nn.Module):
    """A Linear output read by the BatchNorm and by the sum: folding would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        return self.bn(h) + h


@pytest.mark.parametrize(
    "model",
    [
        SharedOutput(),
        # WSConv2d computes with its standardized weight: folding into .weight would be wrong
        nn.Sequential(WSConv2d(3, 4, 3), nn.BatchNorm2d(4)),
        # BatchNorm of the input, nothing before it
        nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)),
    ],
    ids=["shared-output", "wsconv", "first"],
)
def test_batchnorm_that_cannot_fold_stays(model):
    wsconv = any(isinstance(m, WSConv2d) for m in model.modules())
    x = torch.randn(8, *((3, 6, 6) if wsconv else (4,)))
    model.train()
    model(x)  # move the running statistics
    assert batchnorm_pairs(model) == []
    folded = fold_batchnorm(model)
    assert sum(isinstance(m, _BatchNorm) for m in folded.modules()) == 1
    torch.testing.assert_close(folded(x), model.eval()(x))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # torch.fx cannot trace a branch on a value
            x = -x
        return self.bn(self.linear(x))


def test_untraceable_model_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="cannot trace DataDependent"):
        fold_batchnorm(DataDependent())
