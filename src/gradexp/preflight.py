"""Compose and validate every job of a command line before any job starts.

Hydra reports composition errors over several lines; a user of this tool gets
one line naming the bad value and the allowed ones, and a sweep with one bad
combination fails before its first job trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import NoReturn

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from gradexp.config import ALIASES, EXECUTION_KEYS, SCHEMAS, Config, resolve_alias, to_config
from gradexp.errors import ConfigError, shorten
from gradexp.rundir import check_free

MAX_JOBS = 512  # compose at most this many jobs of a sweep up front


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _describe(ex: Exception, overrides: list[str]) -> str:
    if isinstance(ex, MissingConfigException) and ex.missing_cfg_file and ex.options:
        group, _, option = ex.missing_cfg_file.rpartition("/")
        return f"{group}={option}: unknown option; choose from {', '.join(ex.options)}"
    cause = ex.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and dataclasses.is_dataclass(
        cause.object_type
    ):
        keys = ", ".join(f.name for f in dataclasses.fields(cause.object_type))
        return f"{cause.full_key}: unknown key; {_group_of(cause.full_key)} has {keys}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.object_type is dict:
        # A free-form dict (the Ray launcher's init and remote): Hydra adds a key with "+".
        return f"{cause.full_key}: unknown key; add it with +{cause.full_key}=..."
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        # The last override of a key is the one that counts (and the bad one).
        value = next(
            (o.split("=", 1)[1] for o in reversed(overrides) if o.split("=")[0] == key), None
        )
        prefix = f"{key}={value}" if value is not None else key or _first_line(str(ex))
        return f"{prefix}: {_first_line(str(cause))}"
    return _override_error(str(ex)).replace("\n", " ")


LEXER_ERRORS = ("LexerNoViableAltException", "token recognition error")


def _override_error(text: str, override: str | None = None) -> str:
    """Hydra's override parse error in one line; for a value its grammar cannot read
    unquoted (a non-ASCII path, a space), how to quote it. ``override``: the one that
    failed, when Hydra's message does not name it."""
    line = _first_line(text)
    kind, _, named = line.partition(": ")
    override = override or named
    if line.startswith(LEXER_ERRORS) and "=" in override:
        key, _, value = override.partition("=")
        return (
            f"{override}: Hydra cannot read this value unquoted; quote it for Hydra inside"
            f" the shell's quotes: '{key}=\"{value}\"'"
        )
    return line


def _group_of(full_key: str) -> str:
    return full_key.rpartition(".")[0] or "the config"


def parse_args(args: list[str]) -> argparse.Namespace:
    """Hydra's own command-line parser, with its errors as one line (no usage block)."""
    parser = get_args_parser()

    def error(message: str) -> NoReturn:
        if message.startswith("unrecognized arguments") and "=" in message:
            message += " (flags such as -m go before the key=value overrides)"
        raise ConfigError(message)

    parser.error = error  # type: ignore[method-assign]
    parsed = parser.parse_args(args)  # --version etc. print and exit 0, as in Hydra
    modes = [
        flag
        for flag, given in (("-m", parsed.multirun), ("--cfg", parsed.cfg), ("--info", parsed.info))
        if given
    ]
    if len(modes) > 1:
        raise ConfigError(f"{' and '.join(modes)}: choose one of them")
    return parsed


def _alias_resolved(override: Override) -> str | None:
    """The value of a group override with its aliases replaced by their options (as
    Hydra's override grammar writes it), or None when no value is an alias."""
    group, value = override.key_or_group, override.value()
    if isinstance(value, str):
        names = [value]
    elif isinstance(value, ChoiceSweep) and all(isinstance(v, str) for v in value.list):
        names = list(value.list)
    else:
        return None  # a glob, a range, a deletion: nothing an alias could be
    resolved = [resolve_alias(group, name) for name in names]
    if resolved == names:
        return None
    if not isinstance(value, ChoiceSweep):
        return resolved[0]
    text = ",".join(resolved)
    if value.shuffle:
        text = f"shuffle({text})"
    elif not value.simple_form or value.tags:
        text = f"choice({text})"
    return f"tag({','.join(sorted(value.tags))},{text})" if value.tags else text


def resolve_aliases(args: list[str]) -> list[str]:
    """The command line with each option alias (config.ALIASES: init=xavier) replaced by
    the option it stands for (init=xavier_uniform), also in a sweep's list of values."""
    parser = OverridesParser.create()
    replace = {}
    for arg in parse_args(args).overrides:
        if arg.split("=", 1)[0].lstrip("+~").split("@")[0] not in ALIASES:
            continue
        try:
            value = _alias_resolved(parser.parse_override(arg))
        except HydraException:
            continue  # job_overrides reports it
        if value is not None:
            replace[arg] = f"{arg.split('=', 1)[0]}={value}"
    return [replace.get(arg, arg) for arg in args]


def job_overrides(args: list[str]) -> tuple[list[list[str]], bool]:
    """The task overrides of each job the command line would run, and whether it is a sweep.

    A key searched over a range or interval (a sweeper plugin's: optuna) is left out: its
    values are picked when the sweep runs."""
    parsed = parse_args(args)
    task = [o for o in parsed.overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        overrides = OverridesParser.create().parse_overrides(task)
    except HydraException as e:
        raise ConfigError(_override_error(str(e))) from e
    if not parsed.multirun:
        return [task], False
    axes: list[list[str]] = []
    for o in overrides:
        key = o.get_key_element()
        if o.is_discrete_sweep():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        elif o.is_sweep_override():
            continue  # a range or interval for a sweeper plugin: validated when it runs
        else:
            axes.append([f"{key}={o.get_value_element_as_str()}"])
    return [list(job) for job in itertools.islice(itertools.product(*axes), MAX_JOBS)], True


# Hydra plugin options: (the plugin's module under hydra_plugins, gradexp's extra).
PLUGINS = {
    "hydra/launcher": {
        "joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib"),
        "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
        "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
        "ray": ("hydra_plugins.hydra_ray_launcher", "ray"),
    },
    "hydra/sweeper": {"optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna")},
}


def check_plugins(args: list[str]) -> None:
    """A launcher or sweeper whose Hydra plugin is not installed: one line saying which
    extra installs it (Hydra would list the options it has over several lines)."""
    import importlib.util

    for arg in parse_args(args).overrides:
        group, _, option = arg.partition("=")
        plugin = PLUGINS.get(group, {}).get(option)
        if plugin is None:
            continue
        module, extra = plugin
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"{arg}: its Hydra plugin is not installed; pip install 'gradexp[{extra}]'"
            )


def sweep_name_args(args: list[str]) -> list[str]:
    """For a sweep: the override that leaves the keys every job shares out of the job
    directory names, so a job is named by its number and what varies (0_init=normal;
    for an experiment, the keys its own sweep varies)."""
    jobs, multirun = job_overrides(args)
    # An experiment's sweep is in its config, a search's values are the sweeper's: every
    # key of the command line that job_overrides lists is shared.
    experiment = any(o.split("=", 1)[0] == "experiment" for o in jobs[0])
    searched = any(o.split("=", 1)[0] == "hydra/sweeper" for o in parse_args(args).overrides)
    if not multirun or (len(jobs) < 2 and not (experiment or searched)):
        return []
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in job:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    shared = [key for key, seen in values.items() if len(seen) == 1]
    keys = ",".join(dict.fromkeys([*EXECUTION_KEYS, *shared]))
    return [f"hydra.job.config.override_dirname.exclude_keys=[{keys}]"]


def _given(args: list[str], key: str) -> list[str]:
    """The values the command line gives ``key``, as Hydra reads them (quotes removed)."""
    parser = OverridesParser.create()
    values = []
    for arg in parse_args(args).overrides:
        if arg.split("=", 1)[0].lstrip("+") == key:
            try:
                values.append(str(parser.parse_override(arg).value()))
            except HydraException as e:
                raise ConfigError(_override_error(str(e), arg)) from None
    return values


def check_resume(args: list[str], cfg: Config) -> None:
    """trainer.resume=true: the run dir must hold a checkpoint trained with this config.
    Checked before Hydra rewrites the run dir's .hydra/ files."""
    given = _given(args, "hydra.run.dir")
    if not given:
        raise ConfigError(
            "trainer.resume=true: name the run to continue, hydra.run.dir=RUN_DIR"
            " (or: gradexp resume RUN_DIR)"
        )
    from gradexp.checkpoint import resume_state  # torch: only to resume
    from gradexp.rundir import CHECKPOINT_FILE

    resume_state(Path(given[-1]) / CHECKPOINT_FILE, cfg)


def launcher_args(args: list[str]) -> list[str]:
    """joblib starts all its workers at once, and an idle one that gets a terminal's
    Ctrl-C dies and breaks the pool: never more workers than jobs."""
    parsed = parse_args(args)
    if not parsed.multirun or "hydra/launcher=joblib" not in parsed.overrides:
        return []
    jobs, _ = job_overrides(args)
    if any(o.split("=", 1)[0] == "experiment" for o in jobs[0]):
        return []  # the experiment's own sweep: its size is in its config
    workers = os.cpu_count() or 1
    for value in _given(args, "hydra.launcher.n_jobs"):
        if value.lstrip("-").isdigit() and int(value) > 0:
            workers = int(value)  # joblib's negative n_jobs count back from the cores
    return [f"hydra.launcher.n_jobs={min(len(jobs), workers)}"]


# Less free space than this where the runs go: refused before anything is written (a run
# that fills the disk later stops cleanly, see gradexp.rundir).
MIN_FREE_BYTES = 1 << 20


def check_output_root(args: list[str], multirun: bool) -> None:
    """Fail early when the run directory cannot be created (Hydra would print a traceback),
    or its filesystem has no room left."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = _given(args, key)
    # Interpolations (${now:...}) resolve later: check the static part of the path.
    target = Path((given[-1] if given else "outputs").split("${")[0] or ".").absolute()
    created = next((d for d in reversed([target, *target.parents]) if not d.exists()), None)
    try:
        _check_output_root(key, target, args)
    except ConfigError:
        if created is not None:  # refused: leave no empty directory behind
            shutil.rmtree(created, ignore_errors=True)
        raise


def _check_output_root(key: str, target: Path, args: list[str]) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
        # A fresh, unique name: never clobbers (and then deletes) a file of the user's.
        with tempfile.NamedTemporaryFile(dir=target, prefix=".gradexp-write-test-"):
            pass
        free = shutil.disk_usage(target).free
        name_max = os.pathconf(target, "PC_NAME_MAX")
    except OSError as e:
        raise ConfigError(
            f"{key}={shorten(str(target))}: cannot be written ({e.strerror})"
        ) from None
    if free < MIN_FREE_BYTES:
        raise ConfigError(
            f"{key}={target}: only {free // 1024} KiB free on its filesystem; a run needs at"
            f" least {MIN_FREE_BYTES >> 20} MiB: free some space or choose another {key}"
        )
    for name in _given(args, "hydra.job.name"):  # the run's log file: <name>.log
        if len(f"{name}.log".encode()) > name_max:
            raise ConfigError(
                f"hydra.job.name={shorten(name)}: too long for a file name (its log file"
                f" {name[:8]}....log would exceed {name_max} bytes)"
            )


RAY_ADDRESS_KEY = "hydra.launcher.ray.init.address"


def check_ray_address(args: list[str]) -> None:
    """hydra/launcher=ray joining a cluster: something must answer at its address (Ray's
    own failure is a traceback after a 20 s wait). auto: a cluster started on this
    machine (``ray start --head``) or RAY_ADDRESS; HOST:PORT, ray://HOST:PORT: a TCP
    connection within 5 s."""
    given = _given(args, RAY_ADDRESS_KEY)
    if "hydra/launcher=ray" not in parse_args(args).overrides or not given:
        return
    address = given[-1]
    if address in ("local", "None", "null", "") or "${" in address:
        return
    if address == "auto":
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if os.environ.get("RAY_ADDRESS") or current.is_file():
            return
        raise ConfigError(
            f"{RAY_ADDRESS_KEY}=auto: no Ray cluster was started on this machine (ray start"
            " --head) and RAY_ADDRESS is not set; give the cluster's HOST:PORT, or"
            " address=local for a local instance"
        )
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"{RAY_ADDRESS_KEY}={address}: not an address; choose local, auto, HOST:PORT or"
            " ray://HOST:PORT"
        )
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(
            f"{RAY_ADDRESS_KEY}={address}: nothing answers there ({e.strerror or e}); start"
            " the cluster (ray start --head) or check its address"
        ) from None


def check_run_dirs(args: list[str], multirun: bool, resume: bool) -> None:
    """A run dir belongs to one run. A single run named by hydra.run.dir takes its lock now,
    before Hydra writes its .hydra/ files, and holds it until the process ends (refused
    when another process holds it, or when the dir holds a run and this is no resume).
    A sweep named by hydra.sweep.dir must not land on another sweep's jobs: Hydra would
    rewrite their .hydra/ files before any job could refuse."""
    from gradexp.rundir import claim, holds_run

    if not multirun:
        given = _given(args, "hydra.run.dir")
        if given and "${" not in given[-1]:
            claim(Path(given[-1]), resume)
        return
    given = _given(args, "hydra.sweep.dir")
    if not given or "${" in given[-1] or not Path(given[-1]).is_dir():
        return
    root = Path(given[-1])
    from gradexp.sweep import RESUME_SWEEP_ENV

    if os.environ.get(RESUME_SWEEP_ENV) == str(root.absolute()):
        return  # gradexp resume SWEEP_DIR: its jobs continue (gradexp.cli._train_job)
    runs = [d for d in sorted(root.iterdir()) if d.is_dir() and holds_run(d)]
    if runs:
        raise ConfigError(
            f"hydra.sweep.dir={root} already holds {len(runs)} job(s) of a sweep"
            f" ({runs[0].name}, ...): continue one with `gradexp resume {runs[0]}`, or choose"
            " another hydra.sweep.dir"
        )


def _check_names(cfg: Config, config_dir: str) -> None:
    """A group's ``name`` picks its implementation: it must be one of the group's options."""
    for group in SCHEMAS:
        node = getattr(cfg, group)
        name = getattr(node, "name", None)
        if name is None:
            continue
        options = sorted(p.stem for p in (Path(config_dir) / group).glob("*.yaml"))
        if name not in options:
            raise ConfigError(f"{group}.name={name}: unknown; choose from {', '.join(options)}")


def _split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """The command line's overrides of Hydra's own config (hydra.*, hydra/launcher=...) and
    of the task's."""
    overrides = parse_args(args).overrides
    hydra_overrides = [o for o in overrides if o.lstrip("+~").startswith("hydra")]
    return hydra_overrides, [o for o in overrides if o not in hydra_overrides]


def _compose(config_name: str, overrides: list[str], with_hydra: bool = False) -> DictConfig:
    try:
        return compose(config_name, overrides=overrides, return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_describe(e, overrides)) from e
    except OverflowError as e:  # an integer of hundreds of digits for a float key
        raise ConfigError(_overflow(overrides)) from e


def _overflow(overrides: list[str]) -> str:
    """The override whose number no float can hold, named in one line."""
    for override in reversed(overrides):
        value = override.partition("=")[2].strip().lstrip("+-")
        if value.isdigit() and len(value) > 308:
            return f"{shorten(override)}: too large for a float (at most about 1.8e308)"
    return "a number in the overrides is too large for a float (at most about 1.8e308)"


def without_hydra(cfg: DictConfig) -> DictConfig:
    """``cfg`` (composed with Hydra's own config) without it: the job's config, as Hydra
    hands it to the job."""
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg


def compose_run(args: list[str], config_dir: str, config_name: str = "config") -> DictConfig:
    """The config Hydra composes for this (single-run) command line, with Hydra's own
    (``hydra``); ConfigError (one line) if it does not compose."""
    hydra_overrides, task = _split_overrides(args)
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return _compose(config_name, [*hydra_overrides, *task], with_hydra=True)


def _check_job(args: list[str], cfg: DictConfig, config_dir: str, multirun: bool) -> Config:
    """One job's composed config, typed and validated (with the checks only a whole
    command line can make: resume, the run dir's checkpoint)."""
    typed = to_config(cfg)
    _check_names(typed, config_dir)
    if typed.trainer.resume:
        if multirun:
            raise ConfigError(
                "trainer.resume=true with -m: resume each job of a sweep with"
                " gradexp resume JOB_DIR"
            )
        check_resume(args, typed)
    return typed


def preflight(args: list[str], config_dir: str, config_name: str = "config") -> None:
    """Raise ConfigError (one line) if any job of this command line would fail to compose.

    A single run is composed once, as Hydra will compose it (with Hydra's own config); a
    sweep's jobs one by one, then what Hydra composes before any job (with Hydra's own
    config, without the swept values)."""
    check_plugins(args)
    check_ray_address(args)
    jobs, multirun = job_overrides(args)
    parsed = parse_args(args)
    if not multirun and (given := _given(args, "hydra.run.dir")):
        check_free(Path(given[-1]))  # a run in it now: say so first (resume reads its files)
    hydra_overrides, task = _split_overrides(args)
    if not multirun:
        typed = [_check_job(args, without_hydra(compose_run(args, config_dir)), config_dir, False)]
    else:
        typed = _preflight_sweep(args, jobs, hydra_overrides, task, config_dir, config_name)
    gpus = {t.trainer.device for t in typed if t.trainer.device.startswith("cuda")}
    if gpus:  # torch only when a GPU is asked for: is it there?
        from gradexp.device import resolve_device

        for device in sorted(gpus):
            resolve_device(device)
    # After composing: a bad config leaves no empty run or sweep directory behind.
    # --cfg and --info only print, and write nothing.
    if not (parsed.cfg or parsed.info):
        if runs_here(args):
            check_memory(typed)
        check_output_root(args, multirun)
        check_run_dirs(args, multirun, any(t.trainer.resume for t in typed))


# The launchers whose jobs run on this machine: their memory is this machine's.
LOCAL_LAUNCHERS = ("basic", "joblib", "submitit_local")


def runs_here(args: list[str]) -> bool:
    """Whether the command's jobs run on this machine (not on SLURM's or Ray's nodes)."""
    chosen = [
        o.partition("=")[2] for o in parse_args(args).overrides if o.startswith("hydra/launcher=")
    ]
    return not chosen or chosen[-1] in LOCAL_LAUNCHERS


def check_memory(typed: list[Config]) -> None:
    """A job that needs more memory than this machine has free: refused before any job
    starts, in the line the job itself would fail with (gradexp.resources)."""
    from gradexp.config import flat
    from gradexp.device import resolve_device
    from gradexp.errors import RunError
    from gradexp.resources import check_memory as check

    seen = set()
    for cfg in typed:
        key = tuple(  # what the estimate reads: a sweep over seeds or lr checks once
            (k, str(v))
            for k, v in flat(cfg).items()
            if k.startswith(("model.", "data.", "optim."))
            and not k.endswith(("seed", "lr"))
            or k in ("trainer.batch_size", "trainer.device")
        )
        if key in seen:
            continue
        seen.add(key)
        try:
            check(cfg, resolve_device(cfg.trainer.device))
        except RunError as e:
            raise ConfigError(str(e)) from None


def _preflight_sweep(
    args: list[str],
    jobs: list[list[str]],
    hydra_overrides: list[str],
    task: list[str],
    config_dir: str,
    config_name: str,
) -> list[Config]:
    swept = [o for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()]
    swept_args = {o.input_line for o in swept}
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        typed = [
            _check_job(args, _compose(config_name, overrides), config_dir, True)
            for overrides in jobs
        ]
        # What Hydra composes before any job: with Hydra's own keys (hydra.*,
        # hydra/launcher=...) and without the swept values.
        base = [*hydra_overrides, *(o for o in task if o not in swept_args)]
        try:
            compose(config_name, base, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as e:
            message = _describe(e, base)
            failing = getattr(e.__cause__, "full_key", None) or ""
            hydra_group = isinstance(e, MissingConfigException) and str(
                e.missing_cfg_file
            ).startswith("hydra/")  # hydra/launcher=foo: nothing to do with the sweep
            unreadable = isinstance(e, OverrideParseException)
            if swept and not str(failing).startswith("hydra.") and not (hydra_group or unreadable):
                # every job composes: only the sweep's base config does not
                message += (
                    f" (a sweep's config is composed first without its swept values,"
                    f" {' '.join(sorted(swept_args))}: choose the group that has this key"
                    " outside the sweep)"
                )
            raise ConfigError(message) from e
    return typed
