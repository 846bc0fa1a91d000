"""Optimizers and learning-rate schedules by short name.

SGD is the default on purpose: adaptive optimizers rescale each parameter's step and
so hide a vanishing gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from gradexp.config import (
    AdamConfig,
    HessianFreeConfig,
    OptimConfig,
    RMSpropConfig,
    Schedule,
    SGDConfig,
)
from gradexp.hessian_free import HessianFree
from gradexp.registry import Registry

Params = Iterable[torch.nn.Parameter]
# fn(optim config, parameters) -> the optimizer
OPTIMIZERS: Registry[Callable[[OptimConfig, Params], torch.optim.Optimizer]] = Registry("optim")


@OPTIMIZERS.decorate("sgd")
def _sgd(cfg: OptimConfig, params: Params) -> torch.optim.Optimizer:
    assert isinstance(cfg, SGDConfig)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )


def _adam(
    cls: type[torch.optim.Optimizer],
) -> Callable[[OptimConfig, Params], torch.optim.Optimizer]:
    def create(cfg: OptimConfig, params: Params) -> torch.optim.Optimizer:
        assert isinstance(cfg, AdamConfig)
        return cls(
            params,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )

    return create


OPTIMIZERS.register("adam", _adam(torch.optim.Adam))
OPTIMIZERS.register("adamw", _adam(torch.optim.AdamW))  # weight decay decoupled


@OPTIMIZERS.decorate("rmsprop")
def _rmsprop(cfg: OptimConfig, params: Params) -> torch.optim.Optimizer:
    assert isinstance(cfg, RMSpropConfig)
    return torch.optim.RMSprop(
        params,
        lr=cfg.lr,
        alpha=cfg.alpha,
        momentum=cfg.momentum,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


@OPTIMIZERS.decorate("hessian_free")
def _hessian_free(cfg: OptimConfig, params: Params) -> torch.optim.Optimizer:
    assert isinstance(cfg, HessianFreeConfig)
    return HessianFree(
        params,
        lr=cfg.lr,
        damping=cfg.damping,
        cg_max_iters=cfg.cg_max_iters,
        cg_decay=cfg.cg_decay,
        cg_tol=cfg.cg_tol,
        structural_damping=cfg.structural_damping,
        weight_decay=cfg.weight_decay,
        precondition=cfg.precondition,
    )


def create_optimizer(cfg: OptimConfig, params: Params) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` names, over ``params``."""
    return OPTIMIZERS.get(cfg.name)(cfg, params)


def create_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == Schedule.cosine:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def momentum_buffers(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]
) -> list[torch.Tensor] | None:
    """For heavy-ball SGD, the tensors b with update = -lr * b; else None.

    torch.optim.SGD with momentum and without Nesterov applies p <- p - lr * buf after
    updating buf, so the step's update norm is lr * ||buf||: one read of the buffers
    instead of copying the parameters before the step and subtracting after it.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    for group in optimizer.param_groups:
        if group["momentum"] <= 0 or group["nesterov"] or group["maximize"]:
            return None
    buffers = []
    for p in params:
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        buffers.append(torch.zeros_like(p) if buf is None else buf)
    return buffers
