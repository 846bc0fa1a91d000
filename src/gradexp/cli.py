"""The ``gradexp`` command: subcommands, and the only ``hydra.main`` of the package.

torch and Hydra are imported inside the commands that use them, never at import time,
so ``gradexp --help`` stays fast. This module is imported by every sweep worker (its
job function is pickled by reference): it registers the resolvers the run dir names use.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gradexp import __version__
from gradexp.errors import ConfigError, RunError, shorten

CONFIG_DIR = str(Path(__file__).parent / "configs")

# A directory name may not exceed 255 bytes: keep this much of the overrides, then a hash.
MAX_SUFFIX_BYTES = 200


def _dir_suffix(overrides: str) -> str:
    """For hydra.run.dir / hydra.sweep.subdir: "_<overrides>", shortened if long, or nothing."""
    if not overrides:
        return ""
    raw = overrides.encode()
    if len(raw) > MAX_SUFFIX_BYTES:
        digest = hashlib.sha1(raw).hexdigest()[:8]
        head = raw[: MAX_SUFFIX_BYTES - 10].decode(errors="ignore")
        overrides = f"{head}~{digest}"
    return f"_{overrides}"


def _aliases_help() -> str:
    from gradexp.config import aliases_help

    return aliases_help()


def _ray_object_store(address: str | None) -> int | None:
    """hydra/launcher=ray's object store: the launcher's own 75 MB for a local instance
    (it sets that unless the key is given); none for an existing cluster, which refuses
    the setting ("object_store_memory must not be provided")."""
    return 78643200 if address in (None, "local") else None


OmegaConf.register_new_resolver("gradexp_suffix", _dir_suffix, replace=True)
OmegaConf.register_new_resolver("gradexp_ray_object_store", _ray_object_store, replace=True)
OmegaConf.register_new_resolver("gradexp_aliases", _aliases_help, replace=True)
# configs/hydra/launcher/ray.yaml lists the Ray launcher's keys a user sets; Hydra merges
# it into the plugin's schema of the same name, as intended, and warns that it does.
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/ray' is validated against ConfigStore schema"
)


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit: the contract for bad input."""
    # A value of thousands of characters is named by its head, length and tail.
    message = " ".join(shorten(word) for word in message.split(" "))
    print(f"gradexp: error: {message}", file=sys.stderr)
    raise SystemExit(code)


class _PipeSafe:
    """A standard stream whose reader may go away (``| head``, a pager quit, a failed
    ``tee``): from then on what is written goes to /dev/null and the run goes on. The
    run's results are its files, never its terminal output."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _silence(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._silence()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._silence()
            self._stream.flush()  # what was buffered goes to /dev/null now

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard_output() -> None:
    """Training outlives its terminal: SIGPIPE ignored (a write to a closed pipe raises
    instead of killing the process) and stdout/stderr made ``_PipeSafe``. Idempotent."""
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _PipeSafe):
            setattr(sys, name, _PipeSafe(stream))


def objective_value(
    summary: dict[str, Any] | None, metric: str, penalty: float | None, maximize: bool
) -> float:
    """The number a run returns to an optimizing sweeper: the final ``metric`` of a
    completed run, else (diverged, failed, non-finite, missing) a finite penalty that is
    worse than any real value (1e6, or -1e6 when maximizing) unless ``penalty`` is given."""
    if penalty is None:
        penalty = -1e6 if maximize else 1e6
    if summary is None or summary.get("status") != "completed":
        return float(penalty)
    value = summary.get("metrics", {}).get(metric)
    if value is None or not math.isfinite(value):
        return float(penalty)
    return float(value)


def _train_job(cfg: DictConfig) -> Any:
    """One job: a run, or one of a sweep's (in the sweep's process or a launcher's worker)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from gradexp.checkpoint import continuation, ignore_sigint_between_jobs, join_sweep
    from gradexp.rundir import claim, release

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    # What an optimizing sweeper (optuna) reads: the objective metric, or a finite
    # penalty for a run that diverged or failed.
    direction = hydra_cfg.sweeper.get("direction")
    optimizing = direction is not None  # optuna: it reads the returned number
    maximize = str(direction).lower().endswith("maximize")
    objective = cfg.get("objective") or {}
    metric, penalty = objective.get("metric", "loss/test"), objective.get("penalty")
    again = "new"
    if multirun:
        ignore_sigint_between_jobs()
        join_sweep(output_dir)  # the sweep's stop, in the sweep's directory
        # A job whose directory holds a run is that job again (requeued by SLURM, or
        # launched again by `gradexp resume SWEEP_DIR`): the sweep's driver refuses to
        # start a new sweep on another's jobs (preflight.check_run_dirs).
        again, found = continuation(output_dir, int(cfg.trainer.steps))

    def objective_value_of(summary: dict[str, Any] | None) -> float:
        return objective_value(summary, metric, penalty, maximize)

    guard_output()
    try:
        # A run dir belongs to one run (a single run named by hydra.run.dir holds it since
        # preflight). Refused: nothing of the dir is touched, not even a failure summary.
        took = claim(output_dir, resume=bool(cfg.trainer.resume) or again != "new")
    except ConfigError as e:
        if not multirun:
            fail(str(e))
        print(f"gradexp: job {hydra_cfg.job.num} not run: {e}", file=sys.stderr)
        return objective_value_of(None)
    job = f"gradexp: job {hydra_cfg.job.num} ({output_dir.name})" if multirun else ""
    if again == "complete":
        assert found is not None
        print(f"{job}: already {found['status']} ({found.get('steps')} steps): not run again",
              file=sys.stderr)  # fmt: skip
        if took:
            release(output_dir)
        return objective_value_of(found)
    if again == "resume":
        cfg.trainer.resume = True
        print(f"{job}: run again: continuing from its checkpoint", file=sys.stderr)
    elif again == "restart":
        print(f"{job}: run again: no checkpoint to continue from, starting from step 0",
              file=sys.stderr)  # fmt: skip
    try:
        return _run_job(cfg, output_dir, multirun, optimizing, objective_value_of)
    finally:
        if took and multirun:  # the next job of this process may be another's
            release(output_dir)


def _run_job(
    cfg: DictConfig,
    output_dir: Path,
    multirun: bool,
    optimizing: bool,
    value: Callable[[dict[str, Any] | None], float],
) -> Any:
    """The job in its claimed run dir; returns what the sweeper reads (``value``)."""
    from hydra.core.hydra_config import HydraConfig

    from gradexp.checkpoint import (
        NOT_STARTED,
        in_driver,
        pass_on_signal,
        stop_sweep,
        sweep_stopped,
    )
    from gradexp.config import to_config
    from gradexp.rundir import minimal_summary, record_failure, write_summary
    from gradexp.train import NonFiniteError, run

    if multirun and sweep_stopped():  # gradexp resume starts it from step 0
        summary = minimal_summary("interrupted", NOT_STARTED)
        write_summary(output_dir, summary)
        if optimizing:  # not a trial's result: the sweeper records a failure and stops
            raise RuntimeError(NOT_STARTED)
        return value(summary)
    try:
        summary = run(to_config(cfg), output_dir)
    except NonFiniteError as e:  # on_nonfinite=raise
        fail(str(e), code=1)
    except Exception as e:
        if type(e).__name__ == "UncompletedJobError":  # submitit: SLURM's signal before the
            # training loop (its handler is not gradexp's yet), and no requeue: the job is
            # stopped, not failed; it starts again from step 0 when resumed
            summary = minimal_summary("interrupted", f"stopped before training: {e}")
            write_summary(output_dir, summary)
            print(f"gradexp: job {HydraConfig.get().job.num} ({output_dir.name}): {e}",
                  file=sys.stderr)  # fmt: skip
            return value(summary)
        if isinstance(e, ConfigError) and not multirun:
            fail(str(e))
        if isinstance(e, (RunError, MemoryError)) and not multirun:
            # Not a bug: the machine ran out of something. The run's summary says so.
            fail(record_failure(output_dir, e), code=1)
        # A job of a sweep that raises (or whose values the sweep did not know before it
        # ran: an optuna sample) is recorded and the sweep goes on; a single run keeps its
        # traceback (a crash is a bug to report, not bad input).
        error = record_failure(output_dir, e)
        if not multirun:
            raise
        print(f"gradexp: job {HydraConfig.get().job.num} failed: {error}", file=sys.stderr)
        return value(None)
    if summary["status"] == "interrupted":
        if not multirun:
            raise SystemExit(130)
        if in_driver():  # the driver's own signal: the jobs after this one do not start
            stop_sweep()
        else:  # this job's own stop (SLURM's): its launcher may requeue it
            pass_on_signal(f"gradexp: job {HydraConfig.get().job.num} ({output_dir.name})")
        if optimizing:
            raise RuntimeError("interrupted: not a trial's result")
    return value(summary)


def _run_hydra(args: list[str]) -> None:
    """Hydra's own command line (sys.argv) around ``_train_job``: run, sweep, --cfg, ..."""
    import hydra

    import gradexp.config  # noqa: F401  (its schemas, in Hydra's ConfigStore)

    sys.argv = [sys.argv[0], *args]
    hydra.main(version_base="1.3", config_path="configs", config_name="config")(_train_job)()


def app_config_groups(config_dir: str) -> str:
    """The config groups under ``config_dir`` and their options, one line each, as Hydra's
    help lists them (its own groups, hydra/*, left out)."""
    root = Path(config_dir)
    groups = {
        str(d.relative_to(root).as_posix()): sorted(p.stem for p in d.glob("*.yaml"))
        for d in root.rglob("*")
        if d.is_dir()
    }
    return "".join(
        f"{group}: {', '.join(options)}\n"
        for group, options in sorted(groups.items())
        if options and group != "hydra" and not group.startswith("hydra/")
    )


def _train_help(args: list[str]) -> None:
    """``gradexp train [KEY=VALUE ...] --help``: config.yaml's hydra.help template filled in
    from one composed config. (Hydra's own rendering copies its config repository once
    for each config group it lists: more than a second.)"""
    import string

    from gradexp.preflight import compose_run, parse_args, without_hydra

    parsed = parse_args(args)
    if any(o.lstrip("+~").startswith("hydra.searchpath") for o in parsed.overrides):
        _run_hydra(args)  # groups from elsewhere: Hydra lists them
        return
    cfg = compose_run(args, CONFIG_DIR)
    template = string.Template(cfg.hydra.help.template)
    job = OmegaConf.to_yaml(without_hydra(cfg), resolve=parsed.resolve)
    try:
        text = template.substitute(APP_CONFIG_GROUPS=app_config_groups(CONFIG_DIR), CONFIG=job)
    except KeyError:  # a template of the user's that names Hydra's other parts
        _run_hydra(args)
        return
    print(text)


def _train(args: list[str]) -> None:
    if "--version" in args:  # Hydra would print its own version
        import hydra

        print(f"gradexp {__version__} (Hydra {hydra.__version__})")
        return
    from gradexp.preflight import launcher_args, preflight, resolve_aliases, sweep_name_args

    try:
        args = resolve_aliases(args)
        if any(a in ("-h", "--help") for a in args):
            _train_help(args)
            return
        if not any(a in ("--hydra-help", "-sc", "--shell-completion") for a in args):
            preflight(args, CONFIG_DIR)
            args = [*args, *sweep_name_args(args), *launcher_args(args)]
    except ConfigError as e:
        fail(str(e))
    guard_output()
    if not any(a in ("-m", "--multirun") for a in args):
        _run_hydra(args)
        return
    from gradexp.checkpoint import SweepStop
    from gradexp.sweep import report

    with SweepStop() as stop:
        try:
            _run_hydra(args)
        except BaseException:
            # Stopping can end a sweep with the launcher's or sweeper's own error (a worker
            # pool that lost a process, optuna's failed trials): the stop is what happened.
            if not stop.stopped:
                raise
        stopped = stop.stopped  # read before the exit removes the stop file
    sweep_dir = stop.sweep_dir
    if sweep_dir is None:  # --cfg, --info: no sweep ran
        return
    jobs = report(sweep_dir, stop.lost)
    if stopped:
        fail(f"the sweep was stopped: {jobs.line(sweep_dir)}", code=130)
    if jobs.unfinished:  # a job's own stop (SLURM preempted it, timed it out), or lost
        fail(f"the sweep did not finish: {jobs.line(sweep_dir)}", code=1)


RESUME_USAGE = "usage: gradexp resume RUN_DIR|SWEEP_DIR [KEY=VALUE ...]"


def _quote(value: str) -> str:
    """A value for a Hydra override, quoted: run dirs hold "=" and "," (0_init=normal,...)."""
    return "'" + value.replace("'", "\\'") + "'"  # Hydra un-escapes a quote, nothing else


def _resume(args: list[str]) -> None:
    """Continue an interrupted run (or train a finished one on, trainer.steps=...) in its
    own run dir, with the overrides it was started with, then ARGS."""
    if not args or args[0] in ("-h", "--help"):
        print(RESUME_USAGE)
        print(
            "Continue the run in RUN_DIR from its checkpoint.pt, with the overrides it was"
            " started with (.hydra/overrides.yaml); KEY=VALUE: e.g. trainer.steps=5000 to"
            " train a finished run on."
        )
        raise SystemExit(0 if args else 2)
    from gradexp.sweep import MULTIRUN_FILE

    run_dir, extra = Path(args[0]), args[1:]
    if (run_dir / MULTIRUN_FILE).is_file():
        return _resume_sweep(run_dir, extra)
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        fail(f"{run_dir}: not a gradexp run dir (no .hydra/overrides.yaml); {RESUME_USAGE}")
    if any(a.startswith("-") for a in extra):
        fail(f"{' '.join(extra)}: only KEY=VALUE overrides here; {RESUME_USAGE}")
    given = {a.split("=", 1)[0].lstrip("+~") for a in extra}
    import yaml

    overrides = [
        str(o)
        for o in yaml.safe_load(saved.read_text()) or []  # as written: no interpolation
        if str(o).split("=", 1)[0].lstrip("+~") not in {*given, "trainer.resume"}
    ]
    from gradexp.checkpoint import never_started
    from gradexp.rundir import CHECKPOINT_FILE

    if not (run_dir / CHECKPOINT_FILE).exists() and never_started(run_dir):
        print(f"gradexp: {run_dir} stopped before its first checkpoint: starting it from step 0",
              file=sys.stderr)  # fmt: skip
    _train([*overrides, *extra, f"hydra.run.dir={_quote(str(run_dir))}", "trainer.resume=true"])


def _resume_sweep(sweep_dir: Path, extra: list[str]) -> None:
    """``gradexp resume SWEEP_DIR``: the sweep launched again into its own directory (its
    launcher, or the one ``extra`` names): finished jobs are not run again, stopped ones
    continue from their checkpoints, the others start."""
    from gradexp.sweep import RESUME_SWEEP_ENV, resume_args

    if any(a.startswith("-") for a in extra):
        fail(f"{' '.join(extra)}: only KEY=VALUE overrides here; {RESUME_USAGE}")
    try:
        args = resume_args(sweep_dir.absolute(), extra)
    except ConfigError as e:
        fail(str(e))
    os.environ[RESUME_SWEEP_ENV] = str(sweep_dir.absolute())
    try:
        _train(args)
    finally:
        os.environ.pop(RESUME_SWEEP_ENV, None)


SUBCOMMANDS = ("train", "resume", "report")


def _completion(args: list[str]) -> None:
    """Shell completion (``eval "$(gradexp -sc install=bash)"``). Hydra's completion
    script calls ``gradexp -sc query=bash`` with the whole command line in COMP_LINE and
    filters what it prints by the word being completed, falling back to the shell's own
    (file names) when nothing matches. The subcommand is completed here; after ``train``
    Hydra completes its overrides; after ``resume`` and ``report`` (run dirs) the shell
    completes paths."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if any(a.startswith("query=") for a in args):
        typed = len(words) - (0 if line.endswith(" ") else 1)  # words before the cursor's
        if typed <= 1:
            print(" ".join(SUBCOMMANDS))
            return
        if words[1] != "train":
            print()  # nothing of Hydra's: the shell completes the path
            return
        # Hydra completes its own app: drop the subcommand.
        os.environ["COMP_LINE"] = line.replace(" train", "", 1)
    _run_hydra(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradexp",
        description="A laboratory for vanishing and exploding gradients.",
        epilog="Run `gradexp train --help` for the config groups and their options.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"gradexp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "train",
        add_help=False,
        help="train one configuration, or a sweep with -m (Hydra overrides: key=value ...)",
    )
    sub.add_parser(
        "resume",
        add_help=False,
        help="continue an interrupted run in its run dir (RUN_DIR [KEY=VALUE ...])",
    )
    sub.add_parser(
        "report",
        add_help=False,
        help="compare finished runs: one table row per run (PATH... [--sort KEY] [--csv FILE]"
        " [--markdown FILE] [--png FILE])",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    if hasattr(signal, "SIGPIPE"):  # `gradexp train --help | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-sc", "--shell-completion"):
        return _completion(argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        raise SystemExit(2)
    if argv[0] == "train":
        return _train(argv[1:])
    if argv[0] == "resume":
        return _resume(argv[1:])
    if argv[0] == "report":
        from gradexp.report import main as report

        raise SystemExit(report(argv[1:]))
    parser.parse_args(argv)  # prints help, version, or an error naming the commands


if __name__ == "__main__":
    main()
