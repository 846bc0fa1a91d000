"""Model families, looked up by ``model.name``.

Every model exposes ``depth_layers()``: its layers in depth order, input to
output, as (name, module). A layer is one depth step (a linear or conv with its
norm and activation); its output is the h whose forward and backward signals
the telemetry measures, and its parameters are taken together for its norms.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from gradexp.config import Config
from gradexp.data import DataSpec
from gradexp.models.mlp import MLP, Block
from gradexp.registry import Registry

MODELS: Registry[Callable[[Config, DataSpec], nn.Module]] = Registry("model")
MODELS.register("mlp", MLP.from_config)


def create_model(cfg: Config, spec: DataSpec) -> nn.Module:
    """Build ``cfg.model`` for the task ``spec`` (not yet initialized: see gradexp.init)."""
    return MODELS.get(cfg.model.name)(cfg, spec)


__all__ = ["MLP", "Block", "MODELS", "create_model"]
