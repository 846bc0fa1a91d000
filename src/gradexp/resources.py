"""Will a run fit in memory? Estimated before its model is built, refused in one line.

(Its model built on the meta device also names its modules: ``clip.exclude`` is checked
against them here, before anything runs.)

The model is built on torch's ``meta`` device (shapes, no storage) and run forward once
on a meta batch: its parameter count and the activations a training step keeps come out
exact and cost nothing, whatever the size asked for. What training holds besides
(gradients, optimizer state, the telemetry's copies, the checkpoint serialized in memory)
is a multiple of the parameters; the task's tensors are counted as they will be stored.
The estimate is compared with the memory the device has free: MemAvailable (and the
cgroup's limit, in a container) on the CPU, ``torch.cuda.mem_get_info`` on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gradexp.clipping import check_exclude
from gradexp.config import Config, SGDConfig
from gradexp.errors import RunError

if TYPE_CHECKING:
    from gradexp.data import DataSpec

FLOAT_BYTES = 4  # parameters, gradients and the task's inputs are float32
# Copies of the parameters a training step holds besides the weights: gradients, the
# previous weights (update ratios), the checkpoint serialized in memory; the optimizer's
# slots come on top (optimizer_slots).
PARAM_COPIES = 4
# Each activation a step keeps: its value for backward, its gradient.
ACTIVATION_COPIES = 2
# The size keys named in the refusal, as each model family has them.
SIZE_KEYS = ("width", "depth", "channels", "hidden_size", "layers", "blocks")


def optimizer_slots(cfg: Config) -> int:
    """Per-parameter state tensors of the optimizer: Adam's two moments, momentum's one."""
    name = cfg.optim.name
    if name in ("adam", "adamw"):
        return 2
    if name == "rmsprop":
        return 1 + (cfg.optim.momentum > 0)
    return int(isinstance(cfg.optim, SGDConfig) and cfg.optim.momentum > 0)


def _tiny(data_cfg: Any) -> Any:
    """The task's config with a handful of examples: its spec, at no cost."""
    sizes = {k: 4 for k in ("n_train", "n_test") if hasattr(data_cfg, k)}
    return dataclasses.replace(data_cfg, **sizes)


def data_bytes(data_cfg: Any, input_shape: tuple[int, ...]) -> int:
    """The task's train and test inputs as stored (digits: its fixed 1797 examples)."""
    examples = getattr(data_cfg, "n_train", 1797) + getattr(data_cfg, "n_test", 0)
    return examples * math.prod(input_shape) * FLOAT_BYTES


def estimate(cfg: Config, spec: DataSpec | None = None) -> dict[str, int]:
    """What training ``cfg`` needs: parameters, activations per step, bytes in all.
    ``spec``: the task's, when it is loaded already (else a tiny copy of it is)."""
    from gradexp.data import load_data
    from gradexp.models import create_model

    if spec is None:
        spec = load_data(_tiny(cfg.data), torch.device("cpu")).spec
    try:
        with torch.device("meta"):
            model = create_model(cfg, spec)
    except RuntimeError as e:  # a tensor of more elements than torch can address
        if "overflow" not in str(e):
            raise
        raise RunError(
            f"model={cfg.model.name} {_sizes(cfg)}: a tensor of this model would hold more"
            " elements than torch can address; choose a smaller model"
        ) from None
    # The model's module names, known now: a clip.exclude that names none fails here.
    check_exclude(cfg.clip, [name for name, _ in model.named_parameters()])
    params = sum(p.numel() for p in model.parameters())
    activations = _activations(model, (cfg.trainer.batch_size, *spec.input_shape))
    needed = (
        params * FLOAT_BYTES * (1 + PARAM_COPIES + optimizer_slots(cfg))
        + activations * FLOAT_BYTES * ACTIVATION_COPIES
        + data_bytes(cfg.data, spec.input_shape)
    )
    return {"params": params, "activations": activations, "bytes": needed}


def _activations(model: torch.nn.Module, batch_shape: tuple[int, ...]) -> int:
    """Elements the leaf modules output in one forward pass on a meta batch (0 when the
    model cannot run on meta tensors: the estimate is then its parameters alone)."""
    total = 0

    def count(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        nonlocal total
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        total += sum(o.numel() for o in outputs if isinstance(o, torch.Tensor))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        model(torch.empty(batch_shape, device="meta"))
    except Exception:  # data-dependent control flow: no meta run
        return 0
    finally:
        for h in handles:
            h.remove()
    return total


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a run on ``device`` (None: unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    free = _meminfo_available()
    limit = _cgroup_free()
    candidates = [x for x in (free, limit) if x is not None]
    return min(candidates) if candidates else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_free() -> int | None:
    """The container's memory limit less its usage (cgroup v2, then v1)."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's "no limit"
            return max(int(limit) - usage, 0)
    return None


def human(n: float) -> str:
    """Bytes as a person reads them: 4.4 TiB, 118 GiB, 3.1 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def _sizes(cfg: Config) -> str:
    """The model's size keys as overrides: model.width=100000 model.depth=100."""
    keys = [k for k in SIZE_KEYS if hasattr(cfg.model, k)]
    return " ".join(f"model.{k}={getattr(cfg.model, k)}" for k in keys)


def check_memory(cfg: Config, device: torch.device, spec: DataSpec | None = None) -> dict[str, int]:
    """RunError (one line) when training ``cfg`` needs more memory than ``device`` has
    free; the estimate otherwise."""
    need = estimate(cfg, spec)
    free = available_bytes(device)
    if free is not None and need["bytes"] > free:
        raise RunError(
            f"model={cfg.model.name} {_sizes(cfg)} trainer.batch_size={cfg.trainer.batch_size}:"
            f" training needs about {human(need['bytes'])} ({need['params']:.3g} parameters,"
            f" {need['activations']:.3g} activations per step), but {device.type} has"
            f" {human(free)} free; choose a smaller model or batch"
        )
    return need
