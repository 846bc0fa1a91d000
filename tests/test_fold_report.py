"""fold_report: what a norm=batch run reports at its end, checked against a fold by hand."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import composed
from gradexp import fold
from gradexp.data import DataSpec
from gradexp.fold import fold_report
from gradexp.models import create_model
from test_fold import PAIRS, trained

pytestmark = pytest.mark.usefixtures("one_thread")

FOLDED = {"mlp": (3, 0), "resmlp": (1, 2), "cnn": (3, 0), "resnet": (6, 0)}  # folded, left


def held_out(shape: tuple[int, ...], n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs off the training distribution's centre, so every layer's statistics matter."""
    g = torch.Generator().manual_seed(3)
    return 1.2 * torch.randn(n, *shape, generator=g) + 0.3, torch.randint(4, (n,), generator=g)


def evaluator(x: torch.Tensor, y: torch.Tensor):
    """A test evaluation as the trainer's: eval mode, mean cross-entropy and accuracy.

    Records the modules it was called on; leaves them in eval mode, as the trainer's
    own may leave a module in another mode than it found it.
    """
    calls: list[nn.Module] = []

    @torch.no_grad()
    def evaluate(model: nn.Module) -> tuple[float, float]:
        calls.append(model)
        out = model.eval()(x)
        return F.cross_entropy(out, y).item(), (out.argmax(-1) == y).double().mean().item()

    return evaluate, calls


def hand_folded(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """An eval-mode copy with W' = gamma W / sigma, b' = gamma (b - mu) / sigma + beta.

    In the model's float32, in the formula's order; each BatchNorm named in ``pairs``
    (the test's own list, not ``batchnorm_pairs``) becomes Identity.
    """
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for layer_name, bn_name in pairs:
            layer, bn = folded.get_submodule(layer_name), folded.get_submodule(bn_name)
            gamma, beta, mu = bn.weight, bn.bias, bn.running_mean
            sigma = torch.sqrt(bn.running_var + bn.eps)
            w = layer.weight
            b = layer.bias if layer.bias is not None else torch.zeros_like(mu)
            per_channel = (-1,) + (1,) * (w.dim() - 1)  # out channels first: Linear and Conv
            new_w = gamma.view(per_channel) * w / sigma.view(per_channel)
            new_b = gamma * (b - mu) / sigma + beta
            layer.weight.copy_(new_w)
            layer.bias = nn.Parameter(new_b)
            parent, _, child = bn_name.rpartition(".")
            setattr(folded.get_submodule(parent), child, nn.Identity())
    return folded


def snap_statistics(model: nn.Module) -> None:
    """Each running variance to its nearest power of 4, and eps to 0.

    Then sigma = sqrt(var + eps) and 1 / sigma are powers of 2, and multiplying or
    dividing by them is exact in float32: torch's fusion, which multiplies by
    gamma * rsqrt(var + eps), and the formula, gamma W / sigma, round the same products
    and sums the same way, so both folds, and their outputs, agree bit for bit. The output
    difference from the unfolded model -- rounding noise, which a fold computed in
    another order would change -- becomes a number an independent computation can
    reproduce exactly. The means, gains, shifts and weights stay the trained ones.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eps = 0.0
                m.running_var.copy_(4.0 ** torch.round(torch.log(m.running_var) / math.log(4)))


def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


@pytest.mark.parametrize("name", list(FOLDED))
def test_max_abs_diff_is_the_difference_from_a_hand_fold(name):
    model, shape = trained(name)
    snap_statistics(model)
    x, y = held_out(shape)
    evaluate, _ = evaluator(x, y)

    report = fold_report(model, x, evaluate)

    assert report is not None
    assert (report["folded"], report["remaining"]) == FOLDED[name]
    expected = max_abs_diff(copy.deepcopy(model).eval(), hand_folded(model, PAIRS[name]), x)
    assert expected > 0  # rounding noise, not nothing: the comparison below means something
    assert report["max_abs_diff"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_report_on_trained_statistics(name):
    model, shape = trained(name)
    x, y = held_out(shape)
    evaluate, calls = evaluator(x, y)
    training = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())

    report = fold_report(model, x, evaluate, repeats=3)

    assert report is not None
    json.dumps(report, allow_nan=False)  # plain numbers, all finite for a classifier
    assert isinstance(report["folded"], int) and isinstance(report["remaining"], int)
    assert all(type(report[k]) is float for k in report if k not in ("folded", "remaining"))
    # the model is as it was
    assert [m.training for m in model.modules()] == training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

    # evaluate ran once, on the folded model, not on the model
    assert len(calls) == 1 and calls[0] is not model
    assert not any(isinstance(m, _BatchNorm) for m in calls[0].modules())

    # float32 rounding of outputs of order 1-10, and what a fold by the formula gives
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        scale = reference(x).abs().max().item()
    expected = max_abs_diff(reference, hand_folded(model, PAIRS[name]), x)
    assert expected < 1e-5 * scale
    assert 0 < report["max_abs_diff"] < 1e-5 * scale
    assert report["max_abs_diff"] == pytest.approx(expected, abs=2e-6 * scale)

    loss, acc = evaluate(copy.deepcopy(model))
    assert report["loss/test"] == pytest.approx(loss, rel=1e-5)
    # at most one example may flip, where two logits are within float32 rounding
    assert report["acc/test"] == pytest.approx(acc, abs=1 / len(x) + 1e-12)

    assert math.isfinite(report["speedup"]) and report["speedup"] > 0


def test_the_model_is_left_exactly_as_it_was():
    model, shape = trained("cnn")
    model.conv[1].eval()  # a mixed mode, restored module by module
    x, y = held_out(shape, 40)
    F.cross_entropy(model(x), y).backward()  # gradients, which stay
    calls = []
    model.conv[0].register_forward_hook(lambda *_: calls.append(1))
    training = [m.training for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]

    report = fold_report(model, x, evaluator(x, y)[0], repeats=2)

    assert report is not None
    assert calls == []  # the hook (telemetry) saw none of fold_report's passes
    assert [m.training for m in model.modules()] == training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    model(x)
    assert calls == [1]  # and it is still registered


@pytest.mark.parametrize(
    "model",
    [
        "norm=none",
        # the only BatchNorm normalizes the input: no layer before it to fold into
        nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 4)),
        nn.Sequential(nn.Linear(6, 4), nn.ReLU()),
    ],
    ids=["mlp-norm-none", "input-batchnorm", "no-batchnorm"],
)
def test_none_without_a_foldable_batchnorm(model):
    if isinstance(model, str):
        cfg = composed("data=synthetic", "data.features=6", "model.depth=3", model)
        model = create_model(cfg, DataSpec((6,), 4))
    x, y = held_out((6,), 20)
    evaluate, calls = evaluator(x, y)
    assert fold_report(model, x, evaluate) is None
    assert calls == []


class Marked(nn.Module):
    """The folded model, off by 0.25 on the rows whose first input exceeds 100."""

    def __init__(self, folded: nn.Module) -> None:
        super().__init__()
        self.folded = folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.folded(x) + 0.25 * (x[:, :1] > 100)


def test_every_chunk_is_compared_and_nan_accuracy_passes(monkeypatch):
    model, shape = trained("mlp")
    x, _ = held_out(shape, 100)
    x[-1, 0] = 1000.0  # the last row, in the last chunk
    monkeypatch.setattr(fold, "_CHUNK", 16)
    folding = fold.fold_batchnorm
    monkeypatch.setattr(fold, "fold_batchnorm", lambda m: Marked(folding(m)))

    report = fold_report(model, x, lambda m: (0.5, math.nan), repeats=1)

    assert report is not None
    assert report["max_abs_diff"] == pytest.approx(0.25, abs=1e-4)
    assert report["loss/test"] == 0.5 and math.isnan(report["acc/test"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda():
    model, shape = trained("resnet")
    model.cuda()
    x, y = (t.cuda() for t in held_out(shape))
    report = fold_report(model, x, evaluator(x, y)[0])
    assert report is not None and report["folded"] == 6
    assert report["max_abs_diff"] < 1e-3  # TF32 convolutions, if enabled, round coarser
    assert math.isfinite(report["speedup"]) and report["speedup"] > 0
    assert next(model.parameters()).is_cuda and model.training


@pytest.mark.parametrize("rows", [2048, 40, 0])
def test_one_pass_compares_and_times(monkeypatch, rows):
    """The comparison pass's chunks are the timings; a small test set is topped up."""
    model, shape = trained("mlp")
    x = torch.randn(rows, *shape)
    timed = fold._timed
    calls: list[tuple[bool, int]] = []

    def fake(m: nn.Module, xb: torch.Tensor) -> tuple[torch.Tensor, float]:
        out, _ = timed(m, xb)
        folded = not any(isinstance(b, _BatchNorm) for b in m.modules())
        calls.append((folded, len(xb)))
        return out, 2.0 if folded else 3.0

    monkeypatch.setattr(fold, "_timed", fake)
    report = fold_report(model, x, lambda m: (0.5, 0.25), repeats=5)

    assert report is not None
    # each model: every row once, in chunks of 256, then first-chunk timings if too few
    for folded in (False, True):
        assert [n for f, n in calls if f == folded] == {
            2048: [256] * 8,
            40: [40] * 6,
            0: [],
        }[rows]
    if rows:
        assert report["speedup"] == 1.5
    else:
        assert math.isnan(report["speedup"]) and math.isnan(report["max_abs_diff"])
