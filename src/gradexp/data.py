"""Tasks, generated on the device from a seed or loaded from bundled data; no download.

A task is its train and test tensors plus what a model and the trainer need to
know about it (``DataSpec``): the input shape and kind (vector, image, sequence),
the outputs to predict, and the loss. Every model emits ``(B, spec.out_features)``;
the task reads that as one prediction (classes or one regression value) or, for
the copy task, one prediction per recalled symbol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradexp.config import (
    AddingDataConfig,
    CopyDataConfig,
    DataConfig,
    DigitsDataConfig,
    SyntheticDataConfig,
    SyntheticImagesDataConfig,
)
from gradexp.errors import ConfigError
from gradexp.registry import Registry


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its task.

    Attributes:
        input_shape: one example's shape: (F,), (C, H, W) or (T, F).
        num_classes: classes per prediction; 1 for a regression target.
        kind: "vector", "image" or "sequence".
        outputs: predictions per example (the copy task: one per recalled symbol), made
            at the last ``outputs`` time steps by recurrent models.
        regression: MSE on one real target instead of cross-entropy.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    kind: str = "vector"
    outputs: int = 1
    regression: bool = False

    @property
    def out_features(self) -> int:
        return self.num_classes * self.outputs


@dataclass
class Dataset:
    """A task held on the device: train and test tensors, its spec and loss.

    ``baseline`` is the loss of the best predictor that ignores the input: the
    constant mean for a regression target (the adding problem's 1/6), the label
    frequencies for classification. A model above it has learned nothing.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    spec: DataSpec
    baseline: float

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def chance(self) -> float | None:
        """The accuracy of the best input-blind guess (the most frequent training label);
        None for a regression target."""
        if self.spec.regression:
            return None
        counts = torch.bincount(self.y_train.flatten(), minlength=self.spec.num_classes)
        return float(counts.max() / counts.sum())

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """A random training batch, drawn with replacement on the data's device."""
        idx = torch.randint(
            len(self.x_train), (batch_size,), generator=generator, device=self.x_train.device
        )
        return self.x_train[idx], self.y_train[idx]

    def loss(self, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Mean (or summed) loss of model outputs ``(B, out_features)`` per prediction."""
        if self.spec.regression:
            return F.mse_loss(out.reshape(y.shape), y, reduction=reduction)
        logits = out.reshape(-1, self.spec.num_classes)
        return F.cross_entropy(logits, y.reshape(-1), reduction=reduction)

    def correct(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Correct predictions, summed over the batch (None for a regression target)."""
        if self.spec.regression:
            return None
        pred = out.reshape(-1, self.spec.num_classes).argmax(-1)
        return (pred == y.reshape(-1)).sum()


def label_entropy(y: torch.Tensor, num_classes: int) -> float:
    """Cross-entropy of predicting the label frequencies: the input-blind baseline."""
    p = torch.bincount(y.flatten(), minlength=num_classes).double() / y.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def classification(
    x: torch.Tensor, y: torch.Tensor, n_train: int, num_classes: int, kind: str
) -> Dataset:
    spec = DataSpec(tuple(x.shape[1:]), num_classes, kind)
    baseline = label_entropy(y[:n_train], num_classes)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], spec, baseline)


DATASETS: Registry = Registry("data")


@DATASETS.decorate("synthetic")
def synthetic(cfg: DataConfig, device: torch.device) -> Dataset:
    """A Gaussian mixture: each class is ``modes`` random centres in R^features plus noise.

    With several modes per class the classes are not linearly separable, yet a
    healthy deep net learns them to high accuracy in a few hundred SGD steps.
    Features have unit variance on average.
    """
    assert isinstance(cfg, SyntheticDataConfig)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    n = cfg.n_train + cfg.n_test
    centres = torch.randn(cfg.classes * cfg.modes, cfg.features, generator=g, device=device)
    mode = torch.randint(len(centres), (n,), generator=g, device=device)
    noise = torch.randn(n, cfg.features, generator=g, device=device)
    x = (centres[mode] + cfg.noise * noise) / (1 + cfg.noise**2) ** 0.5
    return classification(x, mode % cfg.classes, cfg.n_train, cfg.classes, "vector")


@DATASETS.decorate("digits")
def digits(cfg: DataConfig, device: torch.device) -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits as (1, 8, 8) images, standardized."""
    assert isinstance(cfg, DigitsDataConfig)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("data=digits needs scikit-learn: pip install 'gradexp[digits]'") from None
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.long)
    x = (x - x.mean()) / x.std()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    n_test = round(len(x) * cfg.test_fraction)
    order = torch.cat([perm[n_test:], perm[:n_test]])  # train first
    return classification(x[order].to(device), y[order].to(device), len(x) - n_test, 10, "image")


@DATASETS.decorate("synthetic_images")
def synthetic_images(cfg: DataConfig, device: torch.device) -> Dataset:
    """Shifted, noisy copies of one smooth random template per class.

    Each template is Gaussian noise on a 4x4 grid, upsampled bicubically to
    ``size`` x ``size`` and standardized; an example is its class's template rolled
    by up to ``shift`` pixels on each axis plus N(0, noise^2) pixel noise, so a
    translation-equivariant net has the edge a plain MLP lacks.
    """
    assert isinstance(cfg, SyntheticImagesDataConfig)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    n, s = cfg.n_train + cfg.n_test, cfg.size
    coarse = torch.randn(cfg.classes, cfg.channels, 4, 4, generator=g, device=device)
    templates = F.interpolate(coarse, size=(s, s), mode="bicubic", align_corners=False)
    flat = templates.flatten(1)
    templates = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).view_as(templates)
    y = torch.randint(cfg.classes, (n,), generator=g, device=device)
    shifts = torch.randint(-cfg.shift, cfg.shift + 1, (n, 2), generator=g, device=device)
    # Roll by gathering: row r of example i reads row (r - shift_i) mod size.
    grid = torch.arange(s, device=device)
    rows = (grid[None, :] - shifts[:, :1]) % s  # (n, s)
    cols = (grid[None, :] - shifts[:, 1:]) % s
    x = templates[y]
    x = x.gather(2, rows[:, None, :, None].expand(n, cfg.channels, s, s))
    x = x.gather(3, cols[:, None, None, :].expand(n, cfg.channels, s, s))
    noise = torch.randn(x.shape, generator=g, device=device)
    x = (x + cfg.noise * noise) / math.sqrt(1 + cfg.noise**2)
    return classification(x, y, cfg.n_train, cfg.classes, "image")


def adding_problem(length: int, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """n adding-problem sequences (n, T, 2) and their targets (n,).

    Channel 0 holds U[0, 1] values, channel 1 is 1 at exactly one step in each half
    of the sequence (first half: steps 0..T//2-1) and 0 elsewhere; the target is the
    sum of the two marked values.
    """
    device = generator.device
    values = torch.rand(n, length, generator=generator, device=device)
    half = length // 2
    first = torch.randint(half, (n,), generator=generator, device=device)
    second = half + torch.randint(length - half, (n,), generator=generator, device=device)
    markers = torch.zeros(n, length, device=device)
    rows = torch.arange(n, device=device)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    target = values[rows, first] + values[rows, second]
    return torch.stack([values, markers], dim=2), target


@DATASETS.decorate("adding")
def adding(cfg: DataConfig, device: torch.device) -> Dataset:
    """The adding problem, MSE loss; baseline Var(U1 + U2) = 1/6 (predicting 1)."""
    assert isinstance(cfg, AddingDataConfig)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    x, y = adding_problem(cfg.length, cfg.n_train + cfg.n_test, g)
    k = cfg.n_train
    spec = DataSpec((cfg.length, 2), 1, "sequence", regression=True)
    return Dataset(x[:k], y[:k], x[k:], y[k:], spec, 1.0 / 6.0)


def copy_task(
    symbols: int, length: int, delay: int, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """n copy-task sequences, one-hot (n, T, symbols + 2), and targets (n, length).

    Steps 0..length-1 show the symbols, then ``delay`` steps show the blank channel
    (``symbols``) with the go marker (channel ``symbols + 1``) on the last of them,
    then ``length`` blank steps in which the model recalls the symbols in order:
    T = 2 * length + delay.
    """
    device = generator.device
    target = torch.randint(symbols, (n, length), generator=generator, device=device)
    blank, go = symbols, symbols + 1
    seq = torch.full((n, 2 * length + delay), blank, device=device)
    seq[:, :length] = target
    seq[:, length + delay - 1] = go
    return F.one_hot(seq, symbols + 2).float(), target


@DATASETS.decorate("copy")
def copy(cfg: DataConfig, device: torch.device) -> Dataset:
    """The copy task; cross-entropy and accuracy per recalled symbol, baseline ln(symbols)."""
    assert isinstance(cfg, CopyDataConfig)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    x, y = copy_task(cfg.symbols, cfg.length, cfg.delay, cfg.n_train + cfg.n_test, g)
    k = cfg.n_train
    spec = DataSpec(tuple(x.shape[1:]), cfg.symbols, "sequence", outputs=cfg.length)
    return Dataset(x[:k], y[:k], x[k:], y[k:], spec, label_entropy(y[:k], cfg.symbols))


def load_data(cfg: DataConfig, device: torch.device) -> Dataset:
    return DATASETS.get(cfg.name)(cfg, device)
