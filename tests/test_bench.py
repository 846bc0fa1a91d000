"""The README's benchmark commands run (at a tiny size: the figures themselves are
measured by hand on a quiet machine, never asserted)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, cli_env

SCRIPT = REPO_ROOT / "scripts" / "bench_overhead.py"


def bench(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--workload", "mlp", "--steps", "3", "--repeats", "1", *args],
        capture_output=True, text=True, env=cli_env(), timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_overhead_benchmark_reports_a_ratio_per_variant(tmp_path: Path):
    out = bench()
    for variant in ("bare", "log every step", "log every 10 steps", "log first+last only"):
        assert f"{variant}:" in out and "ratio" in out, out
    assert "how quiet" in out


@pytest.mark.slow
def test_probe_cost_benchmark_lists_every_probe(tmp_path: Path):
    out = bench("--probes")
    for probe in ("task", "signal", "weight", "activation_health", "the loop itself"):
        assert f"{probe}:" in out, out


@pytest.mark.slow
def test_report_png_benchmark_reports_time_memory_and_size(tmp_path: Path):
    script = REPO_ROOT / "scripts" / "bench_report_png.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--runs", "30", "--repeats", "1"],
        capture_output=True, text=True, env=cli_env(), timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wall" in proc.stdout and "peak RSS" in proc.stdout, proc.stdout
    assert "flow.png 1200x900" in proc.stdout, proc.stdout  # 30 runs: the one summary figure


@pytest.mark.slow
def test_kernel_paths_script_runs_a_table_under_each_path(tmp_path: Path):
    script = REPO_ROOT / "scripts" / "kernel_paths.py"
    out = tmp_path / "paths.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--table", "time", "--paths", "native", "default",
         "--limit", "1", "--extra", "trainer.steps=3", "--json", str(out)],
        capture_output=True, text=True, env=cli_env(), timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["path"] for r in results] == ["native", "default"], results
    assert all(r["loss/test"] > 0 and r["verdicts"] for r in results), results


@pytest.mark.slow
def test_plugin_benchmark_times_the_tab_in_a_browser(tmp_path: Path):
    pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no Chromium here (apt-get install -y chromium)")
    script = REPO_ROOT / "scripts" / "bench_plugin.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--runs", "3", "--layers", "4", "--steps", "5",
         "--repeats", "1"],
        capture_output=True, text=True, env=cli_env(), timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for view in ("first screen drawn", "every run drawn", "one run opened"):
        assert view in proc.stdout, proc.stdout


def test_verdict_thresholds_script_separates_blow_ups_from_learning_runs():
    script = REPO_ROOT / "scripts" / "verdict_thresholds.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--steps", "40", "--seeds", "0", "--only", "blows up"],
        capture_output=True, text=True, env=cli_env(), timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if "blows up" in line]
    assert len(rows) == 3, proc.stdout
    for row in rows:
        max_loss, _, growth, _ = (float(x) for x in row.split()[-4:])
        # well past the default thresholds (10x), as the README's measurement says
        assert max_loss > 10 and growth > 10, row


def test_recurrent_benchmark_times_both_paths():
    script = REPO_ROOT / "scripts" / "bench_recurrent.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--steps", "2", "--repeats", "1", "--length", "8",
         "--hidden", "8", "--batch", "4"],
        capture_output=True, text=True, env=cli_env(), timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"rnn", "irnn", "lstm", "gru"}, proc.stdout
    assert all(row.rstrip().endswith("x") for row in rows.values())


def test_hessian_free_benchmark_times_a_product_per_family():
    script = REPO_ROOT / "scripts" / "bench_hessian_free.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--repeats", "1", "--batch", "4"],
        capture_output=True, text=True, env=cli_env(), timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"mlp", "cnn", "resnet", "rnn", "lstm"}, proc.stdout
    ratio = r"\d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\)"
    for row in rows.values():  # G v's ratio, then the HF step's, its CG iterations between
        assert re.search(rf" {ratio} .* \d+ +{ratio}$", row), row


def run_launcher_bench(*args: str, env: dict[str, str] | None = None) -> str:
    script = REPO_ROOT / "scripts" / "bench_launchers.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--jobs", "2", "--repeats", "1", *args],
        capture_output=True, text=True, env=cli_env(env), timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_launcher_benchmark_times_each_launcher_against_basic():
    out = run_launcher_bench("--launchers", "submitit_local")
    assert re.search(r"^basic: \d+\.\d s per sweep \(range ", out, re.M), out
    assert re.search(r"^submitit_local: \d+\.\d s per sweep .* s per job against basic$", out,
                     re.M), out  # fmt: skip
