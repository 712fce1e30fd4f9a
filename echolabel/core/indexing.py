"""Indexing ahead of time: a folder of labelled images becomes a project of its own, and a Label
Studio project's tasks are embedded before anyone asks for a prediction (`echolabel index`).

Both embed in this process, in chunks, with the project's encoder; what the workers do instead
with REDIS_URL is the jobs layer's (`workers.runtime.redis_dispatcher`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from echolabel.embedding import TaskImage
from echolabel.folders import Item
from echolabel.label_config import ChoicesField, LabelSchema, TaskError, parse_label_config
from echolabel.labelstudio import LabelStudioClient
from echolabel.settings import Settings
from vectorstore import IndexStatus, VectorStore

from .model import SimilarityModel
from .runtime import Runtime

# Images per model.embed call: progress shows often enough, and one failed chunk is small.
INDEX_CHUNK = 64

Progress = Callable[[int, int], None]  # (images done, images to do)


def embed_in_chunks(
    model: SimilarityModel, items: Sequence[TaskImage], on_progress: Progress | None = None
) -> dict[str, str]:
    """Embed and store `items` with the project's encoder; the failed images' reasons by task."""
    failed: dict[str, str] = {}
    if on_progress is not None:
        on_progress(0, len(items))
    for start in range(0, len(items), INDEX_CHUNK):
        chunk = items[start : start + INDEX_CHUNK]
        report = model.embed(chunk)
        failed.update({str(task): str(error) for task, error in report.failures.items()})
        if on_progress is not None:
            on_progress(start + len(chunk), len(items))
    return failed


def folder_schema(items: Sequence[Item], fields: Sequence[str]) -> LabelSchema:
    """The label schema a folder's CSV implies: one <Choices> per field, its classes the values
    found in the CSV."""
    classes = {f: sorted({i.labels[f] for i in items if f in i.labels}) for f in fields}
    return LabelSchema(
        "image", "image", tuple(ChoicesField(f, "image", tuple(classes[f])) for f in fields)
    )


def index_folder(
    runtime: Runtime,
    project: int | str,
    items: Sequence[Item],
    fields: Sequence[str] = (),
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Embed a folder's images (labelled from its CSV) into `project`: the points stored, the
    labelled ones, and the images that failed. `runtime` reads local files under the folder."""
    # The store first: one that a running server holds refuses before anything is written.
    model = SimilarityModel(runtime, project)
    if fields:
        runtime.projects.save(project, folder_schema(items, fields))
    failed = embed_in_chunks(
        model,
        [TaskImage(task=i.task, image=str(i.path), labels=i.labels) for i in items],
        on_progress,
    )
    return {
        "project": project,
        "points": runtime.store.count(project),
        "labelled": runtime.store.count(project, labelled=True),
        "failed": failed,
    }


def project_task_images(settings: Settings, project: int | str) -> tuple[list[TaskImage], int]:
    """A Label Studio project's tasks as images to embed, and how many tasks hold no image its
    label config can read (skipped)."""
    client = LabelStudioClient(settings)
    try:
        schema = parse_label_config(client.label_config(project))
        items, skipped = [], 0
        for task in client.tasks(project):
            try:
                items.append(TaskImage(task["id"], schema.image_ref(task)))
            except (TaskError, KeyError):
                skipped += 1
    finally:
        client.close()
    return items, skipped


def index_tasks(
    runtime: Runtime,
    project: int | str,
    items: Sequence[TaskImage],
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Embed the tasks of `items` that hold no vector yet: how many already did, the points
    stored, and the images that failed."""
    model = SimilarityModel(runtime, project)
    known = runtime.store.has_vectors(project, [i.task for i in items])
    failed = embed_in_chunks(model, [i for i in items if i.task not in known], on_progress)
    return {
        "already_embedded": len(known),
        "points": runtime.store.count(project),
        "failed": failed,
    }


@dataclass(frozen=True)
class IndexBuild:
    """A project's vote index as `build_indexes` found it, and the seconds its build took
    (None: too few points wait outside it to build, they are searched exactly)."""

    status: IndexStatus
    seconds: float | None


def build_indexes(store: VectorStore, projects: Collection[str] = ()) -> Iterator[IndexBuild]:
    """Build the vote index of every project's live generation (or of the `projects` named)
    where enough points wait outside it, one project at a time (`echolabel build-index`).

    Raises ValueError on a store whose engine indexes by itself (a Qdrant server)."""
    found = store.index_status()
    if found is None:
        raise ValueError("this store's engine builds its index by itself: nothing to build")
    for status in found:
        if projects and status.project not in projects:
            continue
        if not status.builds:
            yield IndexBuild(status, None)
            continue
        started = time.perf_counter()
        store.build_index(status.project)
        yield IndexBuild(status, time.perf_counter() - started)
