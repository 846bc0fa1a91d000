"""gradexp.optim: optimizers by name (every option builds and steps), and reading an SGD
step's update from its state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import composed
from gradexp.cli import CONFIG_DIR
from gradexp.config import AdamConfig, SGDConfig
from gradexp.errors import ConfigError
from gradexp.hessian_free import HessianFree, model_curvature
from gradexp.optim import OPTIMIZERS, create_optimizer, momentum_buffers


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("momentum", [0.5, 0.9])
def test_momentum_buffer_times_lr_is_the_update(momentum, weight_decay):
    model = net()
    params = list(model.parameters())
    cfg = SGDConfig(name="sgd", lr=0.3, momentum=momentum, weight_decay=weight_decay)
    opt = create_optimizer(cfg, params)
    x = torch.randn(16, 5)
    for _ in range(3):  # the first step initializes the buffers, later ones accumulate
        opt.zero_grad()
        model(x).square().mean().backward()
        before = [p.detach().clone() for p in params]
        opt.step()
        buffers = momentum_buffers(opt, params)
        assert buffers is not None
        for p, b, old in zip(params, buffers, before, strict=True):
            torch.testing.assert_close(p.detach() - old, -cfg.lr * b)


@pytest.mark.parametrize(
    "cfg",
    [
        SGDConfig(name="sgd", momentum=0.0),
        SGDConfig(name="sgd", momentum=0.9, nesterov=True),
        AdamConfig(name="adam"),
    ],
)
def test_other_optimizers_have_no_buffer_shortcut(cfg):
    params = list(net().parameters())
    assert momentum_buffers(create_optimizer(cfg, params), params) is None


OPTIONS = sorted(p.stem for p in (Path(CONFIG_DIR) / "optim").glob("*.yaml"))


def test_every_optim_option_is_registered():
    assert OPTIMIZERS.names() == OPTIONS


@pytest.mark.parametrize("name", OPTIONS)
def test_every_optimizer_builds_from_its_option_and_steps(name):
    cfg = composed(f"optim={name}").optim
    model = net()
    opt = create_optimizer(cfg, model.parameters())
    kinds = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop",
             "hessian_free": "HessianFree"}  # fmt: skip
    assert type(opt).__name__ == kinds[name]
    (group,) = opt.param_groups
    assert group["lr"] == cfg.lr and group["weight_decay"] == cfg.weight_decay
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 5)
    if isinstance(opt, HessianFree):  # a closure, and the network for its curvature
        params = list(model.parameters())

        def closure() -> torch.Tensor:
            loss = model(x).square().mean()
            if torch.is_grad_enabled():
                opt.zero_grad()
                loss.backward()
            return loss.detach()

        opt.step(closure, model_curvature(model, params, x, classes=None))
    else:
        model(x).square().mean().backward()
        opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_an_unknown_optimizer_names_the_choices():
    with pytest.raises(
        ConfigError,
        match="optim=lbfgs: unknown; choose from adam, adamw, hessian_free, rmsprop, sgd",
    ):
        create_optimizer(SGDConfig(name="lbfgs"), net().parameters())
