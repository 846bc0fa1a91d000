"""Recurrent nets: Elman RNN, IRNN, LSTM and GRU, unrolled step by step or fused.

Each layer owns a one-layer ``torch.nn.RNN``/``LSTM``/``GRU`` whose parameters
serve both paths. ``fused=true`` calls it (cuDNN on a GPU). The default unrolls
the same cell in Python with the same weights, so that every hidden state h_t
is a tensor of its own: the telemetry can then measure ||dL/dh_t||, the gradient
that reaches each time step (``trace``), the activation can be any of the
activation group, and a layer norm can sit inside the cell. A pass that nothing
measures per time step (no trace, no activation hook: every step but the logging
ones) takes the fused kernel whenever it computes the same cell (tanh, or an Elman
ReLU, and no norm inside): the same function, several times faster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradexp.config import ActivationConfig, Config, InitConfig, IRNNConfig, LSTMConfig
from gradexp.data import DataSpec
from gradexp.layers import Gates, create_act
from gradexp.models import MODELS

CELLS: dict[str, type[nn.RNNBase]] = {
    "rnn": nn.RNN,
    "irnn": nn.RNN,
    "lstm": nn.LSTM,
    "gru": nn.GRU,
}
GATES = {"rnn": 1, "irnn": 1, "lstm": 4, "gru": 3}

# trace(t, T, h_t): called with each hidden state of an unrolled forward pass of length T.
Trace = Callable[[int, int, torch.Tensor], None]


class RecurrentLayer(nn.Module):
    """One recurrent layer over a whole sequence: (B, T, in) -> (B, T, H).

    Args:
        kind: rnn, irnn, lstm or gru.
        act: the Elman nonlinearity; for LSTM and GRU the candidate's (and the LSTM
            output's), their gates being sigmoids.
        layer_norm: eps of a layer norm inside the cell, or None. Elman:
            act(LN(W_ih x + W_hh h + b)). LSTM and GRU after Ba et al. 2016: the input
            and recurrent projections normalized apart, LSTM's cell state before its
            output nonlinearity too.
        tbptt: detach the state every ``tbptt`` steps (0: never).
    """

    def __init__(
        self,
        kind: str,
        input_size: int,
        hidden_size: int,
        act: nn.Module,
        *,
        bias: bool = True,
        layer_norm: float | None = None,
        fused: bool = False,
        tbptt: int = 0,
    ) -> None:
        super().__init__()
        self.kind, self.hidden_size = kind, hidden_size
        extra = {"nonlinearity": "relu" if isinstance(act, nn.ReLU) else "tanh"}
        cell = CELLS[kind]
        kwargs = extra if cell is nn.RNN else {}
        self.cell = cell(input_size, hidden_size, bias=bias, batch_first=True, **kwargs)
        self.act = act
        self.gates = Gates() if GATES[kind] > 1 else None
        self.fused, self.tbptt = fused, tbptt
        n = GATES[kind] * hidden_size
        if layer_norm is None:
            self.norm_x = self.norm_h = self.norm_c = None
        elif GATES[kind] == 1:
            self.norm_x = nn.LayerNorm(hidden_size, eps=layer_norm)
            self.norm_h = self.norm_c = None
        else:
            self.norm_x = nn.LayerNorm(n, eps=layer_norm)
            self.norm_h = nn.LayerNorm(n, eps=layer_norm)
            self.norm_c = nn.LayerNorm(hidden_size, eps=layer_norm) if kind == "lstm" else None
        self.trace: Trace | None = None
        self.unroll = False  # run the unrolled cell even where the fused one would do

    @property
    def traceable(self) -> bool:
        """Whether forward passes its hidden states to ``trace`` (not when fused)."""
        return not self.fused

    @property
    def fusable(self) -> bool:
        """Whether torch's fused kernel computes this very cell: the nonlinearity it
        applies itself (tanh; ReLU for an Elman cell) and no layer norm inside."""
        kernel = (
            nn.ReLU
            if isinstance(self.cell, nn.RNN) and self.cell.nonlinearity == "relu"
            else nn.Tanh
        )
        return self.norm_x is None and type(self.act) is kernel

    def watched(self) -> bool:
        """Whether this pass is measured per time step: its states traced, or its
        activation or gates hooked (activation health)."""
        hooked = [m for m in (self.act, self.gates) if m is not None and m._forward_hooks]
        return self.trace is not None or bool(hooked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.unroll and (self.fused or (self.fusable and not self.watched())):
            return self._fused(x)
        return self._unrolled(x)

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        k = self.tbptt or x.shape[1]
        outs, state = [], None
        for chunk in x.split(k, dim=1):
            out, state = self.cell(chunk, state)
            outs.append(out)
            state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        return torch.cat(outs, dim=1)

    def _unrolled(self, x: torch.Tensor) -> torch.Tensor:
        cell = self.cell
        w_ih, w_hh = cell.weight_ih_l0, cell.weight_hh_l0
        b_ih = cell.bias_ih_l0 if cell.bias else None
        b_hh = cell.bias_hh_l0 if cell.bias else None
        batch, steps, _ = x.shape
        # The input projections of all time steps in one matmul; the loop is the recurrence.
        gx = F.linear(x, w_ih, b_ih)
        if self.norm_x is not None and self.kind not in ("rnn", "irnn"):
            gx = self.norm_x(gx)
        h = x.new_zeros(batch, self.hidden_size)
        c = x.new_zeros(batch, self.hidden_size) if self.kind == "lstm" else None
        outs = []
        # unbind, not gx[:, t]: each slice's backward would fill a zero tensor of gx's size.
        gxs = gx.unbind(1)
        for t in range(steps):
            if self.tbptt and t and t % self.tbptt == 0:
                h = h.detach()
                c = c.detach() if c is not None else None
            gh = F.linear(h, w_hh, b_hh)
            if self.norm_h is not None:
                gh = self.norm_h(gh)
            h, c = self._step(gxs[t], gh, h, c)
            if self.trace is not None:
                self.trace(t, steps, h)
            outs.append(h)
        return torch.stack(outs, dim=1)

    def _step(
        self, gx: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kind == "lstm":  # torch's gate order: input, forget, cell, output
            i, f, g, o = (gx + gh).chunk(4, dim=1)
            assert c is not None and self.gates is not None
            c = self.gates(f) * c + self.gates(i) * self.act(g)
            cn = self.norm_c(c) if self.norm_c is not None else c
            return self.gates(o) * self.act(cn), c
        if self.kind == "gru":  # reset, update, new; the reset gate scales W_hn h + b_hn
            xr, xz, xn = gx.chunk(3, dim=1)
            hr, hz, hn = gh.chunk(3, dim=1)
            assert self.gates is not None
            r, z = self.gates(xr + hr), self.gates(xz + hz)
            n = self.act(xn + r * hn)
            return n + z * (h - n), None
        pre = gx + gh
        if self.norm_x is not None:
            pre = self.norm_x(pre)
        return self.act(pre), None


class RecurrentNet(nn.Module):
    """Recurrent layers, then a linear head on the last ``outputs`` hidden states.

    Images are read as sequences: row by row (H steps of C*W values) or pixel by
    pixel (H*W steps of C values, the small cousin of pixel-MNIST).
    """

    def __init__(
        self, layers: list[RecurrentLayer], head: nn.Linear, outputs: int, config: Any
    ) -> None:
        super().__init__()
        self.recurrent = nn.ModuleList(layers)
        self.head = head
        self.outputs = outputs
        self.config = config  # the model's RecurrentConfig, read by post_init

    @classmethod
    def from_config(cls, cfg: Config, spec: DataSpec) -> RecurrentNet:
        m = cfg.model
        _, features = sequence_shape(spec.input_shape, m.read)
        layer_norm = cfg.norm.eps if cfg.norm.name == "layer" else None
        sizes = [features] + [m.hidden_size] * m.layers
        layers = [
            RecurrentLayer(
                m.name,
                n_in,
                m.hidden_size,
                create_act(cfg.activation, m.hidden_size),
                bias=m.bias,
                layer_norm=layer_norm,
                fused=m.fused,
                tbptt=cfg.trainer.tbptt,
            )
            for n_in in sizes[:-1]
        ]
        head = nn.Linear(m.hidden_size, spec.num_classes, bias=m.bias)
        return cls(layers, head, spec.outputs, m)

    def depth_stack(self) -> tuple[int, int]:
        """The depth layers a depth verdict compares: the recurrent stack's first and last
        (the head's own scale is no depth; one recurrent layer has none to judge)."""
        return 0, len(self.recurrent) - 1

    def depth_layers(self) -> list[tuple[str, nn.Module]]:
        layers = [(f"recurrent.{i}", layer) for i, layer in enumerate(self.recurrent)]
        return layers + [("head", self.head)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = as_sequence(x, self.config.read)
        for layer in self.recurrent:
            x = layer(x)
        return self.head(x[:, -self.outputs :]).flatten(1)

    @torch.no_grad()
    def post_init(self, init: InitConfig, act: ActivationConfig) -> list[str]:
        """The recurrent matrices, LSTM's forget bias, IRNN's whole init."""
        m = self.config
        notes = []
        for layer in self.recurrent:
            gates = GATES[m.name]
            blocks = layer.cell.weight_hh_l0.chunk(gates)
            for w in blocks:
                if m.recurrent_init == "identity":
                    nn.init.eye_(w).mul_(m.recurrent_scale)
                elif m.recurrent_init == "orthogonal":
                    nn.init.orthogonal_(w, gain=m.recurrent_scale)
                elif m.recurrent_init == "normal":
                    nn.init.normal_(w, 0.0, m.recurrent_std)
            if isinstance(m, IRNNConfig):
                nn.init.normal_(layer.cell.weight_ih_l0, 0.0, m.input_std)
                if m.bias:
                    nn.init.zeros_(layer.cell.bias_ih_l0)
                    nn.init.zeros_(layer.cell.bias_hh_l0)
            if isinstance(m, LSTMConfig) and m.bias:
                h = m.hidden_size  # gate order i, f, g, o; the forget bias is b_ih + b_hh
                layer.cell.bias_ih_l0[h : 2 * h] = m.forget_bias
                layer.cell.bias_hh_l0[h : 2 * h] = 0.0
        recurrent = {
            "same": f"init={init.name}",
            "identity": f"identity x {m.recurrent_scale}",
            "orthogonal": f"orthogonal, gain {m.recurrent_scale}",
            "normal": f"N(0, {m.recurrent_std}^2)",
        }[m.recurrent_init]
        if isinstance(m, IRNNConfig):
            nn.init.normal_(self.head.weight, 0.0, m.input_std)
            if self.head.bias is not None:
                nn.init.zeros_(self.head.bias)
            used = "for W_hh only" if m.recurrent_init == "same" else "not used"
            notes.append(
                f"model=irnn: recurrent matrices {recurrent}, input and output weights"
                f" N(0, {m.input_std}^2), biases 0 (init={init.name} {used})"
            )
        elif m.recurrent_init != "same":
            notes.append(f"model.recurrent_init={m.recurrent_init}: W_hh {recurrent} per gate")
        if isinstance(m, LSTMConfig) and m.bias:
            notes.append(f"model.forget_bias={m.forget_bias}: LSTM forget-gate bias")
        if m.fused:
            notes.append("model.fused=true: torch's fused cell, no per-time-step telemetry")
        return notes


def sequence_shape(input_shape: tuple[int, ...], read: str) -> tuple[int, int]:
    """(T, features) of a task's examples read as sequences."""
    if len(input_shape) == 3:
        c, h, w = input_shape
        return (h, c * w) if read == "rows" else (h * w, c)
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1]
    raise ValueError(f"recurrent models read sequences or images, not shape {input_shape}")


def as_sequence(images: torch.Tensor, read: str) -> torch.Tensor:
    """(B, C, H, W) images as (B, T, F) sequences: rows (T=H) or pixels (T=H*W)."""
    b, c, h, w = images.shape
    if read == "rows":
        return images.permute(0, 2, 1, 3).reshape(b, h, c * w)
    return images.flatten(2).transpose(1, 2)


for _name in CELLS:
    MODELS.register(_name, RecurrentNet.from_config)
