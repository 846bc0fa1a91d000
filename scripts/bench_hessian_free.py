"""The cost of one Gauss-Newton product G v (gradexp.hessian_free) relative to one forward
and backward pass, per model family (issue 15's target: at most 2.5x).

For each family (gradexp's own model on its default task, at the batch size given, one
thread), times a forward+backward of the loss and a G v product on the same batch,
interleaved in one process, and prints the median time of each with its spread and the
ratio. torch's fused LSTM and GRU kernels have no forward-mode derivative: those families
are timed on the unrolled cell (marked "unrolled"), forward+backward too.

    python scripts/bench_hessian_free.py [--repeats 7] [--batch 128] [--families mlp rnn]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from torch.func import functional_call

from gradexp.cli import CONFIG_DIR
from gradexp.config import to_config
from gradexp.data import load_data
from gradexp.hessian_free import gauss_newton_product
from gradexp.init import init_weights
from gradexp.models import create_model

FAMILIES = {
    "mlp": [],
    "cnn": ["model=cnn"],
    "resnet": ["model=resnet"],
    "rnn": ["model=rnn", "data.length=50"],
    "lstm": ["model=lstm", "data.length=50"],
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


def measure(family: str, batch: int, repeats: int) -> str:
    model, data = build(FAMILIES[family])
    x, y = data.batch(batch, torch.Generator().manual_seed(0))
    loss_kind = "mse" if data.spec.regression else "cross_entropy"
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    v = tuple(torch.randn_like(p) for p in params)

    def fn(*p: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, p)), (x,))

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        data.loss(model(x), y).backward()

    def product() -> None:
        gauss_newton_product(fn, params, v, loss_kind)

    path = ""
    try:
        product()
    except (RuntimeError, NotImplementedError) as e:
        if not getattr(model, "recurrent", None):
            return f"{family:8} G v not available: {str(e).splitlines()[0][:90]}"
        # torch's fused LSTM/GRU kernels have no forward-mode derivative: the unrolled
        # cell (the path a logging step takes) for both timings
        for layer in model.recurrent:
            layer.trace = lambda t, n, h: None
        product()
        path = " unrolled"
    forward_backward()
    fb, gv = [], []
    for _ in range(repeats):  # interleaved: the machine's noise falls on both alike
        fb.append(timed(forward_backward, 3))
        gv.append(timed(product, 3))
    ratios = [g / f for g, f in zip(gv, fb)]

    def ms(values: list[float]) -> str:
        low, high = 1e3 * min(values), 1e3 * max(values)
        return f"{1e3 * statistics.median(values):.2f} ({low:.2f}-{high:.2f})"

    return (f"{family:8} {ms(fb):>22} {ms(gv):>22} {statistics.median(ratios):6.2f}x"
            f" ({min(ratios):.2f}-{max(ratios):.2f}){path}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"batch {args.batch}, one thread; ms, median (min-max) of {args.repeats} repeats")
    print(f"{'family':8} {'forward+backward':>22} {'G v':>22} {'ratio':>7}")
    for family in args.families:
        print(measure(family, args.batch, args.repeats), flush=True)


if __name__ == "__main__":
    main()
