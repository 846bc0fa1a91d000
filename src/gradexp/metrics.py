"""Where a run's numbers go: a small logger protocol, TensorBoard and null implementations."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary


class MetricLogger(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def histogram(self, tag: str, hist: dict[str, Any], step: int) -> None: ...
    def text(self, tag: str, text: str, step: int) -> None: ...
    def image(self, tag: str, image: Any, step: int) -> None: ...
    def hparams(self, hparams: dict[str, Any], metric_tags: list[str]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class NullLogger:
    """Logs nothing: for benchmarks and library use."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def histogram(self, tag: str, hist: dict[str, Any], step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def image(self, tag: str, image: Any, step: int) -> None:
        pass

    def hparams(self, hparams: dict[str, Any], metric_tags: list[str]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Writes one event file in ``log_dir``.

    All scalars of a step travel in one Summary protobuf: writing tens of
    per-layer values one ``add_scalar`` call at a time is the largest cost of
    telemetry on CPU (see ENGINEERING.md).
    """

    def __init__(
        self, log_dir: Path, layout: dict[str, Any] | None = None, purge_step: int | None = None
    ) -> None:
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        if layout:
            self.writer.add_custom_scalars(layout)

    def scalars(self, values: dict[str, float], step: int) -> None:
        summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self.writer.file_writer.add_summary(summary, step)

    def histogram(self, tag: str, hist: dict[str, Any], step: int) -> None:
        """``hist``: add_histogram_raw's arguments (see telemetry.histogram_from_stats)."""
        self.writer.add_histogram_raw(tag, global_step=step, **hist)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """``image``: (3, H, W) uint8 (see figures.to_image)."""
        self.writer.add_image(tag, image, step, dataformats="CHW")

    def hparams(self, hparams: dict[str, Any], metric_tags: list[str]) -> None:
        # Into this run's own event file (add_hparams would open a timestamped sub-run);
        # the HParams tab reads each metric's last value from the scalars of the run.
        # Booleans as "true"/"false": torch's hparams() would write them as numbers (1/0),
        # while strings give the HParams tab a discrete filter.
        clean = {
            k: str(v).lower()
            if isinstance(v, bool)
            else v
            if isinstance(v, (int, float, str))
            else str(v)
            for k, v in hparams.items()
        }
        for summary in hparams_summary(clean, {tag: math.nan for tag in metric_tags}):
            self.writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
