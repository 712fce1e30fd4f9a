"""`echolabel`: the command line. One module per command group; each command parses its
arguments, calls the library and prints.

Here: the parser assembled from the groups (and from the `echolabel.commands` entry points that
other packages add, e.g. bench/), the settings read from the environment, logging, and the
known errors printed as one line (exit 1) instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from echolabel.logs import configure_logging
from echolabel.settings import ConfigError, Settings

from . import (
    encoders,
    evaluate,
    index,
    jobs,
    labelstudio,
    preannotate,
    retraining,
    review,
    serve,
    store,
)

# In the order `echolabel --help` lists them: running it, setting up, daily work, measuring,
# changing encoders, looking after it.
GROUPS = (
    serve,
    labelstudio,
    index,
    preannotate,
    evaluate,
    review,
    encoders,
    retraining,
    jobs,
    store,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # reports record the command that produced them
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        if getattr(args, "on_config_error", None) is not None:
            return int(args.on_config_error(exc))
        print(f"echolabel: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    try:
        return int(args.run(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if isinstance(exc, _known_errors()):
            print(f"echolabel: {exc}", file=sys.stderr)
            return 1
        raise


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says what to do: the CLI prints it, never a traceback. Imported
    only when a command failed, so that a quick command loads none of these modules."""
    from echolabel.core.errors import PermanentJobError
    from echolabel.encoders import EncoderError
    from echolabel.images import ImageError
    from echolabel.label_config import LabelConfigError, TaskError
    from echolabel.labelstudio import LabelStudioError
    from vectorstore import StoreError
    from workers.catalogue import JobFailedError

    return (
        LabelStudioError,
        ImageError,
        LabelConfigError,
        TaskError,
        StoreError,
        EncoderError,
        PermanentJobError,
        JobFailedError,
        FileNotFoundError,
        ValueError,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echolabel",
        description="Similarity-based pre-annotation for Label Studio. Configuration comes "
        "from the environment (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, MODEL_DIR, ...).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub: Any) -> None:
    """Subcommands that other packages add through the `echolabel.commands` entry points
    (pyproject.toml): `bench` comes from bench/, which imports the product, never the reverse."""
    for entry in sorted(entry_points(group="echolabel.commands"), key=lambda e: e.name):
        entry.load()(sub)
