"""Re-embedding a project with another encoder, with zero downtime.

A new generation collection is filled beside the live one, batch by batch; predictions keep
coming from the live generation and label writes reach both (VectorStore.set_labels). When
every task is in, labels are synced once more and the alias is switched atomically; the old
generation is dropped. A run that dies leaves the live generation untouched, and the next run
finds the half-built generation and embeds only what it lacks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from echolabel.embedding import Embedder, EmbedResult, ImageLoader, TaskImage
from vectorstore import CollectionInfo, Point, StoreError, VectorStore

log = logging.getLogger(__name__)


@dataclass
class Progress:
    project: int | str
    encoder: str
    generation: int
    total: int
    done: int
    skipped: int  # already in the new generation when this run started (resumed)
    failed: int
    images_per_s: float
    eta_s: float | None
    stage: str  # "embedding", "syncing labels", "switched"

    def as_meta(self) -> dict[str, object]:
        return asdict(self)


def building_generation(
    store: VectorStore, project: int | str, encoder: str, dim: int, weights_id: str
) -> CollectionInfo:
    """The half-built generation for this encoder (to resume), else a new one."""
    live = store.collection(project)
    newer = [
        g for g in store.generations(project) if live is None or g.generation > live.generation
    ]
    for generation in newer:
        if (generation.encoder, generation.dim, generation.weights_id) == (
            encoder,
            dim,
            weights_id,
        ):
            return generation
    for stale in newer:  # built for another encoder or weights: useless now
        store.drop_generation(stale)
    return store.create_generation(project, encoder, dim, weights_id)


def reembed_project(
    store: VectorStore,
    embedder: Embedder,
    load_image: ImageLoader,
    project: int | str,
    encoder: str,
    *,
    batch_size: int,
    on_progress: Callable[[Progress], None] = lambda progress: None,
    derive: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Progress:
    """Rebuild the project's collection with `encoder` and switch to it.

    With `derive`, the new vectors are computed from the live generation's own (rows in, rows
    out) instead of from the images: for an encoder that is the live one followed by a fixed
    map (a centred encoder over its base), no image is read again."""
    if store.collection(project) is None:
        raise StoreError(f"project {project} has no collection: nothing to re-embed")
    model = embedder.encoder(encoder)
    target = building_generation(store, project, encoder, model.dim, model.weights_id)
    started = time.monotonic()
    progress = Progress(project, encoder, target.generation, 0, 0, 0, 0, 0.0, None, "embedding")
    failed: dict[object, str] = {}
    embedded_now = 0
    # Tasks may be added to the live generation meanwhile: loop until none is missing.
    while True:
        live = {p.task: p for p in store.iter_points(project, with_vectors=False)}
        present = store.has_vectors(project, list(live), collection=target)
        if progress.total == 0:
            progress.skipped = len(present)
        progress.total = len(live)
        missing = [t for t in live if t not in present and t not in failed]
        if not missing:
            break
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            if derive is None:
                result = embedder.embed_tasks(
                    encoder, [TaskImage(t, live[t].image) for t in batch], load_image
                )
            else:
                result = _derived(store, project, batch, derive)
            # Labels as they are now in the live generation (they may have changed meanwhile).
            current = store.points(project, batch, with_vectors=False)
            store.upsert(
                project,
                encoder,
                [
                    Point(
                        p.task,
                        p.vector,
                        p.image,
                        current[p.task].labels,
                        current[p.task].annotation,
                    )
                    for p in result.points
                    if p.task in current
                ],
                collection=target,
            )
            failed.update({t: f"{e.reason}: {e}" for t, e in result.failures.items()})
            embedded_now += len(result.points)
            progress.done, progress.failed = progress.skipped + embedded_now, len(failed)
            elapsed = time.monotonic() - started
            progress.images_per_s = embedded_now / elapsed if elapsed > 0 else 0.0
            left = progress.total - progress.done - progress.failed
            progress.eta_s = left / progress.images_per_s if progress.images_per_s else None
            on_progress(progress)
    lost = [t for t in failed if live.get(t) is not None and live[t].labelled]
    if lost:
        raise StoreError(
            f"re-embedding of project {project} stopped before the switch: the images of "
            f"{len(lost)} labelled task(s) failed ({'; '.join(failed[t] for t in lost[:3])}); "
            "the live generation is untouched; fix them and run it again to resume"
        )
    progress.stage = "syncing labels"
    on_progress(progress)
    _sync_labels(store, project, target)
    store.switch_generation(project, target)
    progress.stage = "switched"
    progress.eta_s = 0.0
    on_progress(progress)
    log.warning(
        "re-embedding done",
        extra={"project": project, "encoder": encoder, "generation": target.generation},
    )
    return progress


def _derived(
    store: VectorStore,
    project: int | str,
    batch: list[object],
    derive: Callable[[np.ndarray], np.ndarray],
) -> EmbedResult:
    """The batch's new points from the live generation's vectors."""
    stored = store.points(project, batch, with_vectors=True)
    points = [stored[t] for t in batch if t in stored]
    if not points:
        return EmbedResult()
    vectors = derive(np.stack([p.vector for p in points]))
    return EmbedResult(
        points=[Point(p.task, v, p.image) for p, v in zip(points, vectors, strict=True)]
    )


def _sync_labels(store: VectorStore, project: int | str, target: CollectionInfo) -> None:
    """Make the new generation's labels equal the live ones (the live one is authoritative)."""
    built = {p.task: p for p in store.iter_points(project, with_vectors=False, collection=target)}
    for point in store.iter_points(project, with_vectors=False):
        mirror = built.get(point.task)
        if mirror is not None and (mirror.labels, mirror.annotation) != (
            point.labels,
            point.annotation,
        ):
            store.set_labels(project, point.task, point.labels, point.annotation, collection=target)
