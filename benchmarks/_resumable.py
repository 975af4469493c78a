"""Shared plumbing of the resumable benchmarks (``deblend_benchmark.py``, ``shear_benchmark.py``).

Each benchmark appends its measurements to ``<out>/rows.jsonl`` as it goes and logs every
invocation (arguments, wall time, scenes) to ``<out>/runs.jsonl``; a later invocation skips what
is already measured, and ``--report-only`` rebuilds the report from the files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_rows(path: Path) -> list[dict]:
    """Rows already measured (one JSON object per line); [] when the file does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_run(out: Path, argv: list[str], wall_s: float, scenes: int) -> None:
    """Append one invocation to ``<out>/runs.jsonl``."""
    with (out / "runs.jsonl").open("a") as fh:
        fh.write(json.dumps({"argv": argv, "wall_s": wall_s, "scenes": scenes}) + "\n")


def command_lines(script: str, runs: list[dict], unit: str = "scenes") -> list[str]:
    """Markdown lines listing the logged invocations with their wall times."""
    return [f"    python benchmarks/{script} {' '.join(r['argv'])}"
            f"    # {r['wall_s'] / 60:.1f} min, {r['scenes']} {unit}" for r in runs]


def main(parser: argparse.ArgumentParser, run, report, argv=None) -> None:
    """Parse (adding ``--report-only``) and either measure (``run(args)``) or only rebuild the
    report (``report(Path(args.out), args)``). ``args.argv`` keeps the command line."""
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the report from the measured rows")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        report(Path(args.out), args)
    else:
        run(args)
