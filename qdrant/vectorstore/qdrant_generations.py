"""QdrantStore's generations on qdrant-client: collections, the alias, their metadata.

The project's alias `<prefix>_p<project>` points at one generation collection
`<prefix>_p<project>_g<n>` (see generations.py); re-embedding builds generation n+1 beside it
and swaps the alias atomically with Qdrant's alias operations. Reads and writes of points are
in qdrant_store.py.
"""

from __future__ import annotations

from typing import Any

from qdrant_client import QdrantClient, models

from .base import CollectionInfo, StoreError
from .engine import EngineStore
from .generations import generation_pattern, info_from_meta, new_meta

INDEXED_FIELDS = {
    "project": models.PayloadSchemaType.KEYWORD,
    "labelled": models.PayloadSchemaType.BOOL,
    "annotation_id": models.PayloadSchemaType.KEYWORD,
}


class QdrantGenerations(EngineStore):
    """Collections and aliases of a qdrant-client store (a server, or local mode)."""

    _client: QdrantClient
    _local: bool
    _shards: int
    _replication_factor: int

    def _live(self, project: int | str) -> CollectionInfo | None:
        alias = self.alias(project)
        with self._guard:
            target = next(
                (
                    a.collection_name
                    for a in self._client.get_aliases().aliases
                    if a.alias_name == alias
                ),
                None,
            )
            if target is None:
                return None
            return self._info(project, target)

    def generations(self, project: int | str) -> list[CollectionInfo]:
        """Every generation collection of the project, live or being built."""
        pattern = generation_pattern(self.alias(project))
        with self._guard:
            names = [c.name for c in self._client.get_collections().collections]
            return sorted(
                (self._info(project, n) for n in names if pattern.match(n)),
                key=lambda info: info.generation,
            )

    def _info(self, project: int | str, name: str) -> CollectionInfo:
        return info_from_meta(
            project, name, self._client.get_collection(name).config.metadata or {}
        )

    def _update_meta(self, name: str, values: dict[str, Any]) -> None:
        self._client.update_collection(name, metadata=values)

    def create_generation(
        self, project: int | str, encoder: str, dim: int, weights_id: str
    ) -> CollectionInfo:
        """A new, empty, not-yet-live generation collection for the project."""
        with self._guard:
            generation, name = self._next_generation(project)
            self._client.create_collection(
                name,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                shard_number=self._shards,
                replication_factor=self._replication_factor,
                metadata=new_meta(
                    project, encoder, dim, weights_id, generation, self._preprocessing
                ),
            )
            if not self._local:  # local mode ignores payload indexes (and warns about them)
                for field_name, schema in INDEXED_FIELDS.items():
                    self._client.create_payload_index(name, field_name, schema)
            return self._info(project, name)

    def switch_generation(self, project: int | str, target: CollectionInfo) -> None:
        """Point the project's alias at `target` atomically, then drop older generations."""
        alias = self.alias(project)
        with self._guard:
            current = self._live(project)
            operations: list[models.AliasOperations] = []
            if current is not None:
                operations.append(
                    models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))
                )
            operations.append(
                models.CreateAliasOperation(
                    create_alias=models.CreateAlias(collection_name=target.name, alias_name=alias)
                )
            )
            self._client.update_collection_aliases(change_aliases_operations=operations)
            for old in self.generations(project):
                if old.generation < target.generation:
                    self._client.delete_collection(old.name)

    def drop_generation(self, target: CollectionInfo) -> None:
        """Delete a generation that is not live (an abandoned or superseded build)."""
        with self._guard:
            live = self._live(target.project)
            if live is not None and live.name == target.name:
                raise StoreError(f"{target.name} is the live generation; it cannot be dropped")
            self._client.delete_collection(target.name)

    def drop_project(self, project: int | str) -> None:
        """Delete the project's alias and every generation."""
        with self._guard:
            alias = self.alias(project)
            if self._live(project) is not None:
                self._client.update_collection_aliases(
                    change_aliases_operations=[
                        models.DeleteAliasOperation(
                            delete_alias=models.DeleteAlias(alias_name=alias)
                        )
                    ]
                )
            for info in self.generations(project):
                self._client.delete_collection(info.name)
