"""A sweep's driver: where its stop lives, what it says at the end, and resuming it.

Hydra resolves the sweep's directory when the sweep starts; ``SweepCallback`` hands it
to the driver's ``SweepStop`` (gradexp.checkpoint), whose stop file lives there, beside
the jobs, so that jobs on other nodes (SLURM, Ray) read it. At the end the driver reads
each job's summary.json there and says what happened: which finished, which stopped,
which never ran (``report``). ``gradexp resume SWEEP_DIR`` launches the sweep again
into its own directory (``resume_args``): a finished job is not run again, a stopped or
preempted one continues from its checkpoint (gradexp.checkpoint.continuation).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from gradexp.errors import ConfigError
from gradexp.rundir import read_summary

MULTIRUN_FILE = "multirun.yaml"  # Hydra's record of the sweep, in its directory
RESUME_SWEEP_ENV = "GRADEXP_RESUME_SWEEP"  # preflight lets this sweep dir hold jobs


class SweepCallback(Callback):
    """Hydra's callback (configs/config.yaml, hydra.callbacks): the sweep's directory to
    the driver's stop, once Hydra has resolved it; gradexp's submitit launchers in place
    of the plugin's (gradexp.launchers: a job that ends without a result is one line)."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import read_write

        from gradexp.checkpoint import SweepStop

        if SweepStop.current is not None:
            SweepStop.current.at(Path(str(config.hydra.sweep.dir)))
        launcher = config.hydra.get("launcher") or {}
        if str(launcher.get("_target_")).startswith("hydra_plugins.hydra_submitit_launcher."):
            from gradexp.launchers import PLUGIN_TARGETS

            with read_write(config.hydra.launcher):  # before Hydra makes the launcher
                target = config.hydra.launcher._target_
                config.hydra.launcher._target_ = PLUGIN_TARGETS.get(target, target)


@dataclass
class SweepReport:
    """The jobs of a sweep directory by how they ended (their directory names)."""

    finished: list[str] = field(default_factory=list)  # completed, diverged or failed
    stopped: list[str] = field(default_factory=list)  # interrupted: resumable
    not_started: list[str] = field(default_factory=list)  # the sweep stopped first
    missing: list[str] = field(default_factory=list)  # no summary.json: killed, or lost

    @property
    def unfinished(self) -> list[str]:
        return [*self.stopped, *self.not_started, *self.missing]

    def line(self, sweep_dir: Path) -> str:
        parts = [f"{len(self.finished)} finished"]
        for what, names in (("stopped", self.stopped), ("never started", self.not_started),
                            ("without summary.json", self.missing)):  # fmt: skip
            if names:
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                parts.append(f"{len(names)} {what} ({shown})")
        return f"{', '.join(parts)}: `gradexp resume {sweep_dir}` finishes the sweep"


def report(sweep_dir: Path, lost: Iterable[int] = ()) -> SweepReport:
    """Each job directory of ``sweep_dir`` by its summary.json; ``lost``: the numbers of
    jobs that ended without a result, listed as ``#N`` when they left no directory."""
    from gradexp.checkpoint import NOT_STARTED

    out = SweepReport()
    jobs = [d for d in Path(sweep_dir).iterdir() if d.is_dir() and (d / ".hydra").is_dir()]
    numbers = {d.name.split("_", 1)[0] for d in jobs}
    out.missing.extend(f"#{n}" for n in sorted(lost) if str(n) not in numbers)
    for job in sorted(jobs, key=lambda d: (len(d.name.split("_")[0]), d.name)):
        summary = read_summary(job)
        if summary is None:
            out.missing.append(job.name)
            continue
        if summary.get("status") != "interrupted":
            out.finished.append(job.name)
        elif summary.get("error") == NOT_STARTED:
            out.not_started.append(job.name)
        else:
            out.stopped.append(job.name)
    return out


def resume_args(sweep_dir: Path, extra: list[str]) -> list[str]:
    """``gradexp train -m`` arguments that launch the sweep in ``sweep_dir`` again into
    it, with its own overrides (multirun.yaml), then ``extra`` (KEY=VALUE; a
    ``hydra/launcher=...`` there replaces the sweep's launcher and its settings)."""
    import yaml

    try:
        saved = yaml.safe_load((sweep_dir / MULTIRUN_FILE).read_text())
        overrides = saved["hydra"]["overrides"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        raise ConfigError(f"{sweep_dir}: not a sweep's directory ({MULTIRUN_FILE}: {e})") from e
    hydra = [str(o) for o in overrides.get("hydra") or []]
    task = [str(o) for o in overrides.get("task") or []]
    if any(o.startswith("hydra/sweeper=") for o in hydra + task):
        raise ConfigError(
            f"{sweep_dir}: a search's trials are sampled as it goes, it cannot be launched"
            " again job by job; continue a trial with `gradexp resume JOB_DIR`"
        )
    given = {a.split("=", 1)[0].lstrip("+~") for a in extra}
    new_launcher = "hydra/launcher" in given

    def kept(override: str) -> bool:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in given or key in ("hydra.sweep.dir", "hydra.mode"):
            return False
        return not (new_launcher and key.startswith("hydra.launcher."))

    return ["-m", *[o for o in task + hydra if kept(o)], *extra, f"hydra.sweep.dir={sweep_dir}"]
