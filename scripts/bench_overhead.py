"""What gradexp's telemetry costs: the trainer against a bare PyTorch loop, in one process.

A 50-layer, width-256 tanh MLP (batch 128, SGD) is trained three ways, interleaved
and repeated: a bare loop with the same model, data and optimizer; the gradexp
trainer logging every step; and logging every 10 steps (TensorBoard written to a
temporary directory in both). Each is reported as the ratio of its time per step
to the bare loop's (median over repeats): machines here are noisy, ratios are not.

    python scripts/bench_overhead.py [--steps 200] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from rich.console import Console

import gradexp
from gradexp.config import register_configs, to_config
from gradexp.data import load_data
from gradexp.init import init_weights
from gradexp.models import create_model
from gradexp.optim import create_optimizer
from gradexp.train import run

CONFIG_DIR = str(Path(gradexp.__file__).parent / "configs")


def make_config(steps: int, log_every: int, device: str):
    overrides = [
        "model.depth=50",
        "model.width=256",
        "activation=tanh",
        "init=xavier_normal",
        "data.features=256",
        "data.n_test=128",  # the final evaluation is not telemetry: keep it negligible
        f"trainer.steps={steps}",
        f"trainer.log_every={log_every}",
        f"trainer.hist_every={10 * steps}",
        f"trainer.eval_every={10 * steps}",
        "trainer.progress=off",
        "trainer.batch_size=128",
        f"trainer.device={device}",
    ]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return to_config(compose("config", overrides=overrides))


def bare_loop(cfg, device: torch.device) -> float:
    """Seconds per step of the plain loop: batch, forward, loss, backward, step."""
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, device)
    model = create_model(cfg, data.spec).to(device)
    init_weights(model, cfg.init, cfg.activation)
    optimizer = create_optimizer(cfg.optim, model.parameters())
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(cfg.trainer.steps):
        x, y = data.batch(cfg.trainer.batch_size, g)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    return (time.perf_counter() - start) / cfg.trainer.steps


def trainer(cfg, out: Path) -> float:
    summary = run(cfg, out, console=Console(file=io.StringIO()))
    assert summary["status"] == "completed", summary["status"]
    return 1.0 / summary["steps_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register_configs()
    device = torch.device(args.device)
    cfgs = {every: make_config(args.steps, every, args.device) for every in (1, 10)}
    times: dict[str, list[float]] = {"bare": [], "log every step": [], "log every 10 steps": []}
    bare_loop(cfgs[1], device)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            times["bare"].append(bare_loop(cfgs[1], device))
            times["log every step"].append(trainer(cfgs[1], Path(tmp) / f"every1-{r}"))
            times["log every 10 steps"].append(trainer(cfgs[10], Path(tmp) / f"every10-{r}"))
    print(
        f"device {args.device}, torch {torch.__version__}, {args.threads} thread(s), "
        f"{args.steps} steps x {args.repeats} repeats"
    )
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times["bare"])]
        print(
            f"{name:>20}: {1e3 * statistics.median(ts):7.2f} ms/step"
            f"  ratio {statistics.median(ratios):.3f} (median of paired ratios;"
            f" range {min(ratios):.3f}-{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
