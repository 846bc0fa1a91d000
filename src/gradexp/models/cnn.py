"""A plain deep conv net: depth x (conv -> norm -> activation), global average pool, head."""

from __future__ import annotations

import torch
from torch import nn

from gradexp.config import CNNConfig, Config
from gradexp.data import DataSpec
from gradexp.layers import create_act, create_conv, create_norm2d
from gradexp.models import MODELS


class ConvBlock(nn.Module):
    """One depth step on images: conv, normalization (before the activation), activation."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm, self.act = conv, norm, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def conv_block(
    cfg: Config, in_channels: int, out_channels: int, kernel_size: int, stride: int, bias: bool
) -> ConvBlock:
    """conv(kernel_size, stride) -> norm -> activation, as ``cfg``'s norm and activation say.

    norm=weight_std standardizes the conv's weight and adds no norm layer.
    """
    return ConvBlock(
        create_conv(cfg.norm, in_channels, out_channels, kernel_size, stride, bias=bias),
        create_norm2d(cfg.norm, out_channels),
        create_act(cfg.activation, out_channels),
    )


class CNN(nn.Module):
    """Conv blocks, a global average pool and a linear classifier ``head``."""

    def __init__(self, blocks: list[ConvBlock], out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.ModuleList(blocks)
        self.head = nn.Linear(blocks[-1].conv.out_channels, out_features, bias=bias)

    @classmethod
    def from_config(cls, cfg: Config, spec: DataSpec) -> CNN:
        """Image tasks: (B, C, H, W); stride 2 at the layers in ``model.downsample``."""
        m = cfg.model
        assert isinstance(m, CNNConfig)
        in_channels = spec.input_shape[0]
        blocks = [
            conv_block(
                cfg,
                in_channels if i == 0 else m.channels,
                m.channels,
                m.kernel_size,
                2 if i in m.downsample else 1,
                m.bias,
            )
            for i in range(m.depth)
        ]
        return cls(blocks, spec.out_features, bias=m.bias)

    def depth_layers(self) -> list[tuple[str, nn.Module]]:
        layers = [(f"conv.{i}", b) for i, b in enumerate(self.conv)]
        return layers + [("head", self.head)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.conv:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


MODELS.register("cnn", CNN.from_config)
