"""How a README table's figures vary with the CPU's kernels and the seed.

torch picks its CPU kernels by what the processor offers (AVX512, AVX2, generic); the
same seed can train differently under each. This runs each command of a README table
under every kernel path this machine has (``ATEN_CPU_CAPABILITY``) and the given seeds,
and prints what each gave: the figures a test may hold exactly are the ones that agree.

    python scripts/kernel_paths.py --table time --seeds 0
    python scripts/kernel_paths.py --table tutorial --seeds 0 1 2 --paths default avx2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = ("native", "avx2", "default")  # native: whatever torch picks here


def table_commands(table: str) -> list[str]:
    """The `gradexp train ...` commands of a README table: tutorial or time."""
    readme = (REPO / "README.md").read_text()
    if table == "tutorial":
        # The tutorial's section only (other tables show commands too), each command once
        # (its table across seeds repeats them).
        readme = readme[
            readme.index("## Tutorial") : readme.index("\n## ", readme.index("## Tutorial") + 1)
        ]
        pattern = r"^\| `(gradexp train[^`]*)` \|"
    else:
        pattern = r"^\| [^|`]+ \| `(gradexp train[^`]*)` \|"
    return list(dict.fromkeys(re.findall(pattern, readme, re.MULTILINE)))


def run(command: str, path: str, seed: int, extra: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if path != "native":
        env["ATEN_CPU_CAPABILITY"] = path
    with tempfile.TemporaryDirectory() as tmp:
        args = [*command.split()[2:], f"seed={seed}", "trainer.progress=off", *extra]
        proc = subprocess.run(
            [sys.executable, "-m", "gradexp", "train", *args, f"hydra.run.dir={tmp}/run"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1:]}
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
    metrics = summary.get("metrics", {})
    time = summary.get("time") or []
    ratio = None
    if time:
        norms = time[-1]["grad_norm"]["first"]
        ratio = norms[0] / norms[-1] if norms[-1] else None
    return {
        "acc/test": metrics.get("acc/test"),
        "loss/test": metrics.get("loss/test"),
        "bwd_ratio": metrics.get("flow/signal_bwd_ratio"),
        "time_ratio": ratio,
        "verdicts": sorted({v["kind"] for v in summary.get("verdicts", [])}),
    }


def fmt(x: object) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=("tutorial", "time"), default="time")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--paths", nargs="+", default=list(PATHS))
    parser.add_argument("--json", type=Path, help="also write every result here")
    parser.add_argument("--limit", type=int, help="only the table's first N commands")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="overrides added to every command (a smoke test)"
    )
    args = parser.parse_args()
    results = []
    for command in table_commands(args.table)[: args.limit]:
        print(command, flush=True)
        for path in args.paths:
            for seed in args.seeds:
                result = {
                    "command": command,
                    "path": path,
                    "seed": seed,
                    **run(command, path, seed, args.extra),
                }
                results.append(result)
                shown = "  ".join(
                    f"{k} {fmt(v)}" for k, v in result.items() if k not in ("command",)
                )
                print(f"  {shown}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
