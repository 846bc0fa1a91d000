"""Folding BatchNorm into the layer before it, for inference.

At evaluation BatchNorm is a fixed affine map per channel, y = gamma (z - mu) /
sqrt(var + eps) + beta with the running mu and var, so when z is a Linear or Conv
output it folds into that layer: W' = gamma W / sqrt(var + eps), b' = gamma (b - mu) /
sqrt(var + eps) + beta. The folded model computes the same function with one layer
fewer per norm (and no train/inference mismatch left to hide).

``fold_report`` is what a run with norm=batch does at its end: fold, evaluate the
folded model, and measure how far its outputs moved and how much faster it runs.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
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


# Rows per forward pass, in the pass that compares the two models' outputs over the
# test set and times them at once: a realistic inference batch, and small enough that
# a test set of a few thousand rows gives several timings without a pass of its own.
_CHUNK = 256


def _copy_without_hooks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that leaves its forward and backward hooks behind.

    The hooks belong to the trainer's telemetry of ``model``: run on the copies they
    would count these extra passes as training steps and slow the timings, and copying
    the objects behind them (a probe holding an event file) can fail. Seeding
    deepcopy's memo with an empty dict for each hook dict copies the rest as usual and
    leaves ``model`` itself untouched.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, hooks in vars(module).items():
            if name.startswith(("_forward", "_backward")) and isinstance(hooks, dict) and hooks:
                memo[id(hooks)] = type(hooks)()
    return copy.deepcopy(model, memo)


def _sync(x: torch.Tensor) -> None:
    # CUDA kernels run asynchronously: without this a timer measures the launches only.
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _timed(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``model(x)`` and the seconds it took."""
    _sync(x)
    start = time.perf_counter()
    out = model(x)
    _sync(x)
    return out, time.perf_counter() - start


def _paired(
    reference: nn.Module, folded: nn.Module, x: torch.Tensor, flip: bool
) -> tuple[torch.Tensor, float]:
    """max |folded(x) - reference(x)| (a device scalar) and the time ratio reference/folded.

    ``flip`` runs the folded model first: alternating the order, a drift in the
    machine's speed (another process, a clock change) falls on both models alike.
    """
    if flip:
        out_folded, t_folded = _timed(folded, x)
        out_reference, t_reference = _timed(reference, x)
    else:
        out_reference, t_reference = _timed(reference, x)
        out_folded, t_folded = _timed(folded, x)
    diff = (out_folded.float() - out_reference.float()).abs().max()
    return diff, t_reference / t_folded


@torch.no_grad()
def fold_report(
    model: nn.Module,
    x_test: torch.Tensor,
    evaluate: Callable[[nn.Module], tuple[float, float]],
    *,
    repeats: int = 5,
) -> dict[str, Any] | None:
    """Fold ``model``'s BatchNorms and report what the folded model does on the test set.

    Works on copies: ``model`` keeps its training mode (every submodule's), parameters,
    buffers, gradients and hooks. The unfolded reference is an eval-mode copy of
    ``model`` without its hooks; the folded one is ``fold_batchnorm`` of it. Both run
    in the model's own dtype, outside any autocast, under ``torch.no_grad``.

    Cost, for a run's end: ``evaluate`` once, and one forward pass of each model over
    ``x_test`` in chunks of 256 rows, which both compares their outputs and times them.
    The first chunk warms the models up untimed; each further chunk is one paired
    timing, at batch size 256 (the last chunk may be smaller). A test set of fewer
    than ``repeats`` + 1 chunks is topped up with timings of its first chunk, so a
    tiny test set costs at most ``repeats`` more small passes.

    Args:
        model: the trained model, in any mode, on ``x_test``'s device.
        x_test: the test inputs, as the model reads them.
        evaluate: the trainer's test evaluation, called once on the folded model (which
            it may leave in any mode); returns (test loss, test accuracy), the accuracy
            NaN for a regression task.
        repeats: the fewest paired timings the speedup is the median of.

    Returns:
        None when ``batchnorm_pairs`` finds no BatchNorm to fold (norm=none, or only
        norms that read no Linear/Conv output, like resmlp's block norms). Otherwise a
        dict of plain Python numbers:

        - ``folded``: BatchNorms folded into the layer before them.
        - ``remaining``: BatchNorms left in the folded model (they run in eval mode).
        - ``loss/test``, ``acc/test``: ``evaluate`` of the folded model (acc NaN for
          regression).
        - ``max_abs_diff``: max |folded(x) - model.eval()(x)| over every output of
          every row of ``x_test``; NaN or inf where an output is not finite.
        - ``speedup``: unfolded / folded forward time per chunk, the median over the
          paired timings (above 1: the folded model is faster); NaN for an empty
          ``x_test``.

    Raises:
        ValueError: the model has BatchNorm layers but torch.fx cannot trace it.
    """
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return None  # norm=none: not even a copy
    # Traced and folded on the hook-free copy: torch.fx runs the hooks of the modules it
    # traces through, on Proxy outputs that a telemetry hook cannot read.
    reference = _copy_without_hooks(model).eval()
    pairs = batchnorm_pairs(reference)
    if not pairs:
        return None
    folded = fold_batchnorm(reference)
    remaining = sum(isinstance(m, _BatchNorm) for m in folded.modules())

    # The largest difference stays on the device until the end (a synchronization per
    # chunk is the timings' own, on CUDA). torch.maximum propagates NaN: a diverged
    # model's non-finite output shows.
    chunks = x_test.split(_CHUNK) if len(x_test) else ()  # split: one empty chunk
    worst = torch.full((), 0.0 if chunks else math.nan, device=x_test.device)
    ratios = []
    for i, xb in enumerate(chunks):
        diff, ratio = _paired(reference, folded, xb, flip=i % 2 == 1)
        worst = torch.maximum(worst, diff)
        if i:  # the first chunk pays first-call allocations and cuDNN's algorithm choice
            ratios.append(ratio)
    while chunks and len(ratios) < repeats:
        ratios.append(_paired(reference, folded, chunks[0], flip=len(ratios) % 2 == 1)[1])
    speedup = statistics.median(ratios) if ratios else math.nan

    loss, acc = evaluate(folded)
    return {
        "folded": len(pairs),
        "remaining": remaining,
        "loss/test": float(loss),
        "acc/test": float(acc),
        "max_abs_diff": float(worst),
        "speedup": float(speedup),
    }
