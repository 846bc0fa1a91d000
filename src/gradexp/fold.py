"""Folding BatchNorm into the layer before it, for inference.

At evaluation BatchNorm is a fixed affine map per channel, y = gamma (z - mu) /
sqrt(var + eps) + beta with the running mu and var, so when z is a Linear or Conv
output it folds into that layer: W' = gamma W / sqrt(var + eps), b' = gamma (b - mu) /
sqrt(var + eps) + beta. The folded model computes the same function with one layer
fewer per norm (and no train/inference mismatch left to hide).
"""

from __future__ import annotations

import copy

import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

# Exact types: a subclass may compute with another weight than .weight (WSConv2d).
_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, BatchNorm) qualified names of every BatchNorm that ``fold_batchnorm`` folds.

    The model is traced with torch.fx; a BatchNorm qualifies when its input is the
    output of a Linear or Conv module that nothing else reads, both modules are called
    once per forward, and it keeps running statistics. Any other BatchNorm (one that
    normalizes a sum or a block input, like resmlp's pre-activation norm) is not listed.

    Raises:
        ValueError: the model has BatchNorm layers but torch.fx cannot trace it.
    """
    modules = dict(model.named_modules())
    if not any(isinstance(m, _BatchNorm) for m in modules.values()):
        return []
    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 -- fx raises many kinds; name the cause
        raise ValueError(f"cannot trace {type(model).__name__} to fold its BatchNorm: {e}") from e
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        bn = modules[node.target]
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and type(modules[src.target]) in _FOLDABLE
            and len(src.users) == 1
            and calls[src.target] == calls[node.target] == 1
            and bn.running_mean is not None
        ):
            pairs.append((src.target, node.target))
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with BatchNorm folded into the layer before it.

    Every pair that ``batchnorm_pairs`` lists is fused with torch's own
    ``fuse_linear_bn_eval`` / ``fuse_conv_bn_eval`` (the layer gets the folded weight and
    a bias, the BatchNorm becomes nn.Identity, at the same qualified names, so
    ``depth_layers()`` still holds). A BatchNorm whose input is not a Linear/Conv output
    stays, in eval mode: resmlp's pre-activation norms, for one. ``model`` itself is
    left untouched.

    Linear + BatchNorm1d assumes (B, features) inputs, as every model here has: the
    norm's channel dim is the layer's output dim.
    """
    folded = copy.deepcopy(model).eval()
    for layer_name, bn_name in batchnorm_pairs(folded):
        layer, bn = folded.get_submodule(layer_name), folded.get_submodule(bn_name)
        assert isinstance(bn, _BatchNorm)
        fused = (
            fuse_linear_bn_eval(layer, bn)
            if isinstance(layer, nn.Linear)
            else fuse_conv_bn_eval(layer, bn)
        )
        _set_submodule(folded, layer_name, fused)
        _set_submodule(folded, bn_name, nn.Identity())
    return folded.eval()  # the new Identity modules too
