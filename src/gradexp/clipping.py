"""Gradient clipping: none, value, norm, and adaptive (AGC, Brock et al. 2021).

Each mode is looked up by name in ``CLIP_MODES``. It always clips; on measuring steps
it also returns what it did, as device tensors that the trainer brings to the host
once per logging step, under the keys its ``stats`` declares.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import ClassVar

import torch
from torch import nn

from gradexp.config import AGCConfig, ClipConfig, NormClipConfig, ValueClipConfig
from gradexp.errors import ConfigError
from gradexp.record import Quantity
from gradexp.registry import Registry

Stats = dict[str, torch.Tensor]


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def unit_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (units, rest): one row per output unit (dim 0), one row for 1-D or scalar."""
    return t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(1, -1)


class ClipMode:
    """clip=none: leaves the gradients alone. Every mode clips in place when called and,
    when ``measure``, returns its own statistics, each declared in ``stats`` (stat key ->
    Quantity): the trainer logs exactly what a mode declares."""

    stats: ClassVar[dict[str, Quantity]] = {}

    def __init__(
        self,
        cfg: ClipConfig,
        params: list[nn.Parameter],
        names: list[str],
        layer_index: list[int],
        num_layers: int,
    ) -> None:
        self.cfg = cfg
        self.params = params

    def __call__(self, measure: bool = False) -> Stats:
        return {}


CLIP_MODES: Registry[type[ClipMode]] = Registry("clip")
CLIP_MODES.register("none", ClipMode)


@CLIP_MODES.decorate("norm")
class NormClip(ClipMode):
    """Rescale every gradient by max_norm / ||g|| when the global norm exceeds max_norm."""

    stats = {
        "coef": Quantity(
            "clip/coef",
            "scalar",
            "clip=norm: the factor the gradients were scaled by (1: not clipped)",
            chart="clipping factor (norm)",
            section="clipping",
        )
    }

    def __call__(self, measure: bool = False) -> Stats:
        cfg = self.cfg
        assert isinstance(cfg, NormClipConfig)
        total = nn.utils.clip_grad_norm_(self.params, cfg.max_norm, cfg.norm_type, foreach=True)
        # The factor clip_grad_norm_ applied (1 when the norm was below max_norm).
        return {"coef": (cfg.max_norm / (total + 1e-6)).clamp(max=1.0)} if measure else {}


@CLIP_MODES.decorate("value")
class ValueClip(ClipMode):
    """Clamp every gradient entry into [-threshold, threshold]."""

    stats = {
        "frac": Quantity(
            "clip/frac",
            "scalar",
            "clip=value: share of gradient entries clamped; clip=agc: share of units clipped",
            chart="clipped share",
            section="clipping",
        )
    }

    def __init__(self, cfg: ClipConfig, params: list[nn.Parameter], *args: object) -> None:
        super().__init__(cfg, params, *args)  # type: ignore[arg-type]
        self.numel = sum(p.numel() for p in params)

    def __call__(self, measure: bool = False) -> Stats:
        cfg = self.cfg
        assert isinstance(cfg, ValueClipConfig)
        stats = {}
        if measure:
            hit = sum((g.abs() > cfg.threshold).sum() for g in _grads(self.params))
            stats["frac"] = torch.as_tensor(hit, dtype=torch.float32) / self.numel
        nn.utils.clip_grad_value_(self.params, cfg.threshold, foreach=True)
        return stats


def _excludes(module: str, param: str) -> bool:
    return param == module or param.startswith(module + ".")


def check_exclude(cfg: ClipConfig, names: list[str]) -> None:
    """ConfigError (one line) for a name in ``clip.exclude`` that is no module of the
    model (with parameters): it would exclude nothing, silently. ``names``: the model's
    parameter names."""
    for module in getattr(cfg, "exclude", []):
        if not any(_excludes(module, n) for n in names):
            top = dict.fromkeys(n.split(".")[0] for n in names)
            example = next((n.rpartition(".")[0] for n in names if n.count(".") > 1), None)
            raise ConfigError(
                f"clip.exclude=[{module}]: the model has no module {module!r}; choose from"
                f" {', '.join(top)}" + (f" or a sub-module (e.g. {example})" if example else "")
            )


@CLIP_MODES.decorate("agc")
class AGC(ClipMode):
    """Adaptive gradient clipping (Brock et al. 2021), unit-wise: for each unit i (row of
    a weight), if ||G_i|| > lambda * max(||W_i||, eps),
    G_i <- G_i * lambda * max(||W_i||, eps) / max(||G_i||, 1e-6). Modules named in
    ``cfg.exclude`` (with their sub-modules) are left alone."""

    stats = {
        "frac": ValueClip.stats["frac"],
        "layer_frac": Quantity(
            "clip_frac",
            doc="clip=agc: share of the layer's units clipped (the excluded head: none)",
            sparse=True,
            chart="AGC clipped units per layer",
            section="clipping",
        ),
    }

    def __init__(
        self,
        cfg: ClipConfig,
        params: list[nn.Parameter],
        names: list[str],
        layer_index: list[int],
        num_layers: int,
    ) -> None:
        super().__init__(cfg, params, names, layer_index, num_layers)
        assert isinstance(cfg, AGCConfig)
        check_exclude(cfg, names)
        excluded = [any(_excludes(e, n) for e in cfg.exclude) for n in names]
        agc_params = [i for i, ex in enumerate(excluded) if not ex]
        # Parameters whose unit views share a shape are clipped as one stacked tensor.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in agc_params:
            p = params[i]
            groups[(tuple(unit_view(p).shape), p.dtype, p.device)].append(i)
        self.groups = list(groups.values())
        units = torch.zeros(num_layers)
        for i in agc_params:
            units[layer_index[i]] += unit_view(params[i]).shape[0]
        self.layer_units = units
        self.layer_index = torch.tensor(layer_index)

    @torch.no_grad()
    def __call__(self, measure: bool = False) -> Stats:
        cfg = self.cfg
        assert isinstance(cfg, AGCConfig)
        clipped_per_param: dict[int, torch.Tensor] = {}
        for idx in self.groups:
            idx = [i for i in idx if self.params[i].grad is not None]
            if not idx:
                continue
            w = torch.stack([unit_view(self.params[i]) for i in idx])
            g = torch.stack([unit_view(self.params[i].grad) for i in idx])
            max_norm = torch.linalg.vector_norm(w, dim=-1).clamp_min(cfg.eps) * cfg.clipping
            g_norm = torch.linalg.vector_norm(g, dim=-1)
            clipped = g_norm > max_norm
            scale = torch.where(clipped, max_norm / g_norm.clamp_min(1e-6), 1.0)
            for j, i in enumerate(idx):
                grad = self.params[i].grad
                # (units,) -> (units, 1, ...) against the grad's own layout
                grad.mul_(
                    scale[j].reshape((-1,) + (1,) * (grad.ndim - 1)) if grad.ndim else scale[j][0]
                )
            if measure:
                for j, i in enumerate(idx):
                    clipped_per_param[i] = clipped[j].sum()
        if not measure:
            return {}
        device = self.params[0].device
        layer_hits = torch.zeros(len(self.layer_units), device=device)
        if clipped_per_param:
            index = self.layer_index[list(clipped_per_param)].to(device)
            hits = torch.stack(list(clipped_per_param.values())).float()
            layer_hits.index_add_(0, index, hits)
        units = self.layer_units.to(device)
        return {
            "frac": layer_hits.sum() / units.sum().clamp_min(1),
            # NaN for a layer with no clipped parameters (the excluded head): nothing to report.
            "layer_frac": torch.where(units > 0, layer_hits / units.clamp_min(1), math.nan),
        }


def Clipper(  # noqa: N802 -- a factory that reads like the class it returns
    cfg: ClipConfig,
    params: list[nn.Parameter],
    names: list[str],
    layer_index: list[int],
    num_layers: int,
) -> ClipMode:
    """The clip mode ``cfg.name`` for ``params``.

    Args:
        cfg: the clip config.
        params: the parameters, in the trainer's order.
        names: their qualified names (AGC leaves out the modules in ``cfg.exclude``).
        layer_index: the depth layer of each parameter.
        num_layers: how many depth layers there are.
    """
    return CLIP_MODES.get(cfg.name)(cfg, params, names, layer_index, num_layers)
