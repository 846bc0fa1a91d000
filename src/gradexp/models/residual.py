"""Residual nets: resnet (basic blocks), resmlp (pre-activation MLP), nfnet (normalizer-free).

A skip connection gives the gradient a path around every block's activations: the
backward signal reaching block i is the sum of the identity's and the branches'.
Each whole block, shortcut included, is one depth layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from gradexp.config import (
    ActivationConfig,
    Config,
    InitConfig,
    NFNetConfig,
    NormConfig,
    ResMLPConfig,
    ResNetConfig,
)
from gradexp.data import DataSpec
from gradexp.layers import (
    WS_EPS,
    WSConv2d,
    activation_gamma,
    create_act,
    create_conv,
    create_norm,
    create_norm2d,
)
from gradexp.models import MODELS
from gradexp.models.cnn import conv_block
from gradexp.models.mlp import Block


def stage_plan(blocks: list[int], width: int) -> Iterator[tuple[int, int, int]]:
    """(in_channels, out_channels, stride) of every block, stage by stage.

    Stage s has width * 2^s channels; its first block halves the resolution, except in
    the first stage, which keeps the stem's.
    """
    in_channels = width
    for s, n in enumerate(blocks):
        out_channels = width * 2**s
        for j in range(n):
            yield in_channels, out_channels, 2 if s > 0 and j == 0 else 1
            in_channels = out_channels


def conv_bias(norm: NormConfig) -> bool:
    """Convs keep a bias only without a norm layer after them (the norm removes the mean)."""
    return norm.name in ("none", "weight_std")


def _zero_(*params: torch.Tensor | None) -> None:
    with torch.no_grad():
        for p in params:
            if p is not None:
                p.zero_()


# --- resnet ----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """act(norm(conv3x3(act(norm(conv3x3(x))))) + shortcut(x)), He et al. 2016.

    The shortcut is the identity, or a strided 1x1 conv and norm where the block changes
    resolution or channels.
    """

    def __init__(self, cfg: Config, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        norm, bias = cfg.norm, conv_bias(cfg.norm)
        self.conv1 = create_conv(norm, in_channels, out_channels, 3, stride, bias=bias)
        self.norm1 = create_norm2d(norm, out_channels)
        self.act1 = create_act(cfg.activation, out_channels)
        self.conv2 = create_conv(norm, out_channels, out_channels, 3, 1, bias=bias)
        self.norm2 = create_norm2d(norm, out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                create_conv(norm, in_channels, out_channels, 1, stride, bias=bias),
                create_norm2d(norm, out_channels),
            )
        self.act2 = create_act(cfg.activation, out_channels)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.branch(x) + self.shortcut(x))

    def zero_last(self) -> None:
        """Make the branch output zero: the block starts as act(shortcut(x)) (Goyal et al. 2017).

        Zeroes the last norm's gain, or without a norm layer the last conv: its weight and
        bias, or the gain of a weight-standardized conv (whose zeroed weight would be
        standardized by eps alone).
        """
        if getattr(self.norm2, "weight", None) is not None:
            _zero_(self.norm2.weight)
        elif isinstance(self.conv2, WSConv2d):
            _zero_(self.conv2.gain, self.conv2.bias)
        else:
            _zero_(self.conv2.weight, self.conv2.bias)


class ConvResidualNet(nn.Module):
    """A stem, residual blocks in stages, a global average pool and a ``head``."""

    def __init__(
        self, stem: nn.Module, blocks: list[nn.Module], out_features: int, zero_init_last: bool
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(blocks[-1].conv2.out_channels, out_features)
        self.zero_init_last = zero_init_last

    def depth_layers(self) -> list[tuple[str, nn.Module]]:
        layers = [("stem", self.stem)] + [(f"blocks.{i}", b) for i, b in enumerate(self.blocks)]
        return layers + [("head", self.head)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


class ResNet(ConvResidualNet):
    """A stem conv block, basic blocks in stages, a global average pool and a ``head``."""

    @classmethod
    def from_config(cls, cfg: Config, spec: DataSpec) -> ResNet:
        m = cfg.model
        assert isinstance(m, ResNetConfig)
        stem = conv_block(cfg, spec.input_shape[0], m.width, 3, 1, conv_bias(cfg.norm))
        blocks = [BasicBlock(cfg, *plan) for plan in stage_plan(m.blocks, m.width)]
        return cls(stem, blocks, spec.out_features, m.zero_init_last)

    def post_init(self, init_cfg: InitConfig, act_cfg: ActivationConfig) -> list[str]:
        if not self.zero_init_last:
            return []
        for block in self.blocks:
            block.zero_last()
        return [f"zero_init_last: {len(self.blocks)} blocks start as their shortcut"]


# --- resmlp ----------------------------------------------------------------------------------


class PreActBlock(nn.Module):
    """h + Linear(act(norm(h))): a pre-activation residual block on vectors."""

    def __init__(self, norm: nn.Module, act: nn.Module, linear: nn.Linear) -> None:
        super().__init__()
        self.norm, self.act, self.linear = norm, act, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(self.act(self.norm(x)))


class ResMLP(nn.Module):
    """A first layer (``stem``), depth - 1 pre-activation blocks, a linear ``head``.

    As many weight layers as an MLP of the same depth, so the two compare on one task.
    """

    def __init__(
        self,
        stem: Block,
        blocks: list[PreActBlock],
        out_features: int,
        bias: bool = True,
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(stem.linear.out_features, out_features, bias=bias)
        self.zero_init_last = zero_init_last

    @classmethod
    def from_config(cls, cfg: Config, spec: DataSpec) -> ResMLP:
        """Any task: images and sequences are flattened."""
        m = cfg.model
        assert isinstance(m, ResMLPConfig)
        stem = Block(
            nn.Linear(math.prod(spec.input_shape), m.width, bias=m.bias),
            create_norm(cfg.norm, m.width),
            create_act(cfg.activation, m.width),
        )
        blocks = [
            PreActBlock(
                create_norm(cfg.norm, m.width),
                create_act(cfg.activation, m.width),
                nn.Linear(m.width, m.width, bias=m.bias),
            )
            for _ in range(m.depth - 1)
        ]
        return cls(stem, blocks, spec.out_features, m.bias, m.zero_init_last)

    def post_init(self, init_cfg: InitConfig, act_cfg: ActivationConfig) -> list[str]:
        if not self.zero_init_last or not self.blocks:
            return []
        for block in self.blocks:
            _zero_(block.linear.weight, block.linear.bias)
        return [f"zero_init_last: {len(self.blocks)} blocks start as the identity"]

    def depth_layers(self) -> list[tuple[str, nn.Module]]:
        layers = [("stem", self.stem)] + [(f"blocks.{i}", b) for i, b in enumerate(self.blocks)]
        return layers + [("head", self.head)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.flatten(1))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# --- nfnet -----------------------------------------------------------------------------------


class NFBlock(nn.Module):
    """A normalizer-free residual block (Brock et al. 2021): h + alpha * f(h / beta).

    f(h / beta) = WSConv3x3(act(WSConv3x3(act(h / beta) * gamma)) * gamma). With
    beta = sqrt(Var[h]) the branch sees a unit-variance input, and gamma scales the
    activation back to unit variance, so Var[f] = 1 at init and the block output's
    expected variance is Var[h] + alpha^2. A transition block (stride or channels
    change) takes its shortcut through a 1x1 WSConv of the same scaled activation, which
    resets the variance to 1 + alpha^2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        alpha: float,
        beta: float,
        gamma: float,
        act_cfg: ActivationConfig,
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.act1 = create_act(act_cfg, in_channels)
        self.conv1 = WSConv2d(in_channels, out_channels, 3, stride, padding=1, eps=WS_EPS)
        self.act2 = create_act(act_cfg, out_channels)
        self.conv2 = WSConv2d(out_channels, out_channels, 3, 1, padding=1, eps=WS_EPS)
        self.shortcut: WSConv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = WSConv2d(in_channels, out_channels, 1, stride, eps=WS_EPS)

    @property
    def transition(self) -> bool:
        return self.shortcut is not None

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        """act(x / beta) * gamma: unit variance for a block input of variance beta^2.

        For (leaky) ReLU this equals act(x) * gamma / beta, the form of the reference
        code; dividing first also keeps saturating activations (tanh) at unit variance.
        """
        return self.act1(x / self.beta) * self.gamma

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """The residual branch on the scaled activation h, before alpha."""
        return self.conv2(self.act2(self.conv1(h)) * self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.preact(x)
        shortcut = x if self.shortcut is None else self.shortcut(h)
        return shortcut + self.alpha * self.branch(h)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta:.4f}, gamma={self.gamma:.4f}"


class NFNet(ConvResidualNet):
    """An NF-ResNet: a WSConv stem, NF blocks in stages, a global average pool, a ``head``.

    No normalization layers; train it with clip=agc.
    """

    @classmethod
    def from_config(cls, cfg: Config, spec: DataSpec) -> NFNet:
        m = cfg.model
        assert isinstance(m, NFNetConfig)
        gamma = activation_gamma(cfg.activation)
        # The stem is a conv alone, as in the reference NF-ResNet: every block begins with
        # its own scaled activation, and a unit-variance, zero-mean image gives a
        # unit-variance, zero-mean stem output (an activation there would add a mean).
        stem = WSConv2d(spec.input_shape[0], m.width, 3, padding=1, eps=WS_EPS)
        blocks, var = [], 1.0
        for in_channels, out_channels, stride in stage_plan(m.blocks, m.width):
            block = NFBlock(
                in_channels, out_channels, stride, m.alpha, math.sqrt(var), gamma, cfg.activation
            )
            var = (1.0 if block.transition else var) + m.alpha**2
            blocks.append(block)
        return cls(stem, blocks, spec.out_features, m.zero_init_last)

    def post_init(self, init_cfg: InitConfig, act_cfg: ActivationConfig) -> list[str]:
        if not self.zero_init_last:
            return []
        for block in self.blocks:
            _zero_(block.conv2.gain)
        return [f"zero_init_last: the branches of {len(self.blocks)} blocks start at zero"]


MODELS.register("resnet", ResNet.from_config)
MODELS.register("resmlp", ResMLP.from_config)
MODELS.register("nfnet", NFNet.from_config)
