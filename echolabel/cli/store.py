"""`echolabel migrate-store`: the embedded store moved onto Qdrant Edge (docs/store.md)."""

from __future__ import annotations

import argparse
from typing import Any

from echolabel.settings import Settings


def add_commands(sub: Any) -> None:
    migrate = sub.add_parser(
        "migrate-store",
        help="move MODEL_DIR/qdrant from qdrant-client's local mode onto Qdrant Edge (also "
        "done on the first start); the old store is kept as MODEL_DIR/qdrant.local-mode",
    )
    migrate.set_defaults(run=_migrate_store)


def _migrate_store(args: argparse.Namespace, settings: Settings) -> int:
    """Migrate the embedded store to Qdrant Edge now (the backend would on its first start)."""
    from vectorstore.migrate import migrate_local_store

    if settings.qdrant_url:
        print("echolabel: QDRANT_URL is set: the store is a Qdrant server, nothing to migrate")
        return 0
    report = migrate_local_store(
        settings.qdrant_path, exact_max_points=settings.exact_search_max_points
    )
    if report is None:
        print(f"{settings.qdrant_path}: no local-mode store to migrate (already Qdrant Edge)")
        return 0
    print(report.summary())
    return 0
