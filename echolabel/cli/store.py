"""The embedded store's upkeep (docs/store.md): `echolabel migrate-store` moves it onto Qdrant
Edge; `echolabel build-index` builds the HNSW graph of what grew past the exact threshold."""

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
    build = sub.add_parser(
        "build-index",
        help="build the embedded store's HNSW graph where ECHOLABEL_EXACT_SEARCH_MAX_POINTS "
        "points wait outside it (run with the backend stopped: the build holds the process)",
    )
    build.add_argument("--project", action="append", help="only this project (repeatable)")
    build.set_defaults(run=_build_index)


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


def _build_index(args: argparse.Namespace, settings: Settings) -> int:
    """Build the graphs the embedded store lacks; prints each project's state and the time."""
    from echolabel.core.indexing import build_indexes
    from echolabel.core.runtime import open_configured_store

    if settings.qdrant_url:
        print("echolabel: QDRANT_URL is set: the Qdrant server builds its own index")
        return 0
    store = open_configured_store(settings)  # refuses while the backend holds the store
    try:
        wanted = set(args.project or [])
        seen: set[str] = set()
        for build in build_indexes(store, wanted):
            status = build.status
            seen.add(status.project)
            line = f"project {status.project} ({status.generation}): {status.points:,} points"
            if build.seconds is None:
                print(
                    f"{line}, {status.unindexed:,} outside the graph: below the threshold "
                    f"({settings.exact_search_max_points:,}), searched exactly"
                )
            else:
                print(
                    f"{line}: graph built for {status.unindexed:,} points in {build.seconds:.1f} s"
                )
        for missing in sorted(wanted - seen):
            print(f"project {missing}: no collection in {settings.qdrant_path}")
        return 1 if wanted - seen else 0
    finally:
        store.close()
