"""Pre-annotate whole projects: predictions pushed into Label Studio, kept fresh as labels grow.

Label Studio's "Retrieve Predictions" is one synchronous call with a 100 s timeout; for whole
projects we vote every unlabelled task in the background and write the predictions through
Label Studio's API instead.

Versions. A push writes every prediction under one new `model_version`,
`echolabel-<encoder>-g<generation>-s<label state>` (the label state counts label changes), then
deletes our older versions and records the new one in the collection's metadata
(push_state.py); /setup answers it from then on, so "Retrieve Predictions" skips the tasks we
pushed (no duplicates), and the project's model_version (what annotators are shown) is set to
it. A refresh re-votes only the unlabelled tasks whose top-k a newly labelled task can enter and
updates those predictions in place, keeping the version, so the project keeps one current
prediction per task.

Affected tasks. A label added, changed or removed at x changes the vote of an unlabelled task u
only if x is (or was) among u's top k, i.e. sim(u, x) >= r(u), the similarity of u's k-th
labelled neighbour now. Every vote taken here records its task's r in the store
(`set_vote_radii`, rounded down), and it stays a lower bound: a new label only raises r, and a
removed one lowers it only for the tasks it was a neighbour of, which are re-voted. So the
candidates are found through the index: the push splits the recorded radii into bands, and
around x one `score_threshold` search per band (sent together) returns the band's unlabelled
points at least its lower edge near; those at least their own r near are re-voted, all in one
batched search: the same search `/predict` makes, so every pushed prediction stays what a
fresh vote gives. Nothing is written per task but the predictions that change.

Resuming. The push reads which tasks already hold a prediction of the target version from Label
Studio itself before writing, so a killed push continues where it stopped without duplicates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from echolabel.core.runtime import Runtime
from echolabel.embedding import TaskImage
from echolabel.label_config import LabelSchema, TaskError
from echolabel.labelstudio import LabelStudioClient, LabelStudioUnavailable
from vectorstore import Annotation, CollectionInfo, TaskId

from .model import SimilarityModel, Suggestion, suggests_labels
from .push_state import record_push, take_label_changes

log = logging.getLogger(__name__)

VERSION_PREFIX = "echolabel-"
PUSH_BATCH = 200
WRITE_RETRY_DELAYS_S = (1.0, 4.0, 15.0)
# More label changes than this since the last refresh: a full push is cheaper than the search.
MAX_REFRESH_CHANGES = 2000
SIMILARITY_EPS = 1e-5
# Bands of recorded vote radii the refresh searches apart (store.unlabelled_within).
RADIUS_BANDS = 8


def push_version(info: CollectionInfo) -> str:
    return f"{VERSION_PREFIX}{info.encoder}-g{info.generation}-s{info.label_state}"


def vote_radius(suggestion: Suggestion, k: int) -> float:
    """The similarity a new labelled point must reach to enter this task's top-k."""
    if len(suggestion.neighbours) < k:
        return -1.0
    return min(n.similarity for n in suggestion.neighbours)


@dataclass
class PushProgress:
    """What the push did so far; `as_meta()` goes into the job's meta (and the CLI bar)."""

    total: int = 0
    done: int = 0
    pushed: int = 0
    abstained: int = 0
    already: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    stage: str = "reading tasks"
    started: float = field(default_factory=time.monotonic)

    def as_meta(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        left = self.total - self.done
        return {
            "stage": self.stage,
            "done": self.done,
            "total": self.total,
            "pushed": self.pushed,
            "abstained": self.abstained,
            "already_current": self.already,
            "failed": len(self.failed),
            "tasks_per_s": round(rate, 2),
            "eta_s": round(left / rate, 1) if rate > 0 and left > 0 else 0.0,
        }


class PreAnnotator:
    """Pushes and refreshes the predictions of one Label Studio project."""

    def __init__(
        self,
        runtime: Runtime,
        client: LabelStudioClient,
        project: int,
        on_progress: Callable[[PushProgress], None] | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.runtime = runtime
        self.client = client
        self.project = project
        self.store = runtime.store
        self.on_progress = on_progress or (lambda _: None)
        self.batch_size = batch_size or PUSH_BATCH
        self.top_k = runtime.settings.top_k

    # -- push -----------------------------------------------------------------------------

    def push(self) -> dict[str, Any]:
        """Vote every unlabelled task and write the predictions under a new version."""
        progress = PushProgress()
        self.on_progress(progress)
        schema = self.runtime.projects.remember(
            self.project, self.client.label_config(self.project)
        )
        model = SimilarityModel(self.runtime, self.project)
        take_label_changes(self.store, self.project)  # a push re-votes every task anyway
        tasks = list(self.client.tasks(self.project, full=True))
        labelled = [t for t in tasks if latest_annotation(t) is not None]
        unlabelled = [t for t in tasks if latest_annotation(t) is None]

        progress.stage = "embedding"
        self.embed_missing(model, schema, labelled, unlabelled, progress)
        info = self.store.collection(self.project)
        if info is None:
            return {
                "project": self.project,
                "tasks": len(tasks),
                "pushed": 0,
                "failed_tasks": progress.failed,
            }
        target = push_version(info)

        progress.stage = "voting and pushing"
        current = [t for t in unlabelled if _has_version(t, target)]
        todo = [t for t in unlabelled if not _has_version(t, target)]
        progress.total, progress.done, progress.already = (
            len(unlabelled),
            len(current),
            len(current),
        )
        self.on_progress(progress)
        # A killed push wrote these already: their radii still bound the refresh search.
        radii: list[float] = []
        for start in range(0, len(current), self.batch_size):
            chunk = [t["id"] for t in current[start : start + self.batch_size]]
            radii += self._record_radii(self._vote(model, chunk))
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            radii += self._push_batch(model, batch, target, progress)
            progress.done += len(batch)
            self.on_progress(progress)

        progress.stage = "switching version"
        self.on_progress(progress)
        stale = self._publish(target, radii)
        return {
            "project": self.project,
            "model_version": target,
            "tasks": len(tasks),
            "labelled": len(labelled),
            **progress.as_meta(),
            "failed_tasks": progress.failed,
            "deleted_stale_predictions": stale,
        }

    def embed_missing(
        self,
        model: SimilarityModel,
        schema: LabelSchema,
        labelled: Sequence[Mapping[str, Any]],
        unlabelled: Sequence[Mapping[str, Any]],
        progress: PushProgress,
    ) -> None:
        """Embed what the store lacks: labelled tasks (with their labels, e.g. annotated before
        the backend was connected) and unlabelled ones."""
        items: list[TaskImage] = []
        for task in [*labelled, *unlabelled]:
            try:
                items.append(TaskImage(task["id"], schema.image_ref(task)))
            except TaskError as exc:
                progress.failed[str(task["id"])] = str(exc)
        known = self.store.has_vectors(self.project, [i.task for i in items])
        latest = {t["id"]: latest_annotation(t) for t in labelled}
        missing = []
        for item in items:
            if item.task in known:
                continue
            annotation = latest.get(item.task)
            if annotation is not None:
                item = TaskImage(
                    item.task,
                    item.image,
                    schema.labels_from_result(annotation.get("result") or []),
                    _annotation_source(annotation),
                )
            missing.append(item)
        progress.total = len(missing)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            report = model.embed(chunk)
            progress.failed.update({str(t): str(e) for t, e in report.failures.items()})
            progress.done = start + len(chunk)
            self.on_progress(progress)

    def _push_batch(
        self,
        model: SimilarityModel,
        batch: Sequence[Mapping[str, Any]],
        target: str,
        progress: PushProgress,
    ) -> list[float]:
        """Vote (one batched search) and write one batch; the vote radii of its tasks."""
        predictions: list[dict[str, Any]] = []
        # A task missing here failed to embed: it is listed in `failed`.
        suggestions = self._vote(model, [t["id"] for t in batch])
        for task, suggestion in suggestions.items():
            prediction = model.prediction(suggestion, target, task)
            if not suggests_labels(prediction):
                progress.abstained += 1
                continue
            predictions.append({"task": task, **prediction})
        self._write(predictions, target)
        progress.pushed += len(predictions)
        return self._record_radii(suggestions)

    def _vote(self, model: SimilarityModel, tasks: Sequence[TaskId]) -> dict[TaskId, Suggestion]:
        """Fresh votes of these tasks (those with a vector), in one batched search."""
        vectors = self.store.vectors(self.project, list(tasks))
        voted = [t for t in tasks if t in vectors]
        if not voted:
            return {}
        found = model.suggest_batch(np.stack([vectors[t] for t in voted]), [[t] for t in voted])
        return dict(zip(voted, found, strict=True))

    def _record_radii(self, suggestions: Mapping[TaskId, Suggestion]) -> list[float]:
        """Record each voted task's radius in the store (the refresh's candidate test), less
        the tolerance for the engine's float order against the vote's; the recorded values."""
        radii = {
            task: vote_radius(s, self.top_k) - SIMILARITY_EPS for task, s in suggestions.items()
        }
        self.store.set_vote_radii(self.project, radii)
        return list(radii.values())

    def _write(self, predictions: list[dict[str, Any]], target: str) -> None:
        """Import predictions, retrying with backoff; after a failed attempt, re-read which
        tasks already got theirs (a write that timed out may have happened)."""
        pending = predictions
        for delay in (*WRITE_RETRY_DELAYS_S, None):
            if not pending:
                return
            try:
                self.client.import_predictions(self.project, pending)
                return
            except LabelStudioUnavailable as exc:
                if delay is None:
                    raise
                log.warning("prediction push failed, retrying", extra={"error": str(exc)})
                time.sleep(delay)
                pending = [p for p in pending if not self._holds(p["task"], target)]

    def _holds(self, task: TaskId, version: str) -> bool:
        """Whether the task got its prediction; unknown (Label Studio still away) counts as
        no, and the next attempt writes it."""
        try:
            return bool(self._ours(task, version))
        except LabelStudioUnavailable:
            return False

    def _ours(self, task: TaskId, version: str) -> list[dict[str, Any]]:
        """The task's predictions of this version in Label Studio."""
        return [p for p in self.client.predictions(int(task)) if p.get("model_version") == version]

    def _publish(self, target: str, radii: Sequence[float]) -> int:
        """Drop our older versions, record the new one, show it to annotators."""
        deleted = 0
        for version in self.client.model_versions(self.project):
            if version.startswith(VERSION_PREFIX) and version != target:
                deleted += self.client.delete_model_version(self.project, version)
        edges = radius_edges(radii)
        record_push(
            self.store,
            self.project,
            published_version=target,
            vote_radius_min=edges[0],
            vote_radius_edges=edges[1:],
        )
        shown = self.client.project(self.project).get("model_version") or ""
        titles = {b.get("title") for b in self.client.backends(self.project)}
        if shown != target and shown not in titles:  # a backend title means "ask the backend"
            self.client.set_model_version(self.project, target)
        return deleted

    # -- refresh --------------------------------------------------------------------------

    def refresh(self) -> dict[str, Any]:
        """Re-vote the unlabelled tasks whose top-k the latest label changes can enter."""
        started = time.perf_counter()
        info = self.store.collection(self.project)
        if info is None or not info.published_version:
            return {"project": self.project, "skipped": "never pushed: run preannotate first"}
        changed = take_label_changes(self.store, self.project)
        if len(changed) >= MAX_REFRESH_CHANGES:
            return {"project": self.project, "full_push": True, **self.push()}
        model = SimilarityModel(self.runtime, self.project)
        revotes = self.affected_by(model, changed, (info.vote_radius_min, *info.vote_radius_edges))
        updated = created = deleted = 0
        for task, suggestion in revotes.items():
            prediction = model.prediction(suggestion, info.published_version, task)
            ours = self._ours(task, info.published_version)
            if not suggests_labels(prediction):
                for old in ours:
                    self.client.delete_prediction(old["id"])
                    deleted += 1
            elif not ours:
                self._write([{"task": task, **prediction}], info.published_version)
                created += 1
            elif ours[0].get("result") != prediction["result"]:
                self.client.update_prediction(
                    ours[0]["id"], prediction["result"], prediction["score"]
                )
                updated += 1
        return {
            "project": self.project,
            "label_changes": len(changed),
            "affected": len(revotes),
            "updated": updated,
            "created": created,
            "deleted": deleted,
            "seconds": round(time.perf_counter() - started, 3),
        }

    def affected_by(
        self, model: SimilarityModel, changed: Iterable[TaskId], edges: Sequence[float]
    ) -> dict[TaskId, Suggestion]:
        """The unlabelled tasks one of these tasks is (or was) a top-k neighbour of, and the
        changed tasks that are unlabelled now, with their new votes. `edges`: the recorded
        radii's bands (the first edge a lower bound of every one).

        Every vote taken here records its radius, so the candidates of the next refresh are
        judged against what is true now."""
        changed_set = set(changed)
        reach: dict[TaskId, float] = {}  # candidate -> its highest similarity to a change
        vectors = self.store.vectors(self.project, list(changed_set))
        found = (
            self.store.unlabelled_within(self.project, np.stack(list(vectors.values())), edges)
            if vectors
            else []
        )
        for task, nearby in zip(vectors, found, strict=True):
            for near in nearby:
                # The recorded radius is a lower bound of the task's k-th similarity now.
                radius = edges[0] if near.vote_radius is None else near.vote_radius
                if near.task != task and near.similarity >= radius:
                    reach[near.task] = max(near.similarity, reach.get(near.task, -1.0))
        # A task whose labels were removed is unlabelled now: it needs a prediction itself.
        now_unlabelled = {
            task
            for task, point in self.store.points(self.project, list(changed_set), False).items()
            if not point.labelled
        }
        votes = self._vote(model, list(dict.fromkeys([*reach, *now_unlabelled])))
        revotes: dict[TaskId, Suggestion] = {}
        for task, suggestion in votes.items():
            entered = any(n.task in changed_set for n in suggestion.neighbours)
            radius = vote_radius(suggestion, self.top_k)
            if task in now_unlabelled or entered or reach[task] >= radius - SIMILARITY_EPS:
                revotes[task] = suggestion
        radii = self._record_radii(votes)
        if radii and min(radii) < edges[0]:
            record_push(self.store, self.project, vote_radius_min=min(radii))
        return revotes


def radius_edges(radii: Sequence[float]) -> list[float]:
    """The refresh's bands of recorded radii: their minimum, then the edges that split them
    into RADIUS_BANDS bands of about equal size (a band is searched with its own threshold)."""
    if not radii:
        return [1.0]
    ordered = np.sort(np.asarray(radii, dtype=np.float64))
    inner = np.quantile(ordered, np.arange(1, RADIUS_BANDS) / RADIUS_BANDS)
    return [float(ordered[0]), *sorted({float(e) for e in inner if e > ordered[0]})]


def latest_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The task's newest annotation that is not a skip, or None when it has none."""
    annotations = [
        a
        for a in task.get("annotations") or []
        if isinstance(a, Mapping) and not a.get("was_cancelled")
    ]
    if not annotations:
        return None
    return max(annotations, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))


def _annotation_source(annotation: Mapping[str, Any]) -> Annotation:
    return Annotation(
        id=annotation.get("id"),
        updated_at=annotation.get("updated_at") or annotation.get("created_at"),
    )


def _has_version(task: Mapping[str, Any], version: str) -> bool:
    return any(
        isinstance(p, Mapping) and p.get("model_version") == version
        for p in task.get("predictions") or []
    )
