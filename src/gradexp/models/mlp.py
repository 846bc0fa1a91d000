"""A deep feed-forward net: depth x (Linear -> norm -> activation), then a linear head."""

from __future__ import annotations

import math

import torch
from torch import nn

from gradexp.config import Config
from gradexp.data import DataSpec
from gradexp.layers import create_act, create_norm
from gradexp.models import MODELS


class Block(nn.Module):
    """One depth step: Linear, normalization (before the activation), activation."""

    def __init__(self, linear: nn.Linear, norm: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.linear, self.norm, self.act = linear, norm, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.linear(x)))


class MLP(nn.Module):
    def __init__(self, hidden: list[Block], out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(hidden)
        self.head = nn.Linear(hidden[-1].linear.out_features, out_features, bias=bias)

    @classmethod
    def from_config(cls, cfg: Config, spec: DataSpec) -> MLP:
        """Any task: images and sequences are flattened."""
        m = cfg.model
        in_features = math.prod(spec.input_shape)
        sizes = [in_features] + [m.width] * m.depth
        blocks = [
            Block(
                nn.Linear(n_in, n_out, bias=m.bias),
                create_norm(cfg.norm, n_out),
                create_act(cfg.activation, n_out),
            )
            for n_in, n_out in zip(sizes[:-1], sizes[1:])
        ]
        return cls(blocks, spec.out_features, bias=m.bias)

    def depth_layers(self) -> list[tuple[str, nn.Module]]:
        layers = [(f"hidden.{i}", b) for i, b in enumerate(self.hidden)]
        return layers + [("head", self.head)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # images and sequences: one vector per example
        for block in self.hidden:
            x = block(x)
        return self.head(x)


MODELS.register("mlp", MLP.from_config)
