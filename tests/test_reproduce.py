"""scripts/reproduce.py: every preset has its claim, the shortened mode runs every job of
every preset end to end and writes the pages and the overview, and the repository's
pages and docs/reproductions.md are what the script wrote (nobody edited a result by
hand)."""

from __future__ import annotations

import importlib
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, describe

SCRIPT = REPO_ROOT / "scripts" / "reproduce.py"
sys.path.insert(0, str(REPO_ROOT / "scripts"))

reproduce = importlib.import_module("reproduce")
from claims.common import VERDICTS, Result, judge, spread  # noqa: E402

DOCS = REPO_ROOT / "docs"


def sweep_size(preset: str) -> int:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=reproduce.CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}"], return_hydra_config=True)
    axes = [str(v).split(",") for v in cfg.hydra.sweeper.params.values()]
    return len(list(itertools.product(*axes)))


@pytest.mark.parametrize("preset", reproduce.PRESETS)
def test_every_preset_has_its_claim(preset: str):
    module = reproduce.claim_module(preset)
    assert module.PAPER.strip() and module.CLAIM.strip()
    assert all(isinstance(o, str) and "=" in o for o in module.SHORT), module.SHORT
    assert callable(module.evaluate)


def test_the_claim_helpers():
    assert judge([True, True]) == "reproduced"
    assert judge([True, False]) == "partly"
    assert judge([False, False]) == "not reproduced"
    assert spread([3.0, 1.0, 2.0]) == "2 (1-3)"
    assert spread([1.0, None], missing="never") == "1, 1/2 never"
    assert spread([-0.5, -0.25, 1.0]) == "-0.25 (-0.5 to 1)"
    with pytest.raises(ValueError, match="verdict 'maybe'"):
        Result("maybe", "", "")


def test_a_page_without_its_markers_is_refused(tmp_path: Path):
    page = tmp_path / "x.md"
    page.write_text("# x\n\nno markers\n")
    with pytest.raises(RuntimeError, match="reproduce:begin"):
        reproduce.write_page(page, "block")
    assert page.read_text() == "# x\n\nno markers\n"


def test_short_without_a_docs_copy_is_refused():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--short"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2, describe(proc)
    assert "--docs" in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("preset", reproduce.PRESETS)
def test_the_pages_hold_what_the_script_wrote(preset: str):
    """Each page's measured block is the one its results file makes, and the results
    come from a full run (not the shortened mode) of the sweep the preset defines now."""
    record = json.loads((DOCS / reproduce.RESULTS / f"{preset}.json").read_text())
    page = DOCS / "experiments" / f"{preset}.md"
    text = page.read_text()
    block = text[text.index(reproduce.BEGIN) : text.index(reproduce.END) + len(reproduce.END)]
    assert block == reproduce.page_block(record, page)
    assert not record["short"]
    assert record["verdict"] in VERDICTS
    assert record["jobs"] == sweep_size(preset), "the page predates the preset's sweep"
    assert len(record["seeds"]) >= 3
    for figure in record["figures"]:
        assert (DOCS / figure).is_file(), figure


def test_the_overview_is_current():
    assert (DOCS / "reproductions.md").read_text() == reproduce.overview(DOCS)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=1500,
    )


@pytest.mark.slow
def test_the_shortened_mode_end_to_end(tmp_path: Path):
    """--only one preset writes its page and its row, the others say "not run yet"; then
    the whole run (every job of every preset, cut short) writes every page and row."""
    docs = tmp_path / "docs"
    shutil.copytree(
        DOCS / "experiments", docs / "experiments", ignore=shutil.ignore_patterns("results")
    )
    short = ["--short", "--docs", str(docs), "--out", str(tmp_path / "out")]
    first = reproduce.PRESETS[0]
    proc = run_script(*short, "--only", first)
    assert proc.returncode == 0, describe(proc)
    rows = (docs / "reproductions.md").read_text().splitlines()
    assert sum("not run yet" in row for row in rows) == len(reproduce.PRESETS) - 1
    assert "(shortened)" in next(row for row in rows if f"[{first}]" in row)

    proc = run_script(*short)
    assert proc.returncode == 0, describe(proc)
    overview = (docs / "reproductions.md").read_text()
    for preset in reproduce.PRESETS:
        record = json.loads((docs / reproduce.RESULTS / f"{preset}.json").read_text())
        assert record["short"] and record["verdict"] in VERDICTS
        assert record["jobs"] == sweep_size(preset)  # every job of the sweep ran
        text = (docs / "experiments" / f"{preset}.md").read_text()
        assert "**Shortened runs: not a measurement.**" in text
        assert f"**Verdict: {record['verdict']}.**" in text
        assert f"[{preset}](experiments/{preset}.md)" in overview
        for figure in record["figures"]:
            assert (docs / figure).is_file()
    assert "not run yet" not in overview
