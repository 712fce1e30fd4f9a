"""The push's bookkeeping, kept in the live generation's metadata (echolabel/core/preannotate.py).

What Label Studio holds from us: the model_version of the predictions last pushed, a lower
bound of their vote radii, and the tasks whose labels changed since the last refresh. It lives
beside the vectors because it is only valid for them: a switch to a new generation starts it
afresh. Here it is written once for every engine; an engine supplies `_update_meta`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from .base import CollectionInfo, StoreError, TaskId

# Label changes remembered between refreshes; more mean "refresh everything".
MAX_CHANGES = 5000


class PushState:
    """`set_prediction_state`, `note_label_changes` and `take_label_changes` of a store."""

    _guard: AbstractContextManager[Any]

    def _live(self, project: int | str) -> CollectionInfo | None:
        """The project's live generation (what `collection` answers)."""
        raise NotImplementedError

    def _update_meta(self, name: str, values: dict[str, Any]) -> None:
        """Merge `values` into the generation's metadata (durably, atomically)."""
        raise NotImplementedError

    def set_prediction_state(
        self,
        project: int | str,
        *,
        published_version: str | None = None,
        vote_radius_min: float | None = None,
        vote_radius_edges: Sequence[float] | None = None,
    ) -> None:
        """Record what Label Studio holds: the model_version of the predictions last pushed,
        a lower bound of their vote radii (the k-th labelled neighbour's similarity) and the
        band edges above it."""
        values: dict[str, Any] = {}
        if published_version is not None:
            values["published_version"] = published_version
        if vote_radius_min is not None:
            values["vote_radius_min"] = vote_radius_min
        if vote_radius_edges is not None:
            values["vote_radius_edges"] = [float(e) for e in vote_radius_edges]
        with self._guard:
            info = self._live(project)
            if info is None:
                raise StoreError(f"project {project} has no collection")
            self._update_meta(info.name, values)

    def note_label_changes(self, project: int | str, tasks: Sequence[TaskId]) -> int:
        """Count label changes of these tasks (kept until `take_label_changes`); the new count.

        Called by the one process that applies webhooks, so a read-modify-write is safe.
        """
        with self._guard:
            info = self._live(project)
            if info is None or not tasks:
                return 0
            changes = list(dict.fromkeys([*info.label_changes, *tasks]))[-MAX_CHANGES:]
            self._update_meta(
                info.name,
                {"label_state": info.label_state + len(tasks), "label_changes": changes},
            )
            return len(changes)

    def take_label_changes(self, project: int | str) -> list[TaskId]:
        """The tasks whose labels changed since the last call, forgetting them."""
        with self._guard:
            info = self._live(project)
            if info is None or not info.label_changes:
                return []
            self._update_meta(info.name, {"label_changes": []})
            return list(info.label_changes)
