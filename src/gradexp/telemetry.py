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
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass
class LayerMap:
    """A model's parameters grouped by depth layer, input to output.

    Attributes:
        tags: per-layer tag suffix, zero-padded index + module name ("00_hidden.0").
        names: per-layer module name ("hidden.0").
        modules: the layer modules, whose outputs are the signals h.
        params: every trainable parameter, in layer order.
        param_names: their qualified names.
        layer_of: the layer of each parameter.
        index: the same, as a device tensor for index_add.
    """

    tags: list[str]
    names: list[str]
    modules: list[nn.Module]
    params: list[nn.Parameter]
    param_names: list[str]
    layer_of: list[int]
    index: torch.Tensor

    def sizes(self) -> list[int]:
        """Each layer's number of parameter entries."""
        out = [0] * len(self.names)
        for i, p in zip(self.layer_of, self.params):
            out[i] += p.numel()
        return out

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
        layer_names = [name for name, _ in layers]
        return cls(tags, layer_names, [m for _, m in layers], params, names, layer_of, index)

    def __len__(self) -> int:
        return len(self.tags)

    def grads(self) -> list[torch.Tensor]:
        """Each parameter's gradient (zeros for one that received none)."""
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def layer_sq_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Squared L2 norm of each layer's tensors taken together, shape (layers,), float64
        (see ``norms``)."""
        norms = tensor_norms(tensors)
        out = torch.zeros(len(self), device=norms.device, dtype=torch.float64)
        return out.index_add_(0, self.index, norms.square())

    def flat_layer_grads(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each layer's gradient entries as one flat tensor."""
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.tags]
        for i, g in zip(self.layer_of, grads):
            per_layer[i].append(g.detach().flatten())
        empty = grads[0].new_zeros(0) if grads else torch.zeros(0)
        return [torch.cat(gs) if gs else empty for gs in per_layer]


def tensor_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each tensor, shape (len(tensors),), float64.

    The norms are taken in the tensors' dtype by one foreach kernel; float32 squares
    underflow for entries below ~1e-19, so the few norms under ``TINY`` (a vanished
    gradient) are taken again in float64, where they read as tiny numbers, not 0.
    (A float64 foreach norm costs ~25x the float32 one on CPU.)
    """
    norms = torch.stack(torch._foreach_norm(tensors)).double()
    # Tiny, huge (float32 squares overflow past ~1e19) or non-finite: again in float64.
    retake = (norms < TINY) | ~(norms < HUGE)
    tiny = retake.nonzero().flatten().tolist()  # on log steps; CPU: free
    if tiny:
        exact = [torch.linalg.vector_norm(tensors[i], dtype=torch.float64) for i in tiny]
        norms[tiny] = torch.stack(exact)
    return norms


# Norms below this are recomputed in float64 (float32 squares of entries < ~1e-19 are 0).
TINY = 1e-15
HUGE = 1e15


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
        # Only references here; ``result`` takes every norm in one foreach kernel.
        def on_grad(grad: torch.Tensor) -> None:
            self.bwd[i] = grad

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.fwd[i] = output.detach()
            self.scale[i] = 1.0 / math.sqrt(output.numel())
            self.batch[i] = float(output.shape[0])
            if output.requires_grad:
                output.register_hook(on_grad)

        return hook

    def result(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward, backward) signal per layer, NaN where a layer was not reached."""
        # float64 throughout: a vanished backward signal stays a tiny number, not 0.
        scale = torch.tensor(self.scale, device=device, dtype=torch.float64)
        fwd, bwd = (self._norms(values, device) for values in (self.fwd, self.bwd))
        self.fwd, self.bwd = [None] * len(self.fwd), [None] * len(self.bwd)
        return fwd * scale, bwd * scale * torch.tensor(
            self.batch, device=device, dtype=torch.float64
        )

    @staticmethod
    def _norms(values: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
        """The norm of each tensor (float64, see tensor_norms), NaN for a missing one."""
        out = torch.full((len(values),), math.nan, device=device, dtype=torch.float64)
        present = [i for i, v in enumerate(values) if v is not None]
        if present:
            out[present] = tensor_norms([values[i] for i in present]).to(device)  # type: ignore[misc]
        return out


# --- activation health ----------------------------------------------------------------
# A unit is saturated where the activation's derivative is below this share of its peak:
# sigmoid outputs below 0.0127 or above 0.9873 (|z| > 4.36), tanh |output| > 0.9747
# (|z| > 2.18). Both read from the output a: sigmoid' = a(1 - a), peak 1/4; tanh' = 1 - a^2.
SATURATION = 0.05
# Counted as outputs beyond the flat-region bounds, one comparison per entry:
# 4a(1 - a) < s <=> |a - 1/2| > sqrt(1/4 - s/4); 1 - a^2 < s <=> |a| > sqrt(1 - s).
# (count_nonzero: summing a boolean tensor costs about twice as much on CPU.)
_SATURATED: dict[type[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = {
    nn.Sigmoid: lambda a: torch.count_nonzero(
        (a - 0.5).abs() > math.sqrt(0.25 - SATURATION / 4)
    ).double(),
    nn.Tanh: lambda a: torch.count_nonzero(a.abs() > math.sqrt(1 - SATURATION)).double(),
}
# Activations whose unit can die (output 0, and for ReLU gradient 0, for every input).
_CAN_DIE = (nn.ReLU, nn.LeakyReLU, nn.RReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU)


def _saturated(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The saturated-count function of a saturating activation (a gated cell's gates too:
    layers.Gates is a Sigmoid), else None."""
    return next((f for kind, f in _SATURATED.items() if isinstance(module, kind)), None)


def _is_gate(module: nn.Module) -> bool:
    return getattr(module, "is_gate", False)


def activation_modules(layers: list[nn.Module]) -> list[tuple[int, nn.Module]]:
    """(depth layer index, module) of every activation inside each depth layer, a gated
    cell's gates (layers.Gates) included.

    A fused recurrent layer is left out: torch's kernel applies its nonlinearity itself.
    """
    kinds = (*_SATURATED, *_CAN_DIE)
    return [
        (i, m)
        for i, layer in enumerate(layers)
        if not getattr(layer, "fused", False)
        for m in layer.modules()
        if isinstance(m, kinds)
    ]


def health_quantities(acts: list[tuple[int, nn.Module]]) -> list[str]:
    """The activation-health quantities these activation modules can have."""
    units = [m for _, m in acts if not _is_gate(m)]
    out = ["act_mean", "act_std"] if units else []
    if any(_saturated(m) is not None for m in units):
        out.append("sat_frac")
    if any(isinstance(m, _CAN_DIE) for m in units):
        out.append("dead_frac")
    if len(units) < len(acts):
        out.append("gate_sat_frac")
    return out


class ActivationProbe:
    """Activation health per depth layer, while entered: mean, std, saturated share
    (sigmoid, tanh) and dead units (the ReLU family and the other unbounded ones).

    A unit is a feature of a (B, F) output or a channel of a (B, C, ...) map. It is dead
    in this batch when it outputs exactly 0 for every example (and every position and,
    in a recurrent layer, every time step). A forward hook on each activation module
    only keeps a reference to its output (autograd saves it for backward anyway); the
    statistics are taken in ``result``, once per module over all its calls (a recurrent
    layer calls its activation at every time step). Every hook is removed on exit. An
    activation that is not called (a fused recurrent layer) leaves its layer's
    statistics NaN.
    """

    def __init__(self, acts: list[tuple[int, nn.Module]], n_layers: int) -> None:
        self.acts = acts
        self.n_layers = n_layers
        self.handles: list[RemovableHandle] = []
        self.outputs: list[list[torch.Tensor]] = [[] for _ in acts]
        self.dead: list[torch.Tensor | None] = [None] * len(acts)

    def __enter__(self) -> ActivationProbe:
        for k, (_, module) in enumerate(self.acts):
            self.handles.append(module.register_forward_hook(self._hook(k)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, k: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.outputs[k].append(output.detach())

        return hook

    def result(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Per layer (NaN where not measured): act_mean, act_std, sat_frac, dead_frac."""
        n = self.n_layers
        f64 = {"device": device, "dtype": torch.float64}
        # Per layer: sum, sum of squares, saturated count (device, float64); entries,
        # saturating entries, units (host counts); dead units (device).
        total, sq, sat, dead, gate_sat = (torch.zeros(n, **f64) for _ in range(5))
        count, sat_count, units, gate_count = ([0.0] * n for _ in range(4))
        for k, ((i, module), outs) in enumerate(zip(self.acts, self.outputs)):
            if not outs:
                continue
            saturated = _saturated(module)
            if _is_gate(module):  # counted apart: saturated share only
                assert saturated is not None
                gates = torch.stack(outs)  # every gate of every time step: one count
                gate_sat[i] += saturated(gates)
                gate_count[i] += gates.numel()
                continue
            alive = None
            # One stack for all calls of the same shape: a recurrent layer's time steps.
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for out in outs:
                by_shape.setdefault(out.shape, []).append(out)
            for shape, same in by_shape.items():
                a = same[0].unsqueeze(0) if len(same) == 1 else torch.stack(same)
                # Reductions that accumulate in float64 without a float64 copy: a large
                # temporary costs more in page faults than the arithmetic (measured: 50
                # MLP layers of 128 x 256, 15 ms stacked and copied against 4.5 ms).
                total[i] += a.sum(dtype=torch.float64)
                sq[i] += torch.linalg.vector_norm(a, dtype=torch.float64).square()
                count[i] += a.numel()
                if saturated is not None:
                    sat[i] += saturated(a)
                    sat_count[i] += a.numel()
                if isinstance(module, _CAN_DIE):
                    unit = 1 + min(1, len(shape) - 1)  # features of (B, F), channels of maps
                    nonzero = (a != 0).any(dim=[d for d in range(a.dim()) if d != unit])
                    alive = nonzero if alive is None else alive | nonzero
            if alive is not None:
                self.dead[k] = ~alive
                dead[i] += self.dead[k].sum()
                units[i] += alive.numel()
        counts = torch.tensor([count, sat_count, units, gate_count], **f64)
        counts = torch.where(counts > 0, counts, math.nan)  # nothing measured: NaN, not 0/0
        n_all, sat_n, unit_n, gate_n = counts.unbind(0)
        mean = total / n_all
        var = (sq / n_all - mean.square()).clamp_min(0)
        return {
            "act_mean": mean,
            "act_std": var.sqrt(),
            "sat_frac": sat / sat_n,  # NaN: no saturating activation in the layer
            "dead_frac": dead / unit_n,
            "gate_sat_frac": gate_sat / gate_n,  # NaN: no gated cell in the layer
        }

    def dead_masks(self) -> list[torch.Tensor | None]:
        """Per activation module, the units dead in this batch (None: not measured);
        after ``result``."""
        return list(self.dead)


class DeadUnits:
    """Which units are dead for good: dead at every logging step since they last died,
    for at least ``sustain`` of them (all of them in a run with fewer logging steps).

    Device tensors per activation module, updated on logging steps: the length of each
    unit's current dead streak, whether it ever died, and whether it ever came back
    after dying.
    """

    def __init__(self, acts: list[tuple[int, nn.Module]], n_layers: int, sustain: int = 1) -> None:
        self.layer_of = [i for i, _ in acts]
        self.n_layers = n_layers
        self.sustain = sustain
        self.updates = [0] * len(acts)
        self.streak: list[torch.Tensor | None] = [None] * len(acts)
        self.died: list[torch.Tensor | None] = [None] * len(acts)
        self.recovered: list[torch.Tensor | None] = [None] * len(acts)

    def update(self, dead: list[torch.Tensor | None]) -> None:
        for k, now in enumerate(dead):
            if now is None:
                continue
            if self.streak[k] is None:
                self.streak[k] = torch.zeros(now.shape, dtype=torch.long, device=now.device)
                self.died[k], self.recovered[k] = torch.zeros_like(now), torch.zeros_like(now)
            self.recovered[k] |= self.died[k] & ~now
            self.died[k] |= now
            self.streak[k] = torch.where(now, self.streak[k] + 1, 0)
            self.updates[k] += 1

    def state(self) -> dict[str, Any]:
        """For a checkpoint."""
        return {k: getattr(self, k) for k in ("updates", "streak", "died", "recovered")}

    def load_state(self, state: dict[str, Any], device: torch.device) -> None:
        self.updates = list(state["updates"])
        for key in ("streak", "died", "recovered"):
            setattr(self, key, [None if v is None else v.to(device) for v in state[key]])

    def result(self) -> list[dict[str, float] | None]:
        """Per layer: shares of its units that ever died, came back after dying, and are
        dead for good (``never_recovered``)."""
        counts = [[0, 0, 0, 0] for _ in range(self.n_layers)]  # units, ever, back, never
        seen = [False] * self.n_layers
        for k, i in enumerate(self.layer_of):
            streak, died, back = self.streak[k], self.died[k], self.recovered[k]
            if streak is None or died is None or back is None:
                continue
            seen[i] = True
            need = min(self.sustain, self.updates[k])
            c = counts[i]
            c[0] += died.numel()
            c[1] += int(died.sum())
            c[2] += int(back.sum())
            c[3] += int((streak >= need).sum())
        return [
            {"ever": ever / n, "recovered": back / n, "never_recovered": never / n}
            if ok and n
            else None
            for ok, (n, ever, back, never) in zip(seen, counts)
        ]


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


def histogram_stats(
    values: torch.Tensor, bins: int = HIST_BINS, log10_abs: bool = False
) -> torch.Tensor:
    """A histogram of the finite entries of ``values``, computed on the device; with
    ``log10_abs``, of log10 |entry| over the finite non-zero entries (a gradient's entries
    span decades; on a linear axis every layer is one spike at 0).

    Returns one vector: [nonfinite count, count, min, max, sum, sum of squares,
    ``bins`` counts over equal-width bins from min to max] (count and the rest over the
    histogrammed values). TensorBoard's own histogram sorts on the host, which costs more
    than a training step; this is a few elementwise passes (no boolean-mask copy, no sort).
    """
    v = values.detach().float().flatten()
    finite = torch.isfinite(v)
    nonfinite = (v.numel() - finite.sum()).float()
    if log10_abs:
        a = v.abs()
        finite = finite & (a > 0)  # log10 0 is -inf: exact zeros are left out
        v = torch.where(finite, a, 1.0).log10()
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
            nonfinite,
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
