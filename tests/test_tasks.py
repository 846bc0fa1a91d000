"""gradexp.data's tasks against their definitions, and the CLI's model/task pairing errors.

The adding problem and the copy task are checked against the layouts their papers give
(and their docstrings state), the input-blind baselines against their closed forms.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from rich.console import Console

import gradexp
from conftest import describe, run_cli
from gradexp import config as C
from gradexp.data import Dataset, adding_problem, copy_task, load_data
from gradexp.train import run

CONFIG_DIR = Path(gradexp.__file__).parent / "configs"
CPU = torch.device("cpu")
C.register_configs()


@functools.cache
def composed(*overrides: str) -> C.Config:
    """The typed, validated config for these overrides (cached: compose is slow)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return C.to_config(cfg)


def data_cfg(name: str, **values) -> C.DataConfig:
    return dataclasses.replace(composed(f"data={name}").data, **values)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the adding problem -------------------------------------------------------------------


@pytest.mark.parametrize("length", [2, 7, 10, 20])
def test_adding_problem_layout(length):
    n = 2000
    x, y = adding_problem(length, n, gen(3))
    assert x.shape == (n, length, 2) and y.shape == (n,)
    values, markers = x[..., 0], x[..., 1]
    half = length // 2
    assert set(markers.unique().tolist()) <= {0.0, 1.0}
    # exactly one marker in steps 0..T//2-1 and one in T//2..T-1
    assert (markers[:, :half].sum(1) == 1).all()
    assert (markers[:, half:].sum(1) == 1).all()
    assert ((values >= 0) & (values <= 1)).all()
    vals, marks = values.tolist(), markers.tolist()
    expected = [sum(v for v, m in zip(vals[i], marks[i]) if m == 1) for i in range(n)]
    torch.testing.assert_close(y, torch.tensor(expected))
    # every position of each half gets marked sometimes (the markers are uniform)
    first = markers[:, :half].argmax(1)
    second = markers[:, half:].argmax(1)
    assert set(first.tolist()) == set(range(half))
    assert set(second.tolist()) == set(range(length - half))


def test_adding_problem_constant_predictor_scores_one_sixth():
    # Var(U1 + U2) = 2/12: predicting the mean 1 scores 1/6, the task's baseline.
    x, y = adding_problem(30, 10_000, gen(0))
    mse = F.mse_loss(torch.ones_like(y), y).item()
    assert mse == pytest.approx(1 / 6, abs=0.01)
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)


def test_adding_dataset_baseline_and_loss():
    data = load_data(data_cfg("adding", length=12, n_train=4000, n_test=500), CPU)
    assert data.baseline == pytest.approx(1 / 6, rel=1e-12)
    spec = data.spec
    assert spec.regression and spec.kind == "sequence"
    assert spec.input_shape == (12, 2) and spec.out_features == 1
    assert data.x_train.shape == (4000, 12, 2) and data.x_test.shape == (500, 12, 2)
    # Dataset.loss is the MSE of (B, 1) outputs against (B,) targets
    ones = torch.ones(len(data.y_train), 1)
    assert data.loss(ones, data.y_train).item() == pytest.approx(1 / 6, abs=0.01)
    exact = data.y_train[:, None].clone()
    assert data.loss(exact, data.y_train).item() == 0.0
    summed = data.loss(ones, data.y_train, reduction="sum").item()
    assert summed == pytest.approx(((1 - data.y_train) ** 2).sum().item(), rel=1e-5)
    assert data.correct(ones, data.y_train) is None


class Recorder:
    """A MetricLogger that keeps every scalar."""

    def __init__(self) -> None:
        self.values: dict[str, list[tuple[int, float]]] = {}

    def scalars(self, values, step):
        for k, v in values.items():
            self.values.setdefault(k, []).append((step, v))

    def histogram(self, tag, hist, step):
        pass

    def text(self, tag, text, step):
        pass

    def hparams(self, hparams, metric_tags):
        pass

    def image(self, tag, image, step):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def test_train_logs_the_adding_baseline_and_no_accuracy(tmp_path):
    cfg = composed(
        "model=rnn",
        "model.hidden_size=4",
        "data.length=6",
        "data.n_train=32",
        "data.n_test=16",
        "trainer.steps=3",
        "trainer.batch_size=8",
        "trainer.log_every=1",
        "trainer.progress=off",
        "trainer.device=cpu",
    )
    rec = Recorder()
    summary = run(cfg, tmp_path, logger=rec, console=Console(file=io.StringIO()))
    assert summary["status"] == "completed"
    assert [s for s, _ in rec.values["loss/baseline"]] == [0, 1, 2]
    for _, v in rec.values["loss/baseline"]:
        assert v == pytest.approx(1 / 6, rel=1e-6)
    assert summary["metrics"]["loss/baseline"] == pytest.approx(1 / 6, rel=1e-6)
    assert not [k for k in rec.values if k.startswith("acc/")]
    assert not [k for k in summary["metrics"] if k.startswith("acc/")]
    assert math.isfinite(summary["metrics"]["loss/test"])


# --- the copy task --------------------------------------------------------------------------


@pytest.mark.parametrize(("symbols", "length", "delay"), [(4, 3, 5), (8, 5, 1), (2, 1, 2)])
def test_copy_task_layout(symbols, length, delay):
    n = 64
    x, y = copy_task(symbols, length, delay, n, gen(1))
    steps = 2 * length + delay
    assert x.shape == (n, steps, symbols + 2) and y.shape == (n, length)
    assert x.dtype == torch.float32 and y.dtype == torch.long
    # one-hot: every step is exactly one of symbols + blank + go
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert (x.sum(-1) == 1).all()
    seq = x.argmax(-1)
    blank, go = symbols, symbols + 1
    assert ((y >= 0) & (y < symbols)).all()
    assert torch.equal(seq[:, :length], y)
    for t in range(length, steps):
        expected = go if t == length + delay - 1 else blank
        assert (seq[:, t] == expected).all(), t
    assert set(y.flatten().tolist()) == set(range(symbols))  # every symbol is drawn


def test_copy_dataset_loss_accuracy_and_baseline():
    symbols, length = 6, 4
    data = load_data(
        data_cfg("copy", symbols=symbols, length=length, delay=3, n_train=2000, n_test=100), CPU
    )
    spec = data.spec
    assert spec.kind == "sequence" and not spec.regression
    assert spec.input_shape == (2 * length + 3, symbols + 2)
    assert (spec.num_classes, spec.outputs, spec.out_features) == (
        symbols,
        length,
        length * symbols,
    )
    y = data.y_train[:50]
    # a perfect predictor: logits from the targets, output k is the k-th recalled symbol
    perfect = 30.0 * F.one_hot(y, symbols).float().flatten(1)
    assert perfect.shape == (50, length * symbols)
    assert data.loss(perfect, y).item() == pytest.approx(0.0, abs=1e-6)
    assert data.correct(perfect, y).item() == 50 * length
    # the same logits, one symbol out of place: exactly those predictions are wrong
    shifted = 30.0 * F.one_hot((y + 1) % symbols, symbols).float().flatten(1)
    assert data.correct(shifted, y).item() == 0
    partial = perfect.clone()
    partial[:, :symbols] = shifted[:, :symbols]  # the first recalled symbol wrong
    assert data.correct(partial, y).item() == 50 * (length - 1)
    # uniform logits: ln(symbols) per prediction, whatever the scale
    uniform = torch.full((50, length * symbols), 3.0)
    assert data.loss(uniform, y).item() == pytest.approx(math.log(symbols), rel=1e-6)
    # the baseline is the label entropy, ~ln(symbols) for uniform symbols
    assert data.baseline == pytest.approx(math.log(symbols), abs=0.01)
    assert data.baseline <= math.log(symbols) + 1e-9


# --- images ---------------------------------------------------------------------------------


def test_synthetic_images_are_shifted_copies_of_one_template_per_class():
    shift, size, channels, classes = 1, 8, 2, 3
    cfg = data_cfg(
        "synthetic_images",
        size=size,
        channels=channels,
        classes=classes,
        noise=0.0,
        shift=shift,
        n_train=150,
        n_test=30,
    )
    data = load_data(cfg, CPU)
    assert data.x_train.shape == (150, channels, size, size)
    assert data.x_test.shape == (30, channels, size, size)
    assert data.spec.input_shape == (channels, size, size) and data.spec.kind == "image"
    x = torch.cat([data.x_train, data.x_test])
    y = torch.cat([data.y_train, data.y_test])
    assert set(y.tolist()) == set(range(classes))
    rolls = [(a, b) for a in range(-shift, shift + 1) for b in range(-shift, shift + 1)]
    templates = []
    for c in range(classes):
        members = x[y == c]
        # the template is the member every other member is a roll of (by at most `shift`)
        found = None
        for candidate in members:
            shifted = torch.stack([torch.roll(candidate, r, dims=(-2, -1)) for r in rolls])
            dist = (members[:, None] - shifted[None]).abs().flatten(2).amax(-1)  # (n, rolls)
            if (dist.amin(1) < 1e-5).all():
                found = candidate
                break
        assert found is not None, f"class {c}: no member of which all are rolls within {shift}"
        templates.append(found)
        # noise=0: every example is a standardized template, moved
        flat = members.flatten(1)
        torch.testing.assert_close(flat.mean(1), torch.zeros(len(flat)), atol=1e-5, rtol=0)
        torch.testing.assert_close(flat.std(1), torch.ones(len(flat)), atol=1e-5, rtol=0)
    # the classes' templates differ, under every roll
    for i in range(classes):
        for j in range(i + 1, classes):
            for r in rolls:
                assert (templates[i] - torch.roll(templates[j], r, dims=(-2, -1))).abs().max() > 0.1


def test_synthetic_images_with_noise_are_standardized():
    cfg = data_cfg("synthetic_images", size=8, noise=0.5, n_train=400, n_test=100)
    data = load_data(cfg, CPU)
    assert data.x_train.shape == (400, 1, 8, 8)
    assert abs(data.x_train.mean().item()) < 0.1
    assert data.x_train.std().item() == pytest.approx(1.0, abs=0.1)
    # noise: no longer exact rolls, and not degenerate
    assert data.x_train.flatten(1).std(1).min() > 0.5
    assert data.y_train.max().item() < cfg.classes


def test_digits_are_8x8_images():
    pytest.importorskip("sklearn")
    data = load_data(data_cfg("digits"), CPU)
    assert data.x_train.shape[1:] == (1, 8, 8) and data.spec.input_shape == (1, 8, 8)
    assert data.spec.kind == "image" and data.num_classes == 10
    assert len(data.x_train) + len(data.x_test) == 1797
    assert len(data.x_test) == round(1797 * 0.2)
    x = torch.cat([data.x_train, data.x_test])
    assert abs(x.mean().item()) < 1e-4 and x.std().item() == pytest.approx(1.0, abs=1e-4)
    assert set(data.y_train.tolist()) == set(range(10))
    assert data.baseline == pytest.approx(math.log(10), abs=0.01)


# --- determinism ----------------------------------------------------------------------------

SEEDED = [
    ("adding", {"length": 8, "n_train": 64, "n_test": 16}),
    ("copy", {"length": 3, "delay": 4, "n_train": 64, "n_test": 16}),
    ("synthetic_images", {"size": 8, "n_train": 64, "n_test": 16}),
    ("synthetic", {"features": 6, "n_train": 64, "n_test": 16}),
    ("digits", {}),
]


def tensors(data: Dataset) -> list[torch.Tensor]:
    return [data.x_train, data.y_train, data.x_test, data.y_test]


@pytest.mark.parametrize(("name", "values"), SEEDED, ids=[n for n, _ in SEEDED])
def test_data_seed_determines_the_data(name, values):
    a = load_data(data_cfg(name, seed=7, **values), CPU)
    b = load_data(data_cfg(name, seed=7, **values), CPU)
    c = load_data(data_cfg(name, seed=8, **values), CPU)
    for ta, tb in zip(tensors(a), tensors(b), strict=True):
        assert torch.equal(ta, tb)
    assert a.baseline == b.baseline
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.x_test, c.x_test)


def test_generators_depend_only_on_their_seed():
    x1, y1 = adding_problem(10, 32, gen(5))
    x2, y2 = adding_problem(10, 32, gen(5))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(adding_problem(10, 32, gen(6))[0], x1)
    a = copy_task(4, 3, 2, 32, gen(5))
    b = copy_task(4, 3, 2, 32, gen(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(copy_task(4, 3, 2, 32, gen(6))[1], a[1])


# --- model/task pairing errors, through the CLI ----------------------------------------------

PAIRING = [
    pytest.param(
        ["model=cnn", "data=adding"],
        ["model=cnn", "data=adding", "sequence", "rnn", "lstm", "gru", "mlp"],
        id="cnn-on-adding",
    ),
    pytest.param(
        ["model=rnn", "norm=batch"], ["norm=batch", "model=rnn", "none, layer"], id="rnn-batch-norm"
    ),
    pytest.param(
        ["model=lstm", "model.fused=true", "activation=relu"],
        ["activation=relu", "model.fused=true", "tanh", "model.fused=false"],
        id="fused-lstm-relu",
    ),
    pytest.param(
        ["trainer.tbptt=3"],
        ["trainer.tbptt=3", "model=mlp", "rnn, irnn, lstm, gru"],
        id="tbptt-on-mlp",
    ),
]


@pytest.mark.parametrize(("bad", "fragments"), PAIRING)
def test_pairing_errors_fail_in_one_line(tmp_path, bad, fragments):
    run_dir = tmp_path / "run"
    proc = run_cli(["train", *bad, "trainer.steps=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode != 0, describe(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, describe(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), describe(proc)
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert not run_dir.exists(), "a rejected command must leave no run directory"
    assert not (tmp_path / "outputs").exists()


def test_chance_is_the_best_input_blind_guess():
    data = load_data(data_cfg("synthetic", n_train=512, n_test=64), CPU)
    counts = torch.bincount(data.y_train, minlength=data.num_classes)
    assert data.chance == pytest.approx(counts.max().item() / 512)
    # always guessing that label scores it on the training set
    guess = torch.zeros(512, data.num_classes)
    guess[:, counts.argmax()] = 1.0
    assert data.correct(guess, data.y_train).item() / 512 == pytest.approx(data.chance)
    assert load_data(data_cfg("adding", length=4, n_train=64, n_test=8), CPU).chance is None
