"""Moving an embedded store written by qdrant-client's local mode onto Qdrant Edge, losing nothing.

Before Edge became the embedded engine, MODEL_DIR/qdrant held qdrant-client's local mode:
`meta.json` (collections, aliases and their metadata) and `collection/<name>/storage.sqlite`.
`migrate_local_store` copies every generation (vectors, payloads, labels, and the metadata
that holds the pushed predictions' version and the label changes) into an Edge store built
beside it, verifies the copy, and only then swaps the directories:

    MODEL_DIR/.qdrant.migrating/      the Edge copy while it is built and verified
    MODEL_DIR/qdrant/                 the Edge store, once verified
    MODEL_DIR/qdrant.local-mode/      the old store, renamed aside (never deleted)

The copy is verified before anything moves: per generation the number of points, labelled and
unlabelled, the metadata, the live alias, and a sample of points whose vectors and payloads
must be equal. A crash before the swap leaves the old store in place (the unverified copy is
discarded at the next start); a crash between the two renames is finished at the next start
(the verified copy carries a marker). The webhook inbox (MODEL_DIR/webhooks) and everything
else under MODEL_DIR stay where they are.

Generations older than a project's live one (left by a switch that died before dropping them)
are not copied: nothing reads them; they remain in the renamed old store.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import models

from . import payload as pl
from .base import StoreError
from .edge_generations import _fsync_dir, _write_json
from .edge_store import EdgeStore, holds_local_store
from .generations import generation_pattern, info_from_meta
from .qdrant_store import QdrantStore

log = logging.getLogger(__name__)

_PAGE = 512
_MARKER = "migrated-from-local-mode.json"
BACKUP_SUFFIX = ".local-mode"


class MigrationError(StoreError):
    """The Edge copy did not verify; the old store was left untouched."""


@dataclass
class GenerationCopy:
    """One generation as copied and verified."""

    name: str
    project: str
    live: bool
    points: int
    labelled: int
    sampled: int


@dataclass
class MigrationReport:
    """What a migration did: where everything is now."""

    store: str  # the Edge store (the old path)
    backup: str  # the old local-mode store, renamed aside
    generations: list[GenerationCopy] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        points = sum(g.points for g in self.generations)
        labelled = sum(g.labelled for g in self.generations)
        return (
            f"migrated {len(self.generations)} generation(s), {points} points ({labelled} "
            f"labelled) to Qdrant Edge in {self.store}; the old local-mode store is kept at "
            f"{self.backup}"
            + (f"; not copied (older than live): {', '.join(self.skipped)}" if self.skipped else "")
        )


def needs_migration(path: Path) -> bool:
    """Whether opening Edge at `path` must migrate (or finish migrating) first."""
    return holds_local_store(path) or _staging(path).exists()


def migrate_local_store(
    path: Path,
    *,
    exact_max_points: int,
    prefix: str = "echolabel",
    sample: int = 200,
) -> MigrationReport | None:
    """Move the local-mode store at `path` onto Edge at the same path; None if there is none.

    `sample` points per generation (at least) are compared vector for vector and payload for
    payload, besides the counts. Raises MigrationError, leaving the old store in place, when
    the copy differs.
    """
    staging = _staging(path)
    if staging.exists():
        if (staging / _MARKER).is_file() and not holds_local_store(path):
            return _swap_in(path, staging)  # verified, then interrupted between the renames
        log.warning("discarding an unfinished migration copy", extra={"path": str(staging)})
        shutil.rmtree(staging)
    if not holds_local_store(path):
        return None
    log.warning("migrating the embedded store to Qdrant Edge", extra={"path": str(path)})
    source = QdrantStore.open(path=path)
    report = MigrationReport(store=str(path), backup="")
    try:
        target = EdgeStore(staging, prefix=prefix, exact_max_points=exact_max_points)
        try:
            _copy(source, target, prefix, sample, report)
        finally:
            target.close()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # an unverified copy: the old store is intact
        raise
    finally:
        source.close()
    _write_json(staging / _MARKER, asdict(report))
    return _swap_in(path, staging)


def _copy(
    source: QdrantStore, target: EdgeStore, prefix: str, sample: int, report: MigrationReport
) -> None:
    client = source._client
    live_of = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
    metas = {
        c.name: dict(client.get_collection(c.name).config.metadata or {})
        for c in client.get_collections().collections
    }
    by_project: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, meta in sorted(metas.items()):
        project = str(meta.get("project", ""))
        if not project or not generation_pattern(target.alias(project)).match(name):
            report.skipped.append(name)  # not one of ours
            continue
        by_project.setdefault(project, []).append((name, meta))
    for project, generations in by_project.items():
        live = live_of.get(target.alias(project))
        live_generation = int(metas[live]["generation"]) if live in metas else 0
        for name, meta in generations:
            if int(meta["generation"]) < live_generation:
                report.skipped.append(name)
                continue
            info = target.restore_generation(project, meta)
            copied = _copy_points(source, target, info, name)
            report.generations.append(
                _verify(source, target, project, name, meta, copied, live == name, sample)
            )
        if live is not None and live in metas:
            target.switch_generation(project, info_from_meta(project, live, target._metas[live]))
            if target.collection(project).name != live:  # type: ignore[union-attr]
                raise MigrationError(f"project {project}'s alias does not point at {live}")


def _copy_points(source: QdrantStore, target: EdgeStore, info: Any, name: str) -> list[str]:
    copied: list[str] = []
    offset = None
    while True:
        records, offset = source._client.scroll(
            name, limit=_PAGE, offset=offset, with_payload=True, with_vectors=True
        )
        target.restore_points(info, records)
        copied.extend(str(r.id) for r in records)
        if offset is None:
            return copied


def _verify(
    source: QdrantStore,
    target: EdgeStore,
    project: str,
    name: str,
    meta: Mapping[str, Any],
    copied: list[str],
    live: bool,
    sample: int,
) -> GenerationCopy:
    """Compare counts, metadata and a sample of points; raise MigrationError on a difference."""

    def counts_source(labelled: bool | None) -> int:
        condition = (
            None
            if labelled is None
            else models.Filter(
                must=[
                    models.FieldCondition(key="labelled", match=models.MatchValue(value=labelled))
                ]
            )
        )
        return source._client.count(name, count_filter=condition, exact=True).count

    restored = info_from_meta(project, name, target._metas[name])
    ours = {labelled: target.count_in(restored, labelled) for labelled in (None, True, False)}
    theirs = {labelled: counts_source(labelled) for labelled in (None, True, False)}
    if ours != theirs or len(copied) != theirs[None]:
        raise MigrationError(
            f"{name}: the Edge copy holds {ours} points (all, labelled, unlabelled), the "
            f"local-mode store {theirs}; nothing was changed"
        )
    if restored != info_from_meta(project, name, meta):
        raise MigrationError(f"{name}: the metadata differs after the copy; nothing was changed")
    chosen = random.Random(name).sample(copied, min(sample, len(copied)))
    old = {str(r.id): r for r in source._client.retrieve(name, chosen, with_vectors=True)}
    new = {str(r.id): r for r in target._fetch(name, chosen, True)}
    for pid in chosen:
        if pid not in new or not _same(old[pid], new[pid]):
            raise MigrationError(
                f"{name}: point {pid} differs between the local-mode store and the Edge copy; "
                "nothing was changed"
            )
    return GenerationCopy(name, project, live, theirs[None], theirs[True], len(chosen))


def _same(old: pl.Record, new: pl.Record) -> bool:
    before = dict(old.payload or {})
    after = dict(new.payload or {})
    if pl.is_labelled(before) != pl.is_labelled(after):
        return False
    before.pop("labelled", None)
    after.pop("labelled", None)
    # Cosine collections may store a vector normalised (the server does): compare directions.
    return before == after and np.allclose(
        _unit(pl.vector_of(old)), _unit(pl.vector_of(new)), atol=1e-6
    )


def _unit(vector: Any) -> np.ndarray:
    row = np.asarray(vector, dtype=np.float64).reshape(-1)
    norm = np.linalg.norm(row)
    return row / norm if norm else row


def _swap_in(path: Path, staging: Path) -> MigrationReport:
    """Rename the old store aside and the verified copy into its place."""
    marker = json.loads((staging / _MARKER).read_text())
    report = MigrationReport(
        store=marker["store"],
        backup=marker["backup"],
        generations=[GenerationCopy(**g) for g in marker["generations"]],
        skipped=list(marker["skipped"]),
    )
    if holds_local_store(path):
        backup = _backup_path(path)  # a backup of an earlier migration is kept too
        report.backup = str(backup)
        _write_json(staging / _MARKER, asdict(report))
        _rename(path, backup)
    _rename(staging, path)
    log.warning("embedded store migrated", extra={"summary": report.summary()})
    return report


def _rename(source: Path, target: Path) -> None:
    os.replace(source, target)
    _fsync_dir(target.parent)


def _staging(path: Path) -> Path:
    return path.parent / f".{path.name}.migrating"


def _backup_path(path: Path) -> Path:
    backup = path.parent / f"{path.name}{BACKUP_SUFFIX}"
    number = 1
    while backup.exists():
        number += 1
        backup = path.parent / f"{path.name}{BACKUP_SUFFIX}-{number}"
    return backup
