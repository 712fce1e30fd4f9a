"""`echolabel bench`: the subcommand bench/ adds to the echolabel CLI (an `echolabel.commands`
entry point in pyproject.toml), so the product's CLI never imports the bench."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from echolabel.settings import Settings

from . import missing_extra, require_extra


def add_command(sub: Any) -> None:
    bench = sub.add_parser("bench", help="performance benchmarks (docs/performance.md)")
    bench.add_argument("--smoke", action="store_true", help="small sizes: under a minute")
    bench.add_argument("--only", help="comma-separated: search,latency,embedding,memory,embedded")
    bench.add_argument("--out", type=Path, help="results folder (default: bench/results)")
    bench.add_argument(
        "--embedded-large",
        type=int,
        help="the embedded section's large size (default: the profile's, 1M in the full one)",
    )
    bench.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace, settings: Settings) -> int:
    # The suite needs the `bench` extra (hnswlib, scikit-learn, psutil): without it, say which
    # extra to install instead of a traceback, before any section starts.
    try:
        require_extra()
        from bench.suite import run_from_cli

        return run_from_cli(args.smoke, args.only, args.out, args.argv, args.embedded_large)
    except ModuleNotFoundError as exc:
        reason = missing_extra(exc)
        if reason is None:
            raise
        print(f"echolabel: {reason}", file=sys.stderr)
        return 1
