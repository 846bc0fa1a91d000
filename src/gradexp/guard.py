"""The finite guard: decides, each step, whether a non-finite loss or gradient lets the
update go ahead, skips it, or stops the run; and says where it happened.

Its bookkeeping stays on the device, so a step need not synchronize: the first bad
step and which layers' gradients were non-finite then. On CPU a synchronization is
free, so it decides every step; on CUDA only on log steps (and every step under
on_nonfinite=skip, which must judge each update, as GradScaler does). With fp16 the
gradient scaler owns gradient overflow (it skips the step and lowers its scale), so
only the loss is judged.
"""

from __future__ import annotations

import enum
from typing import Any

import torch

from gradexp.telemetry import LayerMap


class Decision(enum.Enum):
    ok = "ok"
    skip = "skip"  # on_nonfinite=skip: drop this step's update
    stop = "stop"  # the run diverged: stop at ``FiniteGuard.nonfinite``


class FiniteGuard:
    """The first non-finite step of a run, and what to do about it.

    Args:
        layers: the model's depth layers (for the layer nearest the output that went bad).
        device: where the bookkeeping lives.
        skip: on_nonfinite=skip (else a bad step stops the run).
        every_step: decide every step (CPU, or skip mode) rather than on log steps only.
        scaler: fp16's gradient scaler is on (gradients are its business).
    """

    def __init__(
        self, layers: LayerMap, device: torch.device, *, skip: bool, every_step: bool, scaler: bool
    ) -> None:
        self.layers = layers
        self.skip_mode, self.every_step, self.scaler = skip, every_step, scaler
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_bad_layers = torch.zeros(len(layers), dtype=torch.bool, device=device)
        self.grads_checked = True  # whether the last step's gradients went through a check
        self.skipped = 0
        self.nonfinite: dict[str, Any] | None = None  # {"step", "layer"} once it stopped

    @property
    def needs_grad_norms(self) -> bool:
        """Whether every step's per-layer gradient norms are needed (skip mode judges
        each update on them); a log step takes them anyway."""
        return self.skip_mode

    def previous_step_bad(self, step: int, loss: torch.Tensor) -> bool:
        """Before backward: if this loss is non-finite after a step whose gradients were
        not checked, p.grad still holds those gradients; if they were non-finite, that
        step came first (as a check on every step would have said). True: stop there."""
        if not self.every_step or self.grads_checked or self.scaler:
            return False
        if bool(torch.isfinite(loss.detach())):
            return False
        prev_bad = ~torch.isfinite(self.layers.layer_sq_norms(self.layers.grads()))
        if bool(prev_bad.any()):
            self.nonfinite = self.locate(step - 1, prev_bad)
            return True
        return False

    def decide(
        self, step: int, loss: torch.Tensor, grad_sq: torch.Tensor | None, log: bool
    ) -> Decision:
        """After clipping, before the update: record a non-finite loss, or non-finite
        gradient norms (``grad_sq``, taken before clipping, when the step took them), and
        decide. Synchronizes only when deciding (CPU, skip mode, log steps)."""
        bad = ~torch.isfinite(loss.detach())
        self.grads_checked = grad_sq is not None and not self.scaler
        if self.grads_checked:
            layer_bad = ~torch.isfinite(grad_sq)
            bad = bad | layer_bad.any()
        newly = bad & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(newly, step, self.first_bad_step)
        if self.grads_checked:
            self.first_bad_layers = torch.where(newly, layer_bad, self.first_bad_layers)
        if not (self.every_step or log) or not bool(self.first_bad_step >= 0):
            return Decision.ok
        if self.skip_mode:
            if bool(bad):
                self.skipped += 1
                return Decision.skip
            return Decision.ok
        self.nonfinite = self.locate(int(self.first_bad_step), self.first_bad_layers)
        return Decision.stop

    def first(self) -> dict[str, Any] | None:
        """summary.json's ``nonfinite``: where the run stopped, or (skip mode) the first
        skipped step; None when every checked value was finite."""
        if self.nonfinite is None and int(self.first_bad_step) >= 0:
            return self.locate(int(self.first_bad_step), self.first_bad_layers)
        return self.nonfinite

    def locate(self, step: int, bad_layers: torch.Tensor) -> dict[str, Any]:
        """Step and layer of the first non-finite gradient, once a check has found one.

        Backprop runs output -> input, so the bad layer nearest the output is where the
        non-finite value was produced. When only the loss was checked at ``step`` (no
        per-layer record), the layers are read from the gradients present now.
        """
        hit = bad_layers.nonzero().flatten().tolist()
        if not hit:
            grads = self.layers.layer_sq_norms(self.layers.grads())
            hit = (~torch.isfinite(grads)).nonzero().flatten().tolist()
        layer = self.layers.names[max(hit)] if hit else None
        return {"step": step, "layer": layer}

    def state_dict(self) -> dict[str, Any]:
        return {
            "first_bad_step": self.first_bad_step,
            "first_bad_layers": self.first_bad_layers,
            "grads_checked": self.grads_checked,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.first_bad_step.device
        self.first_bad_step = state["first_bad_step"].to(device)
        self.first_bad_layers = state["first_bad_layers"].to(device)
        self.grads_checked, self.skipped = state["grads_checked"], state["skipped"]
