"""Per-layer gradient, weight and signal statistics, computed beside the model.

Everything here returns device tensors; the trainer brings a logging step's
numbers to the host in one transfer. Nothing is attached to the model between
logging steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass
class LayerMap:
    """A model's parameters grouped by depth layer, input to output.

    Attributes:
        tags: per-layer tag suffix, zero-padded index + module name ("00_hidden.0").
        modules: the layer modules, whose outputs are the signals h.
        params: every trainable parameter, in layer order.
        param_names: their qualified names.
        layer_of: the layer of each parameter.
        index: the same, as a device tensor for index_add.
    """

    tags: list[str]
    modules: list[nn.Module]
    params: list[nn.Parameter]
    param_names: list[str]
    layer_of: list[int]
    index: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module) -> LayerMap:
        layers = model.depth_layers()
        width = max(2, len(str(len(layers) - 1)))
        tags = [f"{i:0{width}d}_{name}" for i, (name, _) in enumerate(layers)]
        owner = {}
        for i, (name, module) in enumerate(layers):
            for pname, p in module.named_parameters(prefix=name):
                owner[id(p)] = (i, pname)
        params, names, layer_of = [], [], []
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) not in owner:
                raise ValueError(f"parameter {pname} belongs to no depth layer")
            layer_of.append(owner[id(p)][0])
            params.append(p)
            names.append(pname)
        device = params[0].device
        index = torch.tensor(layer_of, device=device)
        return cls(tags, [m for _, m in layers], params, names, layer_of, index)

    def __len__(self) -> int:
        return len(self.tags)

    def grads(self) -> list[torch.Tensor]:
        """Each parameter's gradient (zeros for one that received none)."""
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def layer_sq_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Squared L2 norm of each layer's tensors taken together, shape (layers,), float64.

        The norms are taken in the tensors' dtype by one foreach kernel; float32 squares
        underflow for entries below ~1e-19, so the few norms under ``TINY`` (a vanished
        gradient) are taken again in float64, where they read as tiny numbers, not 0.
        (A float64 foreach norm costs ~25x the float32 one on CPU.)
        """
        norms = torch.stack(torch._foreach_norm(tensors)).double()
        tiny = (norms < TINY).nonzero().flatten().tolist()  # on log steps; CPU: free
        if tiny:
            exact = [torch.linalg.vector_norm(tensors[i], dtype=torch.float64) for i in tiny]
            norms[tiny] = torch.stack(exact)
        out = torch.zeros(len(self), device=norms.device, dtype=torch.float64)
        return out.index_add_(0, self.index, norms.square())


# Norms below this are recomputed in float64 (float32 squares of entries < ~1e-19 are 0).
TINY = 1e-15


class SignalProbe:
    """Records each layer's forward signal RMS(h) and backward signal, while entered.

    The backward signal of layer output h is the per-example RMS of dl_i/dh, with
    l_i example i's loss: for a batch-mean loss L that is B * dL/dh. A forward hook
    takes the norm of each output and puts a tensor hook on it for the norm of its
    gradient (module backward hooks break on in-place ops). Norms stay on the
    device; every hook is removed on exit.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.handles: list[RemovableHandle] = []
        n = len(modules)
        self.fwd: list[torch.Tensor | None] = [None] * n
        self.bwd: list[torch.Tensor | None] = [None] * n
        self.scale = [1.0] * n  # 1/sqrt(numel) per layer: norm -> RMS
        self.batch = [1.0] * n

    def __enter__(self) -> SignalProbe:
        for i, module in enumerate(self.modules):
            self.handles.append(module.register_forward_hook(self._forward_hook(i)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _forward_hook(self, i: int):
        def on_grad(grad: torch.Tensor) -> None:
            self.bwd[i] = torch.linalg.vector_norm(grad, dtype=torch.float64)

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.fwd[i] = torch.linalg.vector_norm(output.detach(), dtype=torch.float64)
            self.scale[i] = 1.0 / math.sqrt(output.numel())
            self.batch[i] = float(output.shape[0])
            if output.requires_grad:
                output.register_hook(on_grad)

        return hook

    def result(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward, backward) signal per layer, NaN where a layer was not reached."""
        # float64 throughout: a vanished backward signal stays a tiny number, not 0.
        nan = torch.tensor(math.nan, device=device, dtype=torch.float64)
        scale = torch.tensor(self.scale, device=device, dtype=torch.float64)
        fwd = torch.stack([nan if v is None else v for v in self.fwd]) * scale
        bwd = torch.stack([nan if v is None else v for v in self.bwd])
        return fwd, bwd * scale * torch.tensor(self.batch, device=device, dtype=torch.float64)


def sample_steps(steps: int, samples: int) -> list[int]:
    """``samples`` time steps spread evenly over 0..steps-1, first and last included
    (all of them for samples=0 or samples >= steps)."""
    if samples <= 0 or samples >= steps:
        return list(range(steps))
    if samples == 1:
        return [steps - 1]
    return sorted({round(i * (steps - 1) / (samples - 1)) for i in range(samples)})


class TimeProbe:
    """Records ||dL/dh_t||, the gradient that reaches each time step, while entered.

    For every traceable recurrent layer (``layer.trace``, see gradexp.models.recurrent)
    and each sampled step t, a tensor hook on h_t takes the norm of the whole gradient
    of the loss with respect to h_t, over batch and units: through the recurrence, the
    layer above and the head alike. A state the gradient never reaches (cut off by
    truncated BPTT) reads 0. Norms stay on the device; ``trace`` is reset on exit, so
    steps that do not log pay nothing.
    """

    def __init__(self, layers: list[nn.Module], samples: int) -> None:
        self.layers = layers
        self.samples = samples
        self.steps: list[list[int]] = [[] for _ in layers]
        self.norms: list[torch.Tensor | None] = [None] * len(layers)

    def __enter__(self) -> TimeProbe:
        for i, layer in enumerate(self.layers):
            layer.trace = self._tracer(i)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.trace = None

    def _tracer(self, i: int):
        slots: dict[int, int] = {}

        def record(k: int) -> Callable[[torch.Tensor], None]:
            def on_grad(grad: torch.Tensor) -> None:
                norms = self.norms[i]
                assert norms is not None
                # float64: a vanished gradient (entries < 1e-19) must not square to 0.
                norms[k] = torch.linalg.vector_norm(grad, dtype=torch.float64)

            return on_grad

        def trace(t: int, length: int, h: torch.Tensor) -> None:
            if t == 0:  # a new forward pass
                steps = sample_steps(length, self.samples)
                slots.clear()
                slots.update({s: k for k, s in enumerate(steps)})
                self.steps[i] = steps
                self.norms[i] = torch.zeros(len(steps), device=h.device, dtype=torch.float64)
            k = slots.get(t)
            if k is not None and h.requires_grad:
                h.register_hook(record(k))

        return trace

    def result(self) -> list[tuple[list[int], torch.Tensor]]:
        """(sampled steps, ||dL/dh_t|| at them) per layer; empty for a layer not run."""
        empty = torch.zeros(0)
        return [(steps, n if n is not None else empty) for steps, n in zip(self.steps, self.norms)]


HIST_BINS = 64


def histogram_stats(values: torch.Tensor, bins: int = HIST_BINS) -> torch.Tensor:
    """A histogram of the finite entries of ``values``, computed on the device.

    Returns one vector: [nonfinite count, count, min, max, sum, sum of squares,
    ``bins`` counts over equal-width bins from min to max]. TensorBoard's own
    histogram sorts on the host, which costs more than a training step; this is a
    few elementwise passes (no boolean-mask copy, no sort).
    """
    v = values.detach().float().flatten()
    finite = torch.isfinite(v)
    n = finite.sum()
    zero = torch.zeros((), device=v.device)
    lo = torch.where(finite, v, math.inf).min()
    hi = torch.where(finite, v, -math.inf).max()
    x = torch.where(finite, v, zero)
    scale = bins / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    # Non-finite entries go to an overflow bin that is dropped.
    idx = torch.where(finite, ((x - lo) * scale).long().clamp(0, bins - 1), bins)
    counts = torch.bincount(idx, minlength=bins + 1)[:bins].float()
    empty = n == 0
    head = torch.stack(
        [
            (v.numel() - n).float(),
            n.float(),
            torch.where(empty, zero, lo),
            torch.where(empty, zero, hi),
            x.sum(),
            x.square().sum(),
        ]
    )
    return torch.cat([head, counts])


def histogram_from_stats(stats: list[float]) -> dict[str, object] | None:
    """Decode histogram_stats on the host into add_histogram_raw's arguments (None if empty)."""
    count = int(stats[1])
    if count == 0:
        return None
    lo, hi, total, sq = stats[2:6]
    counts = stats[6:]
    bins = len(counts)
    width = (hi - lo) / bins
    limits = [lo + width * (i + 1) for i in range(bins)] if width > 0 else [hi]
    if width == 0:
        counts = [float(count)]
    return {
        "min": lo,
        "max": hi,
        "num": count,
        "sum": total,
        "sum_squares": sq,
        "bucket_limits": limits,
        "bucket_counts": counts,
    }
