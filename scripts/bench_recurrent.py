"""Training steps/s of the recurrent families: the unrolled cell against torch's fused
kernel, which every step that measures nothing per time step now takes.

For each family (rnn, irnn, lstm, gru at T=100, 100 units, batch 32 on the adding
problem, one thread as `gradexp train` runs), times a training step (forward, backward,
SGD update) on the unrolled path (the hidden states traced, as on a logging step) and on
the path an ordinary step takes, interleaved in one process, and prints the median
steps/s of each with their spread and the ratio.

    python scripts/bench_recurrent.py [--steps 20] [--repeats 5] [--length 100]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from gradexp.cli import CONFIG_DIR
from gradexp.config import to_config
from gradexp.data import load_data
from gradexp.init import init_weights
from gradexp.models import create_model

FAMILIES = ("rnn", "irnn", "lstm", "gru")


def build(family: str, length: int, hidden: int):
    overrides = [f"model={family}", f"data.length={length}", f"model.hidden_size={hidden}",
                 "data.n_train=512", "data.n_test=32"]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = to_config(compose("config", overrides=overrides))
    data = load_data(cfg.data, torch.device("cpu"))
    torch.manual_seed(0)
    model = create_model(cfg, data.spec)
    init_weights(model, cfg.init, cfg.activation)
    return model, data


def time_steps(model, data, steps: int, batch: int, traced: bool) -> float:
    """Steps/s over ``steps`` training steps; ``traced``: unrolled, as a logging step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for layer in model.recurrent:
        layer.trace = (lambda t, n, h: None) if traced else None
    start = time.perf_counter()
    for _ in range(steps):
        x, y = data.batch(batch, g)
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x).reshape(y.shape), y).backward()
        opt.step()
    for layer in model.recurrent:
        layer.trace = None
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"T={args.length}, {args.hidden} units, batch {args.batch}, one thread; steps/s,"
          f" median (min-max) of {args.repeats} interleaved repeats")  # fmt: skip
    print(f"{'family':8} {'unrolled':>22} {'fused':>22} {'ratio':>7}")
    for family in FAMILIES:
        model, data = build(family, args.length, args.hidden)
        assert all(layer.fusable for layer in model.recurrent), family
        time_steps(model, data, 2, args.batch, traced=False)  # warm-up
        runs: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for traced in (True, False):
                runs[traced].append(time_steps(model, data, args.steps, args.batch, traced))

        def cell(values: list[float]) -> str:
            return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

        ratio = statistics.median(runs[False]) / statistics.median(runs[True])
        print(f"{family:8} {cell(runs[True]):>22} {cell(runs[False]):>22} {ratio:6.1f}x")


if __name__ == "__main__":
    main()
