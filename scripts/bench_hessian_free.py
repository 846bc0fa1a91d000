"""The cost of Hessian-free optimization (gradexp.hessian_free) relative to one forward and
backward pass, per model family (issue 15's target for G v: at most 2.5x).

For each family (gradexp's own model on its default task, at the batch size given, one
thread), in one process:

- forward+backward of the loss, as an SGD step takes it (torch's fused recurrent kernels
  where the trainer takes them);
- one Gauss-Newton product G v as CG takes it: the reverse graph is built once per HF
  step (``GaussNewton``), each product is one forward-mode pass and one backward pass;
  recurrent layers run their unrolled cell (torch's fused LSTM kernel has no
  forward-mode derivative), so G v is also given over a forward+backward on that path
  ("G v / fb, same path": the unrolled cell; for the other families the same pass);
- one whole HF step (``HessianFree.step`` with gradexp's defaults, after a few warm-up
  steps), with its CG iterations: the step's cost is about that many products plus the
  loss evaluations of backtracking and the line search.

The two are interleaved, repeated, and reported as median (min-max) and ratio.

    python scripts/bench_hessian_free.py [--repeats 7] [--batch 128] [--families mlp rnn]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir

from gradexp.cli import CONFIG_DIR
from gradexp.config import to_config
from gradexp.data import load_data
from gradexp.hessian_free import GaussNewton, HessianFree, functional_passes, model_curvature
from gradexp.init import init_weights
from gradexp.models import create_model

FAMILIES = {
    "mlp": [],
    "cnn": ["model=cnn"],
    "resnet": ["model=resnet"],
    "rnn": ["model=rnn", "data.length=50", "init=xavier_uniform"],
    "lstm": ["model=lstm", "data.length=50", "init=xavier_uniform"],
}


def build(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = to_config(compose("config", overrides=[*overrides, "data.n_train=512"]))
    data = load_data(cfg.data, torch.device("cpu"))
    torch.manual_seed(0)
    model = create_model(cfg, data.spec)
    init_weights(model, cfg.init, cfg.activation)
    return model, data


def timed(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def ms(values: list[float]) -> str:
    low, high = 1e3 * min(values), 1e3 * max(values)
    return f"{1e3 * statistics.median(values):.2f} ({low:.2f}-{high:.2f})"


def ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def measure(family: str, batch: int, repeats: int) -> str:
    model, data = build(FAMILIES[family])
    x, y = data.batch(batch, torch.Generator().manual_seed(0))
    params = list(model.parameters())
    classes = None if data.spec.regression else data.spec.num_classes
    curvature = model_curvature(model, params, x, classes=classes)
    at = tuple(p.detach() for p in params)
    v = tuple(torch.randn_like(p) for p in at)
    product = GaussNewton(curvature.fn, at, curvature.loss)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        data.loss(model(x), y).backward()

    def forward_backward_same_path() -> None:
        with functional_passes(model):
            forward_backward()

    def closure() -> torch.Tensor:
        loss = data.loss(model(x), y)
        if torch.is_grad_enabled():
            model.zero_grad(set_to_none=True)
            loss.backward()
        return loss.detach()

    optimizer = HessianFree(params)
    cg: list[int] = []

    def hf_step() -> None:
        optimizer.step(closure, model_curvature(model, params, x, classes=classes))
        assert optimizer.last is not None
        cg.append(optimizer.last.cg_iters)

    forward_backward()
    forward_backward_same_path()
    product(v)
    for _ in range(3):  # warm up: lambda and the warm start settle from their defaults
        hf_step()
    cg.clear()
    fb, same, gv, steps = [], [], [], []
    for _ in range(repeats):  # interleaved: the machine's noise falls on all alike
        fb.append(timed(forward_backward, 3))
        same.append(timed(forward_backward_same_path, 3))
        gv.append(timed(lambda: product(v), 3))
        steps.append(timed(hf_step, 1))
    gv_ratio = [g / f for g, f in zip(gv, fb)]
    same_ratio = [g / f for g, f in zip(gv, same)]
    step_ratio = [s / f for s, f in zip(steps, fb)]
    return (f"{family:7} {ms(fb):>21} {ms(gv):>21} {ratio(gv_ratio):>19}"
            f" {ratio(same_ratio):>19} {ms(steps):>25} {statistics.median(cg):>4.0f}"
            f" {ratio(step_ratio):>21}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"batch {args.batch}, one thread; ms, median (min-max) of {args.repeats} repeats")
    print(f"{'family':7} {'forward+backward':>21} {'G v':>21} {'G v / fb':>19}"
          f" {'same path':>19} {'HF step':>25} {'CG':>4} {'HF step / fb':>21}")  # fmt: skip
    for family in args.families:
        print(measure(family, args.batch, args.repeats), flush=True)


if __name__ == "__main__":
    main()
