"""Diverse-first: the k-center order written where annotators sort tasks, in Label Studio.

While few labels exist, labelling first the tasks least like anything labelled spreads the
first labels over the project (`echolabel.diversity.k_center_order`, seeded by the labelled
tasks). Label Studio 1.23.2's Data Manager orders tasks by any task data field, and its
"Label All Tasks" stream follows the tab's order, so the job writes each unlabelled task's place
in the order into its data:

    data.echolabel_diverse_first = "0001", "0002", ...

Zero-padded text, so that text order is numeric order on SQLite and PostgreSQL alike (Label
Studio compares a data field as text unless a column is switched to Number). Tasks without the
key (labelled, beyond `limit`, image unreadable) sort after the ranked ones in either direction.

Why a data field and not predictions: Label Studio sorts by prediction score only within the
project's one selected model version, which also decides the pre-labels annotators see; a data
field leaves pre-labels and "uncertain first" as they are and is one *Order by* away.

The user's data is never touched beyond that one key:
- the data is read as stored (`resolve_uri=false`, no storage URLs resolved) just before writing
  and sent back whole with only the key added, changed or removed;
- a key that holds anything but digits was not written by echolabel: the job refuses, naming it;
- a label config that reads `$echolabel_diverse_first` makes the key the user's: refused too;
- `clear` removes the key from every task that holds ours.

The order is prefix-consistent: labelling its first tasks and running the job again changes no
task's relative place, only the numbers. After labelling out of order, run it again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from echolabel.diversity import k_center_order

from .errors import PermanentJobError
from .model import SimilarityModel
from .preannotate import PreAnnotator, PushProgress, latest_annotation

FIELD = "echolabel_diverse_first"
DEFAULT_LIMIT = 1000
_OURS = re.compile(r"[0-9]+")


def rank_value(place: int, count: int) -> str:
    """The text written for the `place`-th task (0-based) of `count` ranked ones."""
    return f"{place + 1:0{max(4, len(str(count)))}d}"


def order_tasks(annotator: PreAnnotator, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """Embed what the store lacks, order the unlabelled tasks diverse-first, and write the
    first `limit` places into Label Studio (removing stale ones)."""
    client, project = annotator.client, annotator.project
    progress = PushProgress()
    annotator.on_progress(progress)
    config = client.label_config(project)
    if f"${FIELD}" in config:
        raise PermanentJobError(
            f"the label config of project {project} reads ${FIELD}: that task data key is "
            "yours, so echolabel will not write its diverse-first order there"
        )
    tasks = list(client.tasks(project, full=True))
    _refuse_foreign(tasks)
    labelled = [t for t in tasks if latest_annotation(t) is not None]
    unlabelled = [t for t in tasks if latest_annotation(t) is None]

    progress.stage = "embedding"
    schema = annotator.runtime.projects.remember(project, config)
    model = SimilarityModel(annotator.runtime, project)
    annotator.embed_missing(model, schema, labelled, unlabelled, progress)

    progress.stage = "ordering"
    annotator.on_progress(progress)
    vectors = annotator.store.vectors(project, [t["id"] for t in tasks])
    ids = [t["id"] for t in tasks if t["id"] in vectors]
    is_labelled = np.array([latest_annotation(t) is not None for t in tasks if t["id"] in vectors])
    order: list[int] = []
    if ids and not is_labelled.all():
        rows = k_center_order(
            np.stack([vectors[i] for i in ids]), is_labelled, limit=max(0, limit)
        )[: max(0, limit)]
        order = [int(ids[r]) for r in rows]
    wanted = {task: rank_value(place, len(order)) for place, task in enumerate(order)}
    written = _write(annotator, wanted, progress)
    return {
        "project": project,
        "field": FIELD,
        "tasks": len(tasks),
        "labelled": len(labelled),
        "ranked": len(order),
        "first": order[:10],
        **written,
        "failed_tasks": progress.failed,
    }


def clear_tasks(annotator: PreAnnotator) -> dict[str, Any]:
    """Remove the diverse-first key from every task that holds one echolabel wrote."""
    progress = PushProgress()
    written = _write(annotator, {}, progress)
    return {"project": annotator.project, "field": FIELD, **written}


def _write(
    annotator: PreAnnotator, wanted: Mapping[int, str], progress: PushProgress
) -> dict[str, int]:
    """Make every task's key what `wanted` says (absent: no key), reading the stored data
    right before and writing only the tasks that change."""
    client, project = annotator.client, annotator.project
    progress.stage = "writing"
    current = list(client.tasks(project, resolve_uri=False))
    changes: list[tuple[int, dict[str, Any]]] = []
    foreign = 0
    for task in current:
        data = task.get("data")
        if not isinstance(data, dict):
            continue
        have, want = data.get(FIELD), wanted.get(task["id"])
        if have == want:
            continue
        if have is not None and not _ours(have):
            foreign += 1  # `_refuse_foreign` stopped an order; `clear` leaves it alone
            continue
        new = {k: v for k, v in data.items() if k != FIELD}
        if want is not None:
            new[FIELD] = want
        changes.append((task["id"], new))
    progress.total, progress.done = len(changes), 0
    annotator.on_progress(progress)
    for task, data in changes:
        client.update_task_data(task, data)
        progress.done += 1
        progress.pushed += 1
        if progress.done % 50 == 0:
            annotator.on_progress(progress)
    annotator.on_progress(progress)
    set_count = sum(1 for task, data in changes if FIELD in data)
    return {
        "written": set_count,
        "removed": len(changes) - set_count,
        "unchanged": len(current) - len(changes) - foreign,
        "not_ours": foreign,
    }


def _ours(value: object) -> bool:
    return isinstance(value, str) and bool(_OURS.fullmatch(value))


def _refuse_foreign(tasks: Sequence[Mapping[str, Any]]) -> None:
    foreign = [
        t["id"]
        for t in tasks
        if isinstance(t.get("data"), Mapping)
        and t["data"].get(FIELD) is not None
        and not _ours(t["data"][FIELD])
    ]
    if foreign:
        raise PermanentJobError(
            f"{len(foreign)} task(s) (e.g. {foreign[:5]}) hold data.{FIELD} that echolabel did "
            "not write (not a number like 0001); rename that key in your data, and run again"
        )
