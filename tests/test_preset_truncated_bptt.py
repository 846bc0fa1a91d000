"""experiment=truncated_bptt: the copy task under full BPTT and truncation at k shorter
and longer than the delay, seeds 0-2; which symbols' dependencies fit in one chunk, the
accuracy that predicts, and the claim judged from the runs' test accuracy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from conftest import REPO_ROOT, composed
from gradexp.data import copy_task
from gradexp.report import RunRow

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from claims import truncated_bptt as claim  # noqa: E402


def test_the_preset_is_the_copy_task_with_k_on_both_sides_of_the_delay():
    cfg = composed("experiment=truncated_bptt")
    assert (cfg.model.name, cfg.optim.name, cfg.data.name) == ("lstm", "adam", "copy")
    d = cfg.data
    assert (d.symbols, d.length, d.delay) == (8, 5, 20)


def test_the_lag_of_every_symbol_is_length_plus_delay():
    x, y = copy_task(8, 5, 20, 4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 30, 10)
    assert torch.equal(x[:, :5].argmax(-1), y)  # shown at steps 0..4, recalled at 25..29
    assert bool((x[:, 24, 9] == 1).all()) and bool((x[:, 5:24, 8] == 1).all())


def test_which_dependencies_fit_a_chunk():
    assert claim.fits(0, 5, 20) == 5  # full BPTT: one chunk
    assert claim.fits(10, 5, 20) == 0  # shorter than the delay
    assert claim.fits(25, 5, 20) == 0  # longer than the delay, but not than the 25-step lag
    assert claim.fits(28, 5, 20) == 3  # symbols 0-2 are recalled at 25-27 < 28
    assert claim.fits(30, 5, 20) == 5  # k = T is full BPTT
    assert claim.prediction(0, 8, 5, 20) == 1.0
    assert claim.prediction(10, 8, 5, 20) == 1 / 8
    assert abs(claim.prediction(28, 8, 5, 20) - (1 / 8 + 7 / 8 * 3 / 5)) < 1e-12


def fake_run(root: Path, k: int, seed: int, acc: float | None) -> RunRow:
    path = root / f"{k}_{seed}"
    path.mkdir(parents=True)
    metrics = {} if acc is None else {"acc/test": acc, "loss/test": 2.08 * (1 - acc)}
    summary = {"status": "completed", "metrics": metrics}
    (path / "summary.json").write_text(json.dumps(summary))
    overrides = {
        "trainer.tbptt": str(k),
        "seed": str(seed),
        "data.symbols": "8",
        "data.length": "5",
        "data.delay": "20",
    }
    return RunRow(path.name, path, overrides, summary, "completed", None)


def sweep(root: Path, accs: dict[int, list[float | None]]) -> list[RunRow]:
    return [fake_run(root, k, s, a) for k, arm in accs.items() for s, a in enumerate(arm)]


def test_the_claim_is_judged_from_the_runs(tmp_path: Path):
    good = {
        0: [0.9, 0.8, 0.95],
        10: [0.13, 0.2, 0.12],
        25: [0.12, 0.14, 0.13],
        28: [0.6, 0.5, 0.66],
    }
    result = claim.evaluate(sweep(tmp_path / "a", good), tmp_path / "fig")
    assert result.verdict == "reproduced", result.why
    assert result.table.count("\n") == 5 and "| 28 | longer | 3/5 | 0.65 |" in result.table
    # a truncation shorter than the delay that learns anyway does not reproduce that part
    leak = {**good, 10: [0.45, 0.4, 0.5]}
    assert claim.evaluate(sweep(tmp_path / "b", leak), tmp_path / "fig").verdict == "partly"
    # k = 28 learning every symbol would say the chunks do not bound what is learned
    beyond = {**good, 28: [0.95, 0.97, 0.9]}
    assert claim.evaluate(sweep(tmp_path / "c", beyond), tmp_path / "fig").verdict == "partly"


def test_tiny_runs_do_not_crash_the_claim(tmp_path: Path):
    runs = sweep(tmp_path, {0: [None, 0.1, None], 10: [None] * 3})
    assert claim.evaluate(runs, tmp_path / "fig").verdict in ("partly", "not reproduced")
