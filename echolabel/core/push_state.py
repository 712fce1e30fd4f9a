"""The push's bookkeeping: what Label Studio holds from us, and what changed since (preannotate.py).

The model_version of the predictions last pushed, a lower bound of their vote radii with the
band edges above it, and the tasks whose labels changed since the last refresh. The rules are
here, beside the push; the state is kept in the live generation's metadata, because it is valid
for those vectors only (a switch to a new generation starts it afresh), and each change is one
`VectorStore.update_push_state`: read and written under the store's guard, against one
generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vectorstore import CollectionInfo, StoreError, TaskId, VectorStore

# Label changes remembered between refreshes; more mean "refresh everything".
MAX_CHANGES = 5000


def record_push(
    store: VectorStore,
    project: int | str,
    *,
    published_version: str | None = None,
    vote_radius_min: float | None = None,
    vote_radius_edges: Sequence[float] | None = None,
) -> None:
    """Record what Label Studio holds: the model_version of the predictions last pushed, a
    lower bound of their vote radii (the k-th labelled neighbour's similarity) and the band
    edges above it. StoreError when the project has no collection."""
    values: dict[str, Any] = {}
    if published_version is not None:
        values["published_version"] = published_version
    if vote_radius_min is not None:
        values["vote_radius_min"] = vote_radius_min
    if vote_radius_edges is not None:
        values["vote_radius_edges"] = [float(e) for e in vote_radius_edges]
    if store.update_push_state(project, lambda _live: values) is None:
        raise StoreError(f"project {project} has no collection")


def note_label_changes(store: VectorStore, project: int | str, tasks: Sequence[TaskId]) -> int:
    """Count label changes of these tasks (kept until `take_label_changes`); the number of
    changed tasks remembered now, 0 when the project has no collection.

    A task changed twice is one change, and only the last MAX_CHANGES are kept; the label state
    (in the pushed version's name) counts every change. Called by the one process that applies
    webhooks.
    """
    if not tasks:
        return 0

    def note(live: CollectionInfo) -> dict[str, Any]:
        changes = list(dict.fromkeys([*live.label_changes, *tasks]))[-MAX_CHANGES:]
        return {"label_state": live.label_state + len(tasks), "label_changes": changes}

    written = store.update_push_state(project, note)
    return 0 if written is None else len(written["label_changes"])


def take_label_changes(store: VectorStore, project: int | str) -> list[TaskId]:
    """The tasks whose labels changed since the last call, forgetting them."""
    taken: list[TaskId] = []

    def take(live: CollectionInfo) -> dict[str, Any]:
        taken.extend(live.label_changes)
        return {"label_changes": []} if live.label_changes else {}

    store.update_push_state(project, take)
    return taken
