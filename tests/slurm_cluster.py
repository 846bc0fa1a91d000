"""A real single-node SLURM cluster for tests: scripts/cluster/slurm_local.sh up ... down.

Not a test module (pytest collects ``test_*.py``); tests import it the way they import
conftest's helpers. A session-scoped fixture::

    from slurm_cluster import slurm_cluster

    @pytest.fixture(scope="session")
    def slurm(tmp_path_factory):
        with slurm_cluster(tmp_path_factory.mktemp("slurm")) as facts:
            yield facts

The cluster runs munged, MariaDB, slurmdbd, slurmctld and slurmd as root (about 10 s to start
from nothing, 4 s again on the same directory); ``sacct`` answers, ``scontrol requeue`` re-runs
a job after ``facts["requeue_delay_s"]``, and a job in ``facts["preempting_partition"]`` requeues
the jobs of the default partition whose CPUs it needs. Tests are skipped (one line) when the
process is not root or the Debian packages cannot be installed; a cluster that does not come
up fails the test. While the context is open ``SLURM_CONF`` is set in ``os.environ``, so
``sbatch`` from this process and its children (submitit, Hydra's launcher) reach this cluster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "cluster" / "slurm_local.sh"
PORT_BASE = 6817


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _tail(proc: subprocess.CompletedProcess, n: int = 15) -> str:
    return "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-n:])


def _port_base() -> int:
    """6817 for the main process; under pytest-xdist, 10 ports further per worker (gw1: 6827)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    return PORT_BASE + 10 * index


@contextlib.contextmanager
def slurm_cluster(
    tmp_root: str | os.PathLike[str],
    *,
    install: bool = True,
    timeout: float = 180,
) -> Iterator[dict[str, Any]]:
    """Start a cluster in ``tmp_root/slurm``, yield facts about it, stop it on exit.

    ``install``: when ``sbatch`` (or another part) is missing, ``apt-get install`` the packages
    (``slurm_local.sh install``, root only); False skips instead.
    """
    if os.name != "posix" or shutil.which("bash") is None:
        pytest.skip("SLURM cluster: needs a POSIX system with bash")
    if os.geteuid() != 0:
        pytest.skip("SLURM cluster: needs root (starts munged, MariaDB and the SLURM daemons)")
    env = dict(os.environ)
    env.pop("SLURM_CONF", None)  # the script sets its own
    env["SLURM_LOCAL_PORT_BASE"] = str(_port_base())
    daemons = shutil.which("slurmdbd", path="/usr/sbin:/usr/bin")
    if shutil.which("sbatch") is None or daemons is None:
        if not install:
            pytest.skip("SLURM cluster: sbatch not installed (slurm_local.sh install)")
        try:
            proc = _run(["install"], env, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip("SLURM cluster: installing the packages took over 900 s")
        if proc.returncode != 0:
            last = _tail(proc, 1) or f"exit status {proc.returncode}"
            pytest.skip(f"SLURM cluster: cannot install the packages ({last})")

    directory = Path(tmp_root).resolve() / "slurm"
    slurm_conf = directory / "etc" / "slurm.conf"
    try:
        up = _run(["up", str(directory)], env, timeout=timeout)
    except subprocess.TimeoutExpired:
        _run(["down", str(directory)], env, timeout=120)
        pytest.fail(f"SLURM cluster: `slurm_local.sh up` took over {timeout} s", pytrace=False)
    if up.returncode != 0:  # once more: on a loaded machine a daemon may be slow to start
        up = _run(["up", str(directory)], env, timeout=timeout)
    if up.returncode != 0:
        pytest.fail(f"SLURM cluster did not come up:\n{_tail(up)}", pytrace=False)

    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(slurm_conf)
    try:
        yield _facts(directory, slurm_conf, env)
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        down = _run(["down", str(directory)], env, timeout=180)
        if down.returncode != 0:
            raise RuntimeError(f"slurm_local.sh down failed:\n{_tail(down)}")


def _facts(directory: Path, slurm_conf: Path, env: dict[str, str]) -> dict[str, Any]:
    conf: dict[str, str] = {}
    node: dict[str, str] = {}
    for line in slurm_conf.read_text().splitlines():
        if line.startswith("NodeName="):
            node = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        elif "=" in line and not line.startswith(("#", "PartitionName=")):
            key, value = line.split("=", 1)
            conf[key] = value
    cred_expire = 120
    for opt in conf.get("AuthInfo", "").split(","):
        if opt.startswith("cred_expire="):
            cred_expire = int(opt.split("=", 1)[1])
    return {
        "dir": directory,
        "slurm_conf": str(slurm_conf),
        "env": {"SLURM_CONF": str(slurm_conf)},
        "cluster": conf.get("ClusterName"),
        "partition": "debug",  # the default partition, MaxTime=UNLIMITED
        "preempting_partition": "urgent",  # PriorityTier 2: requeues debug's jobs
        "node": node.get("NodeName"),
        "cpus": int(node.get("CPUs", "1")),
        "real_memory_mb": int(node.get("RealMemory", "0")),
        # A requeued job may start again after cred_expire + 1 s (and a scheduling pass).
        "requeue_delay_s": cred_expire + 1,
        "port_base": int(env["SLURM_LOCAL_PORT_BASE"]),
        "logs": directory / "log",
        "script": str(SCRIPT),
    }
