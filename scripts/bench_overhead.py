"""What gradexp's telemetry costs: the trainer against a bare PyTorch loop, in one process.

Each workload is trained several ways, interleaved and repeated: a bare loop with the
same model, data, loss and optimizer; the gradexp trainer logging every step, every
10 steps, and only at its first and last step (so nearly every step is a non-logging
step: the cost telemetry adds when it is not logging). TensorBoard is written to a
temporary directory. A trainer's time per step is marginal: (T(2N) - T(N)) / N, with
T(n) the wall time of a whole run of n steps, so that start-up and the end of a run
(theory, final evaluation, figure, summary) cancel and what remains is what each
step costs. Each is reported as the ratio of its time per step to the bare loop's
(median of paired ratios, and their range): machines here are noisy, ratios are not.

Workloads:
    mlp     50 x Linear(256) + tanh, batch 128, SGD
    lstm    LSTM (hidden 128) on the adding problem, T=100, batch 64: per-time-step
            telemetry on logging steps; also the fused torch.nn.LSTM path, whose
            steps/s the README compares with the unrolled one
    resnet  ResNet [2, 2, 2] width 16 with BatchNorm on 16x16 synthetic images, batch 64

    python scripts/bench_overhead.py [--workload all] [--steps 100] [--repeats 5]
    python scripts/bench_overhead.py --probes [--workload mlp]

``--probes``: what each probe costs on a logging step. The loop logging every step is
timed with every probe, with each probe left out in turn, and with none (the loop's
own logging: plan, gradient norms for the guard, the record, TensorBoard); the cost of
a probe is the difference, as a share of the bare step.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch
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


WORKLOADS = {
    "mlp": [
        "model.depth=50",
        "model.width=256",
        "activation=tanh",
        "init=xavier_normal",
        "data.features=256",
        "trainer.batch_size=128",
    ],
    "lstm": [
        "model=lstm",
        "model.hidden_size=128",
        "init=xavier_uniform",
        "data=adding",
        "data.length=100",
        "data.n_train=2048",
        "trainer.batch_size=64",
    ],
    "resnet": [
        "model=resnet",
        "norm=batch",
        "activation=relu",
        "init=kaiming_normal",
        "trainer.batch_size=64",
    ],
}


WORKLOADS["lstm_fused"] = [*WORKLOADS["lstm"], "model.fused=true"]


def make_config(workload: str, steps: int, log_every: int, device: str):
    overrides = [
        *WORKLOADS[workload],
        "data.n_test=128",  # the final evaluation is not telemetry: keep it negligible
        f"trainer.steps={steps}",
        f"trainer.log_every={log_every}",
        f"trainer.hist_every={10 * steps}",
        f"trainer.eval_every={10 * steps}",
        "trainer.progress=off",
        # Per-step telemetry only: a figure costs ~0.45 s to draw whatever the workload
        # (plus ~0.4 s to import matplotlib once), reported apart in the README.
        "trainer.figure_every=0",
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
        loss = data.loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    return (time.perf_counter() - start) / cfg.trainer.steps


def trainer(cfg, out: Path) -> float:
    """Wall seconds of a whole run."""
    start = time.perf_counter()
    summary = run(cfg, out, console=Console(file=io.StringIO()))
    assert summary["status"] == "completed", summary["status"]
    return time.perf_counter() - start


def bench(workload: str, steps: int, repeats: int, device: torch.device) -> dict[str, list]:
    """Seconds per step of each variant of ``workload``, one list entry per repeat."""
    never = 100 * steps  # log only at the first and the last step
    names = {1: "log every step", 10: "log every 10 steps", never: "log first+last only"}
    cfgs = {
        (every, n): make_config(workload, n, every, device.type)
        for every in names
        for n in (steps, 2 * steps)
    }
    times: dict[str, list[float]] = {"bare": [], **{name: [] for name in names.values()}}
    bare_loop(cfgs[1, steps], device)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            times["bare"].append(bare_loop(cfgs[1, steps], device))
            for every, name in names.items():
                short = trainer(cfgs[every, steps], Path(tmp) / f"{every}-{r}-short")
                long = trainer(cfgs[every, 2 * steps], Path(tmp) / f"{every}-{r}-long")
                times[name].append((long - short) / steps)
    return times


def probe_costs(workload: str, steps: int, repeats: int, device: torch.device) -> None:
    """Seconds per logging step with each probe left out (see the module docstring)."""
    from gradexp.checkpoint import StopOnSignal
    from gradexp.train import Trainer

    cfg = make_config(workload, steps, 1, device.type)

    class Quiet:
        def update(self, *args: object) -> None: ...
        def close(self) -> None: ...

    def loop_time(leave_out: str | None, tmp: Path) -> float:
        trainer = Trainer(cfg, tmp, console=Console(file=io.StringIO()))
        if leave_out == "*":
            trainer.probes = []
        elif leave_out is not None:
            trainer.probes = [p for p in trainer.probes if p.name != leave_out]
        trainer.progress, trainer.stopper, trainer.sweep_stop = Quiet(), StopOnSignal(), None
        trainer.start = start = time.perf_counter()
        trainer.loop()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    with tempfile.TemporaryDirectory() as tmp:
        names = [p.name for p in Trainer(cfg, Path(tmp) / "names").probes]
        variants = [None, *names, "*"]
        times: dict[str | None, list[float]] = {v: [] for v in variants}
        bare = []
        for r in range(repeats):
            bare.append(bare_loop(cfg, device))
            for v in variants:
                times[v].append(loop_time(v, Path(tmp) / f"{v}-{r}"))
    b = statistics.median(bare)
    full = statistics.median(times[None])
    print(f"{workload}: bare {1e3 * b:.2f} ms/step; logging every step {1e3 * full:.2f} ms"
          f" ({full / b:.3f}x)")  # fmt: skip
    for v in names:
        cost = full - statistics.median(times[v])
        print(f"  {v:>18}: {1e3 * cost:6.2f} ms  ({cost / b:+.3f} of a bare step)")
    rest = statistics.median(times["*"]) - b
    print(f"  {'the loop itself':>18}: {1e3 * rest:6.2f} ms  ({rest / b:+.3f} of a bare step)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=100, help="N: runs of N and 2N steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probes", action="store_true", help="each probe's cost per log step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register_configs()
    device = torch.device(args.device)
    print(
        f"device {args.device}, torch {torch.__version__}, {args.threads} thread(s), "
        f"{args.steps} steps x {args.repeats} repeats"
    )
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    if args.probes:
        for workload in workloads:
            probe_costs(workload, args.steps, args.repeats, device)
        return
    bare: dict[str, float] = {}
    for workload in workloads:
        times = bench(workload, args.steps, args.repeats, device)
        bare[workload] = statistics.median(times["bare"])
        spread = (max(times["bare"]) - min(times["bare"])) / bare[workload]
        print(f"{workload}: (how quiet: the bare loop's repeats spread {100 * spread:.1f}%)")
        for name, ts in times.items():
            ratios = [t / b for t, b in zip(ts, times["bare"])]
            print(
                f"  {name:>20}: {1e3 * statistics.median(ts):8.2f} ms/step"
                f" {1 / statistics.median(ts):8.1f} steps/s  ratio"
                f" {statistics.median(ratios):.3f} (median of paired ratios;"
                f" range {min(ratios):.3f}-{max(ratios):.3f})"
            )
    if "lstm" in bare and "lstm_fused" in bare:
        speedup = bare["lstm"] / bare["lstm_fused"]
        print(
            f"bare loop steps/s: unrolled LSTM {1 / bare['lstm']:.1f}, fused"
            f" {1 / bare['lstm_fused']:.1f} (fused/unrolled {speedup:.2f}x)"
        )


if __name__ == "__main__":
    main()
