"""`echolabel preannotate` (and `--refresh`) and `echolabel diverse-first`: what the backend
writes into a Label Studio project (docs/preannotation.md)."""

from __future__ import annotations

import argparse
from typing import Any

from echolabel.settings import Settings

from .jobs import print_job


def add_commands(sub: Any) -> None:
    preannotate = sub.add_parser(
        "preannotate",
        help="push predictions for every unlabelled task into Label Studio (background job)",
    )
    preannotate.add_argument("--project", type=int, required=True, help="Label Studio project")
    preannotate.add_argument(
        "--refresh",
        action="store_true",
        help="only update the predictions that label changes since the last push affect",
    )
    preannotate.add_argument("--no-wait", action="store_true", help="queue it and return")
    preannotate.set_defaults(run=_preannotate)

    diverse = sub.add_parser(
        "diverse-first",
        help="write the diverse-first labelling order into the task data of a Label Studio "
        "project (data.echolabel_diverse_first; Data Manager → Order by)",
    )
    diverse.add_argument("--project", type=int, required=True, help="Label Studio project")
    diverse.add_argument(
        "--limit", type=int, default=1000, help="rank the first N unlabelled tasks (default 1000)"
    )
    diverse.add_argument("--clear", action="store_true", help="remove the order from every task")
    diverse.add_argument("--no-wait", action="store_true", help="queue it and return")
    diverse.set_defaults(run=_diverse_first)


def _preannotate(args: argparse.Namespace, settings: Settings) -> int:
    """Push predictions into Label Studio (or refresh them) and follow the progress."""
    name = "refresh" if args.refresh else "preannotate"
    return print_job(settings, name, no_wait=args.no_wait, project=args.project)


def _diverse_first(args: argparse.Namespace, settings: Settings) -> int:
    """Write (or clear) the diverse-first order and follow the progress."""
    return print_job(
        settings,
        "diverse-first",
        no_wait=args.no_wait,
        project=args.project,
        limit=args.limit,
        clear=args.clear,
    )
