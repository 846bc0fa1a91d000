"""Hydra's submitit launchers (``submitit_slurm``, ``submitit_local``), waiting for each
job on its own.

The plugin waits for its jobs in order and raises the first one that ended without a
result: a job killed hard (the OOM killer, a node lost) or signalled while Python was
still starting, before any handler was there. The driver
then printed submitit's traceback and stopped waiting for the jobs after it, which ran
on unwatched. Here such a job is one line, every other job is waited for, and the
driver's report lists it (``gradexp resume SWEEP_DIR`` runs it again).

Without SLURM accounting (no ``sacct``) submitit cannot tell a job that is gone from
one still running, and waits forever: a job that ``squeue`` says has ended, with no
result, is gone (``Queue``).

``gradexp.sweep.SweepCallback`` puts the launchers of hydra_plugins.
gradexp_submitit_launcher, whose ``launch`` is this module's, in place of the plugin's
own, for a launcher chosen on the command line or in a config alike. Nothing here is
imported before a sweep with one of them: Hydra imports every plugin at start-up.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The plugin's classes, and gradexp's in their place (Hydra makes a launcher only of a
# class in the hydra_plugins package: src/hydra_plugins/gradexp_submitit_launcher).
PLUGIN_TARGETS = {
    f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{name}":
        f"hydra_plugins.gradexp_submitit_launcher.{name}"
    for name in ("LocalLauncher", "SlurmLauncher")
}  # fmt: skip
log = logging.getLogger(__name__)
POLL_S = 1.0  # how often a job's result file is looked for (submitit's own wait)
QUEUE_POLL_S = 10.0  # how often squeue is asked about a SLURM sweep's jobs
# SLURM's states of a job that has ended (squeue --states): any other may yet write its
# result (PREEMPTED too: a preempted job may be requeued; one cancelled leaves squeue
# after MinJobAge, and is gone then).
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
         "OUT_OF_MEMORY", "TIMEOUT"}  # fmt: skip


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], first: int) -> list[Any]:
    """The plugin's ``BaseSubmititLauncher.launch`` (the same executor, parameters and
    job arguments), each job then waited for on its own: ``wait`` and ``result``."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    assert launcher.config is not None
    cluster = launcher._EXECUTOR  # "slurm", "local"
    params = dict(launcher.params)
    folder = params.pop("submitit_folder")
    init = {f"{cluster}_{k}": params.pop(k) for k in ("max_num_timeout",) if k in params}
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **init)
    shared = set(OmegaConf.structured(BaseQueueConf).keys())  # the others are prefixed
    executor.update_parameters(
        **{k if k in shared else f"{cluster}_{k}": v for k, v in params.items()}
    )
    sweep = launcher.config.hydra.sweep
    log.info(f"Submitit '{cluster}' sweep output dir : {sweep.dir}")
    Path(str(sweep.dir)).mkdir(parents=True, exist_ok=True)
    if "mode" in sweep:
        os.chmod(str(sweep.dir), mode=int(str(sweep.mode), 8))
    nums = list(range(first, first + len(job_overrides)))
    for num, overrides in zip(nums, job_overrides):
        log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
    jobs = executor.map_array(
        launcher,
        [list(o) for o in job_overrides],
        ["hydra.sweep.dir"] * len(nums),
        nums,
        [f"job_id_for_{n}" for n in nums],
        [Singleton.get_state()] * len(nums),
    )
    optimizing = launcher.config.hydra.sweeper.get("direction") is not None  # optuna
    queue = Queue([j.job_id for j in jobs]) if cluster == "slurm" else None
    # In order, as the plugin does (one job's files polled at a time), but to the end.
    return [
        result(job, num, overrides, wait(job, queue), Path(str(sweep.dir)), optimizing)
        for job, num, overrides in zip(jobs, nums, job_overrides)
    ]


def wait(job: Any, queue: Queue | None) -> str | None:
    """Until ``job`` is done (None), or gone: SLURM's last word on it (``queue``).
    submitit's done() looks for the result file, and asks sacct at a growing interval;
    sacct may not know the job (no accounting) or may have stopped answering (slurmdbd
    down: its last state is kept)."""
    while not job.done():
        ended = queue.ended(job.job_id) if queue is not None else None
        if ended is not None and not job.done():
            return ended
        time.sleep(POLL_S)
    return None


class Queue:
    """What squeue says of a sweep's SLURM jobs, asked at most every QUEUE_POLL_S. A
    job has ended when squeue has said so twice in a row: an ended state, or no longer
    listing a job it listed before (MinJobAge). A job it never listed (another cluster's,
    submitted with -M) is left to submitit; when squeue cannot answer (the controller
    down), nothing is concluded."""

    def __init__(self, job_ids: Sequence[str]) -> None:
        self.arrays = sorted({i.split("_")[0] for i in job_ids})  # one squeue for all
        self.job_ids = list(job_ids)
        self.seen: set[str] = set()
        self.said: dict[str, str] = {}  # job id: how it ended, at squeue's last answer
        self.strikes: dict[str, int] = {}
        self.asked = time.monotonic()

    def ended(self, job_id: str) -> str | None:
        if time.monotonic() - self.asked >= QUEUE_POLL_S:
            self.asked = time.monotonic()
            self.update(squeue(self.arrays))
        return self.said.get(job_id) if self.strikes.get(job_id, 0) >= 2 else None

    def update(self, states: dict[str, str] | None) -> None:
        if states is None:
            return
        self.seen |= states.keys()
        for job_id in self.job_ids:
            state = states.get(job_id)
            if state in ENDED:
                self.said[job_id] = f"state {state}"
            elif state is None and job_id in self.seen:
                self.said[job_id] = "no longer known to SLURM"
            else:
                self.said.pop(job_id, None)
            self.strikes[job_id] = self.strikes.get(job_id, 0) + 1 if job_id in self.said else 0


def squeue(jobs: Sequence[str]) -> dict[str, str] | None:
    """SLURM's state of each job (array task) it still knows of ``jobs``; None when it
    cannot answer."""
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--array", "--states=all", "--format=%i %T",
             "--jobs=" + ",".join(jobs)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:  # it has forgotten every one of them (MinJobAge), or is down
        return {} if "Invalid job id" in out.stderr else None
    pairs = (line.split(None, 1) for line in out.stdout.splitlines())
    return {pair[0]: pair[1].strip() for pair in pairs if len(pair) == 2}


def result(
    job: Any,
    num: int,
    overrides: Sequence[str],
    gone: str | None,
    sweep_dir: Path,
    optimizing: bool = False,
) -> Any:
    """The job's own JobReturn; for a job that ended without one, one line saying why,
    then a return the sweep reads: None (gradexp.cli's report lists the job), or for an
    optimizing sweeper a failed trial (its max_failure_rate decides, as for a job that
    stopped). Such a job that had saved no checkpoint gets the summary.json it could not
    write."""
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import FailedJobError, UncompletedJobError

    if gone is not None:  # its result file may come late on a shared filesystem
        deadline = time.monotonic() + job._results_timeout_s  # as long as submitit waits
        while not job.paths.result_pickle.exists() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if job.paths.result_pickle.exists():
            gone = None
    if gone is None:
        try:
            return job.results()[0]
        except FailedJobError as e:  # raised in the job before gradexp's own code ran
            lines = str(e).splitlines()  # the job's traceback, between lines of dashes
            rules = [i for i, line in enumerate(lines) if line and set(line) == {"-"}]
            trace = [x for x in lines[rules[0] + 1 : rules[-1]] if x.strip()] if rules else []
            why = trace[-1].strip() if trace else lines[0]
        except UncompletedJobError:
            why = f"state {job.state}"
    else:
        why = gone
    from gradexp.checkpoint import SweepStop

    print(f"gradexp: job {num} (id {job.job_id}) ended without a result ({why});"
          f" its log: {job.paths.stderr}", file=sys.stderr)  # fmt: skip
    if SweepStop.current is not None:
        SweepStop.current.lost[num] = why
    unsaid(sweep_dir, num, why)
    if optimizing:
        error = RuntimeError(f"ended without a result ({why}): not a trial's result")
        return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error)
    return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)


def unsaid(sweep_dir: Path, num: int, why: str) -> None:
    """Job ``num``'s summary.json, when it ended without a result before its first
    checkpoint (its directory holds no summary and no checkpoint): interrupted at step
    0, and why; a resume starts it again. A job killed later keeps its directory as it
    left it (its checkpoint is what a resume continues from)."""
    from gradexp.rundir import CHECKPOINT_FILE, SUMMARY_FILE, minimal_summary, write_summary

    for job_dir in sweep_dir.glob(f"{num}*/.hydra"):
        job_dir = job_dir.parent
        if job_dir.name.split("_", 1)[0] != str(num):
            continue
        if not (job_dir / SUMMARY_FILE).exists() and not (job_dir / CHECKPOINT_FILE).exists():
            write_summary(
                job_dir, minimal_summary("interrupted", f"ended before its first checkpoint: {why}")
            )
