"""EdgeStore's generations as files: the alias pointers, each generation's metadata and shard.

Layout under the store's root directory:

    store.lock                   flock-ed by the one process that holds the store (its pid inside)
    aliases/<alias>.json         {"collection": "<alias>_g<n>"}: the project's live generation
    collections/<alias>_g<n>/
        meta.json                encoder, weights id, dimension, generation, pre-annotation state
        shard/                   the Edge shard: segments, WAL, edge_config.json

Names are QdrantStore's (`alias`, `<alias>_g<n>`), so CollectionInfo reads the same on both.

Crash safety: the files this module writes (alias pointers, metadata) are replaced atomically:
written to a temporary file, fsynced, renamed over the old one, and the directory fsynced. A
generation exists once its meta.json does, and is live once its alias points at it: a directory
without meta.json is a creation that died and is removed at open; a generation that is not
pointed at stays a generation being built (re-embedding resumes it), never the live one. The
points' own crash safety is the engine's WAL (edge_store.py). Reads and writes of points, the
searches and the index build are in edge_store.py.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any

import qdrant_edge as edge

from .base import CollectionInfo, StoreError
from .engine import EngineStore
from .generations import generation_pattern, info_from_meta, new_meta

_FORMAT = 1
# The metadata key of generations that have the vote vector (edge_store.py).
_HAS_VOTE_VECTOR = "vote_vector"
_META = "meta.json"
_SHARD = "shard"
_TRASH = ".trash-"

# `labelled` is stored as the integer 0/1, not a boolean: qdrant-edge-py 0.9.0 turns
# MatchValue(True) into the integer 1 (bool is an int subclass in Python), so a boolean payload
# never matches. tests/test_edge_store.py::test_edge_boolean_match_finding watches for a fix.
_INDEXED_FIELDS = {
    "project": edge.PayloadSchemaType.Keyword,
    "labelled": edge.PayloadSchemaType.Integer,
    "annotation_id": edge.PayloadSchemaType.Keyword,
    "vote_radius": edge.PayloadSchemaType.Float,  # payload.VOTE_RADIUS: the refresh's bands
}


class EdgeGenerations(EngineStore):
    """Generations and aliases of an EdgeStore, kept as files beside the Edge shards."""

    path: Path
    _collections: Path
    _aliases: Path
    _vector_storage: str
    _lock_handle: IO[str] | None
    # This process is the only writer, so the small files are read once and kept here.
    _metas: dict[str, dict[str, Any]]
    _pointers: dict[str, str]  # alias -> live generation name
    _shards: dict[str, Any]  # generation name -> open edge.EdgeShard
    _labelled: dict[str, int]  # generation name -> labelled points, once counted

    # -- the engine's part (edge_store.py) --------------------------------------------------

    def _edge_config(self, meta: dict[str, Any]) -> Any:
        """The Edge shard's configuration for a generation of this metadata."""
        raise NotImplementedError

    def _build_index(self, name: str, force: bool = False) -> bool:
        """Build the generation's HNSW graph where enough waits; True if built."""
        raise NotImplementedError

    # -- on-disk state --------------------------------------------------------------------------

    def _recover(self) -> None:
        """Load aliases and metadata; finish what a crash interrupted.

        Removes deleted generations' leftovers and creations that died before their metadata
        was written, and drops generations older than the live one (a switch that moved the
        pointer but died before dropping them).
        """
        for entry in self._collections.iterdir():
            if entry.name.startswith(".") and entry.is_dir():  # a deleted generation's rest
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith("."):  # a temporary file
                entry.unlink()
            elif entry.is_dir() and not (entry / _META).is_file():
                shutil.rmtree(entry)
            elif entry.is_dir():
                for stale in entry.glob(".*.tmp"):
                    stale.unlink()
                self._metas[entry.name] = json.loads((entry / _META).read_text())
        for entry in self._aliases.iterdir():
            if entry.name.startswith("."):
                entry.unlink()
            elif entry.suffix == ".json":
                self._pointers[entry.stem] = json.loads(entry.read_text())["collection"]
        for alias, live in self._pointers.items():
            if live not in self._metas:
                continue  # collection() explains
            live_generation = int(self._metas[live]["generation"])
            for name in self._names(alias):
                if int(self._metas[name]["generation"]) < live_generation:
                    self._drop(name)

    def _names(self, alias: str) -> list[str]:
        pattern = generation_pattern(alias)
        return [name for name in self._metas if pattern.match(name)]

    def _write_meta(self, name: str, meta: dict[str, Any]) -> None:
        _write_json(self._collections / name / _META, meta)
        self._metas[name] = meta

    def _drop(self, name: str) -> None:
        """Delete a generation: closed, renamed out of the way (atomic), then removed."""
        shard = self._shards.pop(name, None)
        if shard is not None:
            shard.close()
        self._metas.pop(name, None)
        self._labelled.pop(name, None)
        where = self._collections / name
        if not where.exists():
            return
        trash = self._collections / f"{_TRASH}{name}-{uuid.uuid4().hex}"
        os.replace(where, trash)
        _fsync_dir(self._collections)
        shutil.rmtree(trash, ignore_errors=True)

    # -- collections and generations -------------------------------------------------------

    def _live(self, project: int | str) -> CollectionInfo | None:
        with self._guard:
            target = self._pointers.get(self.alias(project))
            if target is None:
                return None
            if target not in self._metas:
                raise StoreError(
                    f"the alias {self.alias(project)} in {self._aliases} points at {target}, "
                    f"which is not in {self._collections}: the store directory was changed "
                    "outside echolabel; restore it from a backup or drop the project"
                )
            return self._info(project, target)

    def generations(self, project: int | str) -> list[CollectionInfo]:
        """Every generation collection of the project, live or being built."""
        with self._guard:
            return sorted(
                (self._info(project, name) for name in self._names(self.alias(project))),
                key=lambda info: info.generation,
            )

    def create_generation(
        self, project: int | str, encoder: str, dim: int, weights_id: str
    ) -> CollectionInfo:
        """A new, empty, not-yet-live generation collection for the project."""
        with self._guard:
            generation, name = self._next_generation(project)
            meta = new_meta(project, encoder, dim, weights_id, generation, self._preprocessing)
            return self._create(project, name, {**meta, "vector_storage": self._vector_storage})

    def restore_generation(self, project: int | str, meta: dict[str, Any]) -> CollectionInfo:
        """A new, empty, not-yet-live generation with exactly this metadata, its number kept
        (the migration: Label Studio's predictions name the generation)."""
        with self._guard:
            name = f"{self.alias(project)}_g{int(meta['generation'])}"
            if name in self._metas:
                raise StoreError(f"collection {name} exists already in {self.path}")
            storage = meta.get("vector_storage", self._vector_storage)
            return self._create(project, name, {**meta, "vector_storage": storage})

    def _create(self, project: int | str, name: str, meta: dict[str, Any]) -> CollectionInfo:
        where = self._collections / name
        if where.exists():  # a creation that died before its metadata: never a generation
            shutil.rmtree(where)
        where.mkdir()
        if self._lock_handle is None:
            raise StoreError(f"the store at {self.path} was closed; open it again to use it")
        meta = {**meta, _HAS_VOTE_VECTOR: True}
        shard = edge.EdgeShard.create(str(where / _SHARD), self._edge_config(meta))
        try:
            for field_name, schema in _INDEXED_FIELDS.items():
                shard.update(edge.UpdateOperation.create_field_index(field_name, schema))
        except BaseException:
            shard.close()  # the directory stays metadata-less: removed at the next try
            raise
        self._shards[name] = shard
        self._labelled[name] = 0
        # Written last: from here on the directory is a generation.
        self._write_meta(name, {"format": _FORMAT, **meta})
        _fsync_dir(self._collections)
        return self._info(project, name)

    def switch_generation(self, project: int | str, target: CollectionInfo) -> None:
        """Point the project's alias at `target` atomically, then drop older generations."""
        alias = self.alias(project)
        with self._guard:
            if target.name not in self._metas:
                raise StoreError(f"collection {target.name} does not exist; it cannot go live")
            self._build_index(target.name)  # goes live with its graph, not before it
            _write_json(self._aliases / f"{alias}.json", {"collection": target.name})
            self._pointers[alias] = target.name
            for old in self.generations(project):
                if old.generation < target.generation:
                    self._drop(old.name)

    def drop_generation(self, target: CollectionInfo) -> None:
        """Delete a generation that is not live (an abandoned or superseded build)."""
        with self._guard:
            live = self._live(target.project)
            if live is not None and live.name == target.name:
                raise StoreError(f"{target.name} is the live generation; it cannot be dropped")
            self._drop(target.name)

    def drop_project(self, project: int | str) -> None:
        with self._guard:
            alias = self.alias(project)
            if self._pointers.pop(alias, None) is not None:
                (self._aliases / f"{alias}.json").unlink(missing_ok=True)
                _fsync_dir(self._aliases)
            for name in self._names(alias):
                self._drop(name)

    def _update_meta(self, name: str, values: dict[str, Any]) -> None:
        self._write_meta(name, {**self._metas[name], **values})

    def _info(self, project: int | str, name: str) -> CollectionInfo:
        return info_from_meta(project, name, self._metas[name])


# -- files -----------------------------------------------------------------------------------


def _write_json(path: Path, value: object) -> None:
    """Replace `path` atomically and durably: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
