"""`echolabel retrain` and `echolabel rollback-encoder`: the self-improving loop by hand
(docs/retraining.md)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from echolabel.settings import Settings

from .jobs import print_job


def add_commands(sub: Any) -> None:
    retrain = sub.add_parser(
        "retrain",
        help="one round of the self-improving loop now: train a challenger on the project's "
        "labels, promote it only if it votes better on held-out images (docs/retraining.md)",
    )
    retrain.add_argument("--project", required=True)
    retrain.add_argument("--no-wait", action="store_true", help="queue it and return")
    retrain.set_defaults(run=_retrain)

    rollback = sub.add_parser(
        "rollback-encoder",
        help="go back to the encoder that was live before (or --encoder): zero-downtime "
        "re-embedding and a fresh push",
    )
    rollback.add_argument("--project", required=True)
    rollback.add_argument("--encoder", help="default: the previous live encoder")
    rollback.add_argument("--no-wait", action="store_true", help="queue it and return")
    rollback.set_defaults(run=_rollback_encoder)


def _retrain(args: argparse.Namespace, settings: Settings) -> int:
    """Run one retraining round (even with ECHOLABEL_AUTO_RETRAIN=0: asked for by hand)."""
    settings = dataclasses.replace(settings, auto_retrain=True)
    return print_job(settings, "retrain", no_wait=args.no_wait, project=args.project)


def _rollback_encoder(args: argparse.Namespace, settings: Settings) -> int:
    """Go back to the previous live encoder (or --encoder): a re-embedding and a fresh push."""
    project, encoder = args.project, args.encoder
    return print_job(
        settings, "rollback-encoder", no_wait=args.no_wait, project=project, encoder=encoder
    )
