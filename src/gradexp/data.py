"""Tasks, generated on the device from a seed or loaded from bundled data; no download."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradexp.config import DataConfig, DigitsDataConfig, SyntheticDataConfig
from gradexp.errors import ConfigError
from gradexp.registry import Registry


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its task."""

    input_shape: tuple[int, ...]
    num_classes: int


@dataclass
class Dataset:
    """A classification task held on the device: train and test tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def spec(self) -> DataSpec:
        return DataSpec(tuple(self.x_train.shape[1:]), self.num_classes)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """A random training batch, drawn with replacement on the data's device."""
        idx = torch.randint(
            len(self.x_train), (batch_size,), generator=generator, device=self.x_train.device
        )
        return self.x_train[idx], self.y_train[idx]


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
    y = mode % cfg.classes
    k = cfg.n_train
    return Dataset(x[:k], y[:k], x[k:], y[k:], cfg.classes)


@DATASETS.decorate("digits")
def digits(cfg: DataConfig, device: torch.device) -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits, standardized, split by ``data.seed``."""
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
    test, train = perm[:n_test], perm[n_test:]
    x, y = x.to(device), y.to(device)
    return Dataset(x[train], y[train], x[test], y[test], 10)


def load_data(cfg: DataConfig, device: torch.device) -> Dataset:
    return DATASETS.get(cfg.name)(cfg, device)
