"""Model families, looked up by ``model.name``.

Every model maps ``(B, *spec.input_shape)`` to ``(B, spec.out_features)`` and
exposes ``depth_layers()``: its layers in depth order, input to output, as
(name, module) with the module's qualified name. A layer is one depth step (a
linear or conv with its norm and activation, a residual block, a recurrent layer
over the whole sequence); its output is the h whose forward and backward signals
the telemetry measures, its parameters are taken together for its norms, and the
classifier is the last one, named ``head``.

A module may define ``post_init(init_cfg, act_cfg) -> list[str]``: it runs after
the init group and applies what the architecture prescribes (see gradexp.init).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from gradexp.config import Config
from gradexp.data import DataSpec
from gradexp.registry import Registry

ModelFactory = Callable[[Config, DataSpec], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")

# Each family registers itself in MODELS.
from gradexp.models import cnn, mlp, recurrent, residual  # noqa: E402, F401


def create_model(cfg: Config, spec: DataSpec) -> nn.Module:
    """Build ``cfg.model`` for the task ``spec`` (not yet initialized: see gradexp.init)."""
    return MODELS.get(cfg.model.name)(cfg, spec)


__all__ = ["MODELS", "create_model"]
