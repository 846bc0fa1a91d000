"""optim=hessian_free in the trainer: the CLI end to end (terminal, summary.json,
TensorBoard), resuming bit-identically, batch norm's running statistics, the recurrent
layers' hidden states and the preconditioner's per-example gradients against
independent computations, and the settings refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY, composed, scalar_series, train
from gradexp.errors import ConfigError
from gradexp.hessian_free import HessianFree, flat, model_curvature
from gradexp.metrics import NullLogger
from gradexp.train import Trainer

HF = ("optim=hessian_free", "trainer.progress=off", "trainer.figure_every=0")
RNN = ("model=lstm", "data=adding", "data.length=6", "model.hidden_size=6",
       "data.n_train=64", "data.n_test=16", "trainer.batch_size=16")  # fmt: skip
HF_TAGS = ("hf/cg_iters", "hf/chosen_iter", "hf/damping", "hf/rate", "hf/predicted",
           "hf/actual", "hf/curvature_batch")  # fmt: skip


def test_a_hessian_free_run_end_to_end(tmp_path: Path) -> None:
    run = train(tmp_path, *TINY, *HF, "optim.curvature_batch=16").ok()
    out = run.proc.stdout
    assert "hessian-free: 6 steps, CG iterations median" in out
    hf = run.summary["hessian_free"]
    assert run.summary["options"]["optim"] == "hessian_free"
    assert hf["steps"] == 6 and hf["curvature_batch"] == 16
    assert 1 <= hf["cg_iters"]["median"] <= hf["cg_iters"]["max"] <= 250
    # each CG iteration is one product, plus one for the starting residual, per step
    assert hf["products"] == hf["cg_iters"]["total"] + 6
    assert hf["evaluations"] >= 6 - hf["rejected_steps"]
    for tag in HF_TAGS:
        # TINY's log steps: every 2nd, the hist and eval steps (3) and the last
        assert [s for s, _ in scalar_series(run.events, tag)] == [0, 2, 3, 4, 5], tag
    assert {v for _, v in scalar_series(run.events, "hf/curvature_batch")} == {16.0}
    damping = dict(scalar_series(run.events, "hf/damping"))
    assert damping[0] == pytest.approx(1.0)  # optim.damping, the first step's lambda
    assert hf["damping"]["first"] == 1.0
    for step, rate in scalar_series(run.events, "hf/rate"):
        assert 0.0 <= rate <= 1.0, step


def tiny_rnn(*extra: str):
    return composed(*RNN, *HF, "trainer.log_every=2", "optim.structural_damping=0.03", *extra)


def test_a_resumed_hessian_free_run_is_bit_identical(tmp_path: Path) -> None:
    """6 steps, stopped, then 6 more from the checkpoint: the parameters, lambda, the
    previous CG solution and every step's statistics equal those of 12 steps at once."""
    whole = Trainer(tiny_rnn("trainer.steps=12"), tmp_path / "whole", logger=NullLogger())
    whole.train()
    first = Trainer(tiny_rnn("trainer.steps=6"), tmp_path / "split", logger=NullLogger())
    first.train()
    cfg = tiny_rnn("trainer.steps=12", "trainer.resume=true")
    second = Trainer(cfg, tmp_path / "split", logger=NullLogger())
    assert second.step == 6
    result = second.train()
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    a, b = whole.optimizer.state_dict(), second.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]  # lambda among them
    for key, state in a["state"].items():
        assert torch.equal(state["cg_init"], b["state"][key]["cg_init"])
    assert result["hessian_free"] == whole.summary()["hessian_free"]
    assert result["hessian_free"]["steps"] == 12


def test_batch_norm_statistics_move_once_per_step(tmp_path: Path) -> None:
    """Under optim=hessian_free the line search evaluates the loss many times; the running
    statistics still take one update per step, the one the step's forward pass makes."""
    cfg = composed(*TINY, *HF, "norm=batch", "trainer.steps=1")
    trainer = Trainer(cfg, tmp_path, logger=NullLogger())
    twin = Trainer(cfg, tmp_path / "twin", logger=NullLogger())  # the same init and batch
    x, _ = twin.data.batch(cfg.trainer.batch_size, twin.batches)
    twin.model(x)  # one forward pass in train mode: one update of the statistics
    trainer.train()
    assert isinstance(trainer.optimizer, HessianFree)
    assert trainer.optimizer.last is not None and trainer.optimizer.last.evaluations >= 1
    ran = 0
    for (name, a), b in zip(trainer.model.named_buffers(), twin.model.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        ran += name.endswith("num_batches_tracked") and int(a) == 1
    assert ran == cfg.model.depth


def test_model_curvature_returns_the_outputs_and_every_hidden_state() -> None:
    """The curvature function of a fused LSTM (torch's kernel has no forward-mode
    derivative: it runs the unrolled cell) gives the model's own outputs and, for
    structural damping, each recurrent layer's hidden states, shaped (B, T, H)."""
    cfg = composed(*RNN, "optim=hessian_free", "model.fused=true", "model.layers=2")
    from gradexp.data import load_data
    from gradexp.models import create_model

    data = load_data(cfg.data, torch.device("cpu"))
    torch.manual_seed(0)
    model = create_model(cfg, data.spec)
    x = data.x_train[:5]
    params = list(model.parameters())
    curvature = model_curvature(model, params, x, classes=None, states=True)
    out, states = curvature.fn(*(p.detach() for p in params))
    torch.testing.assert_close(out, model(x))
    assert [s.shape for s in states] == [(5, 6, 6), (5, 6, 6)]
    torch.testing.assert_close(states[0], model.recurrent[0](x))
    torch.testing.assert_close(states[1], model.recurrent[1](states[0]))
    assert all(not layer.unroll for layer in model.recurrent)  # left as it was


@pytest.mark.parametrize("overrides", [RNN, ("model=mlp", "model.depth=2", "model.width=5")])
def test_preconditioner_sq_grads_match_per_example_backward(overrides) -> None:
    """The diagonal preconditioner's mean squared per-example gradient (torch.func.vmap)
    against one backward pass per example."""
    cfg = composed(*overrides, "data.n_train=64", "data.n_test=16")
    from gradexp.data import load_data
    from gradexp.models import create_model

    data = load_data(cfg.data, torch.device("cpu"))
    torch.manual_seed(0)
    model = create_model(cfg, data.spec)
    params = list(model.parameters())
    x, y = data.x_train[:7], data.y_train[:7]
    classes = None if data.spec.regression else data.spec.num_classes
    curvature = model_curvature(model, params, x, classes=classes, per_example=(x, y, data.loss))
    assert curvature.sq_grads is not None
    want = torch.zeros(flat(params).numel())
    for i in range(7):
        model.zero_grad()
        data.loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        want += flat([p.grad for p in params]).square() / 7
    torch.testing.assert_close(curvature.sq_grads(), want, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("optim.curvature_batch=200",), "optim.curvature_batch=200: larger than"
         " trainer.batch_size=128; choose 1 to 128, or 0 for the whole batch"),
        (("clip=norm",), "clip=norm: optim=hessian_free bounds its step by damping"),
        (("trainer.amp=bf16",), "trainer.amp=bf16: optim=hessian_free's curvature products"),
        (("optim.structural_damping=0.1",), "optim.structural_damping=0.1: damps the hidden"
         " states of recurrent layers and model=mlp has none; choose from rnn, irnn, lstm,"
         " gru"),
        (("optim.precondition=true", "norm=batch"), "optim.precondition=true: needs"
         " per-example gradients and norm=batch couples"),
        (("optim.damping=0",), "optim.damping=0.0: must be > 0"),
        (("optim.cg_max_iters=0",), "optim.cg_max_iters=0: must be > 0"),
        (("optim.cg_decay=1.5",), "optim.cg_decay=1.5: must be in [0, 1]"),
        (("optim.curvature_batch=-1",), "optim.curvature_batch=-1: must be >= 0"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_before_training(overrides, message) -> None:
    with pytest.raises(ConfigError) as error:
        composed("optim=hessian_free", *overrides)
    assert str(error.value).startswith(message), str(error.value)


def test_an_exploding_rnn_is_reported_not_hidden(tmp_path: Path) -> None:
    """A tanh RNN with N(0, 1) recurrent weights over 50 steps: the gradient is finite
    (about 1e16) but a curvature product overflows float32. Every step says so
    (cg_stopped nonfinite), none updates, and the terminal line says why."""
    cfg = composed("model=rnn", "data=adding", "data.length=50", "model.hidden_size=50",
                   "data.n_train=128", "data.n_test=32", *HF, "trainer.steps=3")  # fmt: skip
    trainer = Trainer(cfg, tmp_path, logger=NullLogger())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    hf = result["hessian_free"]
    assert hf["cg_stopped"] == {"nonfinite": 3} and hf["rejected_steps"] == 3
    assert hf["damping"]["last"] == pytest.approx(1.5**3)
    for a, b in zip(before, trainer.model.parameters()):
        assert torch.equal(a, b)
    from gradexp.display import hessian_free_line

    assert "on 3 steps a curvature product overflowed" in hessian_free_line(hf)
