"""Reproduce every paper claim the experiment presets make, in one command.

Runs each preset's sweep (``gradexp train -m experiment=NAME``, two jobs at a time),
judges the preset's claim on the runs (``scripts/claims/NAME.py``: what the paper says,
what counts as reproduced, the results table across seeds, figures), and writes:

- the measured part of each preset's page, docs/experiments/NAME.md, between the lines
  ``<!-- reproduce:begin -->`` and ``<!-- reproduce:end -->``;
- docs/experiments/results/NAME.json, what the page and the overview are made of;
- docs/reproductions.md, one row per claim (from every preset's results file, so
  ``--only`` refreshes one row and keeps the others).

    python scripts/reproduce.py                    # every preset, full length (~1 h)
    python scripts/reproduce.py --only saturation  # one preset
    python scripts/reproduce.py --short --docs /tmp/docs   # tiny runs, for the tests

``--short`` runs every job of every sweep, each cut to seconds (the claim's SHORT
overrides); its verdicts say nothing about the papers. It writes to a copy of docs/
(``--docs``), never to the repository's own pages.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from claims.common import VERDICTS, Result, natural  # noqa: E402
from gradexp.cli import CONFIG_DIR  # noqa: E402
from gradexp.report import load_runs, setting  # noqa: E402

PRESETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
BEGIN, END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
OVERVIEW = "reproductions.md"
RESULTS = Path("experiments") / "results"


def claim_module(preset: str) -> Any:
    if not (HERE / "claims" / f"{preset}.py").is_file():
        raise SystemExit(f"scripts/claims/{preset}.py: missing; every preset needs its claim")
    module = importlib.import_module(f"claims.{preset}")
    for name in ("PRESET", "PAPER", "CLAIM", "SHORT", "evaluate"):
        if not hasattr(module, name):
            raise SystemExit(f"scripts/claims/{preset}.py: defines no {name}")
    if preset != module.PRESET:
        raise SystemExit(f"scripts/claims/{preset}.py: PRESET is {module.PRESET!r}")
    return module


def machine() -> str:
    cpu = platform.machine() or "unknown"
    return f"{os.cpu_count()}-core {cpu} CPU, torch {metadata.version('torch')}"


def sweep_command(preset: str, sweep: Path, jobs: int, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "gradexp", "train", "-m", f"experiment={preset}",
        "hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}",
        f"hydra.sweep.dir={sweep}", "trainer.progress=off", *extra,
    ]  # fmt: skip


def run_sweep(preset: str, sweep: Path, jobs: int, extra: list[str], log: Path) -> float:
    """Run the preset's sweep into ``sweep``; its output goes to ``log``. Returns the wall
    time in seconds; raises RuntimeError (with the error's last line) when it fails."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(
            sweep_command(preset, sweep, jobs, extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            check=False,
        )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        raise RuntimeError(f"the sweep failed ({lines[-1] if lines else 'no output'}); see {log}")
    return wall


def seeds_of(runs: list[Any]) -> list[str]:
    found = {str(setting(run, "seed")) for run in runs}
    return sorted(found, key=natural)


def page_block(record: dict[str, Any], page: Path) -> str:
    """The measured part of a preset's page."""
    how = "--short " if record["short"] else ""
    lines = [
        BEGIN,
        f"**Measured** by `python scripts/reproduce.py {how}--only {record['preset']}` on "
        f"{record['date']}, {record['machine']}: {record['jobs']} jobs (seeds "
        f"{', '.join(record['seeds'])}) in {record['wall_s']:.0f} s, {record['workers']} at "
        "a time." + (" **Shortened runs: not a measurement.**" if record["short"] else ""),
        "",
    ]
    if record["table"]:
        lines += [record["table"], ""]
    lines += [f"**Verdict: {record['verdict']}.** {record['result']} {record['why']}".rstrip()]
    for figure in record["figures"]:
        rel = os.path.relpath(page.parent.parent / figure, page.parent)
        lines += ["", f"![{Path(figure).stem.replace('_', ' ')}]({rel})"]
    lines.append(END)
    return "\n".join(lines)


def write_page(page: Path, block: str) -> None:
    text = page.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise RuntimeError(f"{page} needs one {BEGIN} line and one {END} line after it")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert 0 < start < end
    page.write_text(text[:start] + block + text[end:])


def overview(docs: Path) -> str:
    """docs/reproductions.md from every preset's results file."""
    lines = [
        "# Reproductions",
        "",
        "Every experiment preset reproduces a paper's claim, judged from the runs by the "
        "preset's claim module (`scripts/claims/`); each row links the preset's page "
        "(setup beside the paper's, the table across seeds, why the verdict). Regenerate "
        "with `python scripts/reproduce.py` (every preset; `--only NAME` for one).",
        "",
        "| preset | paper | claim | our result, across seeds | verdict | wall time (2 cores) |",
        "|---|---|---|---|---|---:|",
    ]
    for preset in PRESETS:
        file = docs / RESULTS / f"{preset}.json"
        link = f"[{preset}](experiments/{preset}.md)"
        if not file.is_file():
            if not (HERE / "claims" / f"{preset}.py").is_file():
                lines.append(f"| {link} | - | - | no claim module yet | - | - |")
                continue
            module = claim_module(preset)
            lines.append(f"| {link} | {module.PAPER} | {module.CLAIM} | not run yet | - | - |")
            continue
        r = json.loads(file.read_text())
        short = " (shortened)" if r["short"] else ""
        lines.append(
            f"| {link} | {r['paper']} | {r['claim']} | {r['result']} | **{r['verdict']}**"
            f"{short} | {r['wall_s']:.0f} s |"
        )
    counts = {v: 0 for v in VERDICTS}
    for preset in PRESETS:
        file = docs / RESULTS / f"{preset}.json"
        if file.is_file():
            counts[json.loads(file.read_text())["verdict"]] += 1
    lines += ["", "Verdicts: " + ", ".join(f"{v} {n}" for v, n in counts.items()) + "."]
    return "\n".join(lines) + "\n"


def reproduce(preset: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    module = claim_module(preset)
    sweep = out / preset
    if sweep.exists():
        shutil.rmtree(sweep)
    sweep.mkdir(parents=True)
    extra = list(module.SHORT) if args.short else []
    wall = run_sweep(preset, sweep / "sweep", args.jobs, extra, sweep / "sweep.log")
    runs = load_runs([sweep / "sweep"])
    figures_dir = args.docs / "img" / preset
    figures_dir.mkdir(parents=True, exist_ok=True)
    result = module.evaluate(runs, figures_dir)
    if not isinstance(result, Result):
        raise TypeError(f"claims.{preset}.evaluate returned {type(result).__name__}")
    return {
        "preset": preset,
        "paper": module.PAPER,
        "claim": module.CLAIM,
        "verdict": result.verdict,
        "result": result.result,
        "why": result.why,
        "table": result.table,
        "figures": [Path(f).resolve().relative_to(args.docs.resolve()).as_posix()
                    for f in result.figures],
        "jobs": len(runs),
        "seeds": seeds_of(runs),
        "wall_s": round(wall, 1),
        "workers": args.jobs,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "short": args.short,
        "command": " ".join(["gradexp", *sweep_command(preset, Path("DIR"), args.jobs, extra)[3:]]),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=PRESETS, metavar="PRESET",
                        help=f"these presets only (of {', '.join(PRESETS)})")  # fmt: skip
    parser.add_argument("--short", action="store_true", help="tiny runs (for the tests)")
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time (default 2)")
    parser.add_argument(
        "--out", type=Path, help="where the sweeps go (default outputs/reproduce/DATE_TIME)"
    )
    parser.add_argument(
        "--docs", type=Path, help="the docs folder to write (default the repository's docs/)"
    )
    parser.add_argument(
        "--overview-only",
        action="store_true",
        help="rebuild docs/reproductions.md from the results files; run nothing",
    )
    args = parser.parse_args(argv)
    if args.docs is None:
        if args.short:
            parser.error("--short writes tiny runs' results: give it a --docs folder (a copy)")
        args.docs = REPO / "docs"
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be >= 1")
    for preset in args.only or PRESETS:
        claim_module(preset)  # every preset run has its claim, before anything runs
    if not args.overview_only:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        out = (args.out or REPO / "outputs" / "reproduce" / stamp).resolve()
        failed = []
        for preset in args.only or PRESETS:
            print(f"{preset}: running ...", flush=True)
            try:
                record = reproduce(preset, args, out)
            except Exception as e:  # one preset's failure does not lose the others
                failed.append(preset)
                print(f"{preset}: error: {e}", file=sys.stderr)
                if not isinstance(e, RuntimeError):
                    traceback.print_exc()
                continue
            page = args.docs / "experiments" / f"{preset}.md"
            write_page(page, page_block(record, page))
            results = args.docs / RESULTS
            results.mkdir(parents=True, exist_ok=True)
            (results / f"{preset}.json").write_text(json.dumps(record, indent=1) + "\n")
            print(
                f"{preset}: {record['verdict']} ({record['jobs']} jobs, {record['wall_s']:.0f} s)"
            )
        if failed:
            (args.docs / OVERVIEW).write_text(overview(args.docs))
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
            return 1
    (args.docs / OVERVIEW).write_text(overview(args.docs))
    print(f"wrote {args.docs / OVERVIEW}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
