"""The similarity model: Label Studio's predict/fit, shaped like label_studio_ml 2.x.

One `SimilarityModel` is built per request for one project (as label_studio_ml 2.x does) on top
of the process's `Runtime` (echolabel.core.runtime): the store, the embedder with its loaded
encoders, the image fetcher, the remembered label schemas and the background embedding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np

from echolabel.core.runtime import Runtime
from echolabel.embedding import EmbedReport, TaskImage
from echolabel.images import ImageError
from echolabel.label_config import GALLERY_TAG, LabelSchema, TaskError
from echolabel.vote import FieldVote, task_score, vote
from vectorstore import Annotation, CollectionInfo, Neighbour, TaskId

from .projects import project_id

log = logging.getLogger(__name__)

LABEL_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"}
DELETE_EVENTS = {"ANNOTATION_DELETED", "ANNOTATIONS_DELETED"}
PREEMBED_EVENTS = {"TASKS_CREATED"}


def task_path(project: int | str, task: TaskId) -> str:
    """The backend path of a task's pages (task ids may be folder paths: slashes stay).

    The core writes it into predictions (the neighbour-gallery link); backend/ serves it.
    """
    return f"/projects/{quote(str(project), safe='')}/tasks/{quote(str(task), safe='/')}"


@dataclass
class Suggestion:
    """The vote for one query and the neighbours behind it."""

    votes: dict[str, FieldVote]
    neighbours: list[Neighbour]

    @property
    def score(self) -> float:
        return task_score(self.votes)


@dataclass
class PredictOutcome:
    """One entry per task, in order (a prediction, or [] for none), plus abstentions/errors."""

    predictions: list[dict[str, Any] | list[Any]]
    abstained: dict[TaskId, dict[str, str]] = field(default_factory=dict)
    errors: dict[TaskId, ImageError] = field(default_factory=dict)
    pending: set[TaskId] = field(default_factory=set)


class SimilarityModel:
    """Suggests choices for a project's image tasks from their nearest labelled neighbours."""

    def __init__(self, runtime: Runtime, project: object, label_config: str | None = None) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.store = runtime.store
        self.project = project_id(project)
        self._label_config = label_config
        self._schema: LabelSchema | None = None
        self._collection: CollectionInfo | None = None

    @property
    def schema(self) -> LabelSchema:
        if self._schema is None:
            self._schema = self.runtime.projects.schema(self.project, self._label_config)
        return self._schema

    def live_collection(self) -> CollectionInfo | None:
        """The project's live collection, read from the store once per model (one model serves
        one request: each read is an alias look-up plus collection info, ~0.4 ms in process and
        a round trip to a Qdrant server). Not cached while there is none: the request's own
        first embedding creates it."""
        if self._collection is None:
            self._collection = self.store.collection(self.project)
        return self._collection

    @property
    def encoder_name(self) -> str:
        """The encoder of the project's live collection, else the configured one."""
        info = self.live_collection()
        return info.encoder if info else self.settings.encoder

    @property
    def model_version(self) -> str:
        """Encoder + collection generation, plus the label state of the last push (see
        echolabel/core/preannotate.py): Label Studio skips tasks holding a prediction of it."""
        info = self.live_collection()
        if info is None:
            return f"echolabel-{self.settings.encoder}-g1"
        return info.published_version or f"echolabel-{info.encoder}-g{info.generation}"

    def setup(self) -> str:
        """Validate and remember the label config; cheap (Label Studio waits only 3 s)."""
        _ = self.schema
        return self.model_version

    # -- predict -------------------------------------------------------------------------

    def predict(
        self, tasks: Sequence[Mapping[str, Any]], context: Mapping[str, Any] | None = None
    ) -> PredictOutcome:
        """One entry per task, in order; a task whose image failed gets `[]` (no prediction).

        Raises the image error when every task failed, so a single bad upload is a clear 4xx.
        """
        schema = self.schema
        items = [TaskImage(task=_task_id(task), image=schema.image_ref(task)) for task in tasks]
        vectors, report = self.ensure_vectors(items)
        if report.failures and len(report.failures) == len(items):
            raise next(iter(report.failures.values()))
        version = self.model_version
        outcome = PredictOutcome(predictions=[], errors=report.failures, pending=report.pending)
        ready = [item.task for item in items if item.task in vectors]
        suggestions: dict[TaskId, Suggestion] = {}
        if len(ready) == 1:  # one task (an annotator opening it): merged with concurrent ones
            suggestions = {ready[0]: self.suggest(vectors[ready[0]], exclude=ready)}
        elif ready:  # "Retrieve Predictions" on many tasks: one batched search of its own
            found = self.suggest_batch(np.stack([vectors[t] for t in ready]), [[t] for t in ready])
            suggestions = dict(zip(ready, found, strict=True))
        for item in items:
            suggestion = suggestions.get(item.task)
            if suggestion is None:
                # Failed or still embedding. An empty list stores nothing for this task in
                # Label Studio 1.23 (it iterates a list of predictions per task), so it asks
                # again later instead of keeping a blank prediction.
                outcome.predictions.append([])
                continue
            abstained = {
                name: v.abstain_reason or "" for name, v in suggestion.votes.items() if v.abstained
            }
            if abstained:
                outcome.abstained[item.task] = abstained
            outcome.predictions.append(self.prediction(suggestion, version, item.task))
        return outcome

    def suggest(
        self,
        vector: np.ndarray,
        exclude: Sequence[TaskId] = (),
        exclude_images: Sequence[str] = (),
    ) -> Suggestion:
        """Vote of the top-k labelled neighbours, never counting the query itself; the search
        goes out together with concurrent requests' (Runtime.searches)."""
        k = self.settings.top_k
        neighbours = self.runtime.searches.nearest(
            self.project, vector, k + len(exclude_images), exclude
        )
        return self._suggestion([n for n in neighbours if n.image not in exclude_images][:k])

    def suggest_batch(
        self, vectors: np.ndarray, excludes: Sequence[Sequence[TaskId]]
    ) -> list[Suggestion]:
        """`suggest` for every row of `vectors` (each never counting `excludes[row]`), in one
        batched search."""
        found = self.store.nearest_batch(self.project, vectors, self.settings.top_k, excludes)
        return [self._suggestion(neighbours) for neighbours in found]

    def _suggestion(self, neighbours: list[Neighbour]) -> Suggestion:
        votes = vote(
            neighbours,
            self.schema.field_names,
            min_neighbours=self.settings.min_neighbours,
            min_score=self.settings.min_score,
            multiple=self.schema.multiple_fields,
        )
        return Suggestion(votes=votes, neighbours=neighbours)

    def suggest_image(self, ref: str) -> Suggestion:
        """The vote for an image that need not be a task (`echolabel predict`): embedded with
        the project's encoder, never counting itself should it be stored."""
        image = self.runtime.fetcher.load(ref)
        vector = self.runtime.embedder.embed_images(self.encoder_name, [image])[0]
        return self.suggest(vector, exclude_images=[ref])

    def prediction(
        self, suggestion: Suggestion, version: str, task: TaskId | None = None
    ) -> dict[str, Any]:
        """Label Studio's prediction: one `choices` item per field that did not abstain (may be
        none), plus the link to the task's neighbour gallery when the label config has a
        <TextArea name="neighbours"> and ECHOLABEL_PUBLIC_URL is set.

        The link goes only with a suggestion: Label Studio stores nothing for an empty result
        and asks again later, which an abstained task needs once more labels exist.

        A single-choice item holds the winner, scored by its share; a multi-choice item holds
        every choice whose share reached ECHOLABEL_MIN_SCORE, scored by the field's score (the
        least certain choice's max(share, 1 - share), see echolabel.vote)."""
        result: list[dict[str, Any]] = [
            {
                "from_name": choices.name,
                "to_name": choices.to_name,
                "type": "choices",
                "value": {"choices": list(suggestion.votes[choices.name].suggested)},
                "score": round(suggestion.votes[choices.name].score, 4),
            }
            for choices in self.schema.fields
            if not suggestion.votes[choices.name].abstained
        ]
        public_url = self.settings.public_url
        if result and self.schema.gallery_link and public_url and task is not None:
            result.append(
                {
                    "from_name": GALLERY_TAG,
                    "to_name": self.schema.image_name,
                    "type": "textarea",
                    "value": {"text": [f"{public_url}{task_path(self.project, task)}/neighbours"]},
                }
            )
        return {"result": result, "score": round(suggestion.score, 4), "model_version": version}

    def ensure_vectors(
        self, items: Sequence[TaskImage]
    ) -> tuple[dict[TaskId, np.ndarray], EmbedReport]:
        """Stored vectors of these tasks, embedding the ones that have none (bounded wait)."""
        vectors = self.store.vectors(self.project, [i.task for i in items])
        missing = [i for i in items if i.task not in vectors]
        if not missing:
            return vectors, EmbedReport()
        report = self.embed(missing, wait_s=self.settings.embed_wait_s)
        unavailable = set(report.failures) | report.pending
        done = [i.task for i in missing if i.task not in unavailable]
        vectors.update(self.store.vectors(self.project, done))
        return vectors, report

    def embed(self, items: Sequence[TaskImage], wait_s: float = 0.0) -> EmbedReport:
        """Embed and store these tasks with the project's encoder.

        With REDIS_URL, workers do it: wait up to `wait_s`, the rest stays pending (its
        result is stored when it lands). Without Redis, or while it is down, inline.
        """
        name = self.encoder_name
        dispatcher = self.runtime.dispatcher
        if dispatcher is not None:
            jobs = dispatcher.submit(self.project, name, items)
            if jobs is not None:
                if wait_s <= 0:
                    return EmbedReport(pending={i.task for i in items})
                return dispatcher.wait(jobs, wait_s)
        backlog = self.runtime.backlog
        if wait_s <= 0 or backlog is None:
            return EmbedReport(failures=self.runtime.embed_here(self.project, name, items))
        # Inline within the wait; the rest after the reply (Label Studio asks again).
        deadline = time.monotonic() + wait_s
        report, rest = EmbedReport(), list(items)
        while rest and time.monotonic() < deadline:
            chunk, rest = rest[: self.settings.batch_size], rest[self.settings.batch_size :]
            report.failures.update(self.runtime.embed_here(self.project, name, chunk))
        if rest:
            backlog.submit(self.project, rest)
            report.pending = {i.task for i in rest}
        return report

    # -- learn from annotations --------------------------------------------------------------

    def fit(self, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Apply one Label Studio webhook; returns what changed (for logs and tests)."""
        if event in LABEL_EVENTS:
            # ANNOTATIONS_CREATED (bulk) sends lists under both `annotation` and `task`.
            raw_tasks = data.get("task") or []
            tasks = {
                t.get("id"): t
                for t in ([raw_tasks] if isinstance(raw_tasks, Mapping) else raw_tasks)
                if isinstance(t, Mapping)
            }
            return {
                "labelled": [
                    self._learn(a, tasks.get(a.get("task")) if isinstance(a, Mapping) else None)
                    for a in _annotations(data)
                ]
            }
        if event in PREEMBED_EVENTS:
            tasks = data.get("tasks") or []
            return self.preembed([t for t in tasks if isinstance(t, Mapping)])
        if event in DELETE_EVENTS:
            cleared: list[TaskId] = []
            for annotation in _annotations(data):
                if isinstance(annotation, Mapping) and annotation.get("id") is not None:
                    if self.runtime.dispatcher is not None:
                        # First: a job still queued may carry this annotation's labels.
                        self.runtime.dispatcher.note_deleted(self.project, annotation["id"])
                    cleared += self.store.clear_labels(self.project, annotation["id"])
            return {"cleared": cleared}
        return {"ignored": event}

    def _learn(self, annotation: Mapping[str, Any], task: Mapping[str, Any] | None) -> TaskId:
        if not isinstance(annotation, Mapping) or "id" not in annotation:
            raise TaskError("annotation webhook without an annotation id")
        task_key = _task_id(task) if task else annotation.get("task")
        if task_key is None:
            raise TaskError(f"annotation {annotation['id']} names no task")
        # A skipped task ("was_cancelled") carries no labels: it must not teach anything.
        labels = (
            {}
            if annotation.get("was_cancelled")
            else self.schema.labels_from_result(annotation.get("result") or [])
        )
        source = Annotation(
            id=annotation["id"],
            updated_at=annotation.get("updated_at") or annotation.get("created_at"),
        )
        if self.store.set_labels(self.project, task_key, labels, source):
            return task_key
        if not task:
            raise TaskError(
                f"annotation {annotation['id']}: task {task_key} is not embedded yet and the "
                "webhook carries no task data to embed it from"
            )
        item = TaskImage(task_key, self.schema.image_ref(task), labels, source)
        report = self.embed([item])  # the labels travel with the task: no need to wait
        if report.failures:
            raise report.failures[task_key]
        return task_key

    def preembed(self, tasks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Embed imported tasks ahead of time so that later predictions are instant."""
        items, skipped = [], []
        for task in tasks:
            try:
                items.append(TaskImage(_task_id(task), self.schema.image_ref(task)))
            except TaskError as exc:
                skipped.append(str(exc))
        known = self.store.has_vectors(self.project, [i.task for i in items])
        report = self.embed([i for i in items if i.task not in known])
        return {
            "embedded_or_queued": len(items) - len(known) - len(report.failures),
            "failed": {str(t): str(e) for t, e in report.failures.items()},
            "skipped": skipped,
        }


def suggests_labels(prediction: Mapping[str, Any]) -> bool:
    """Whether a prediction suggests any choice (not only the gallery link)."""
    return any(r.get("type") == "choices" for r in prediction.get("result") or ())


def _annotations(data: Mapping[str, Any]) -> list[Any]:
    """Single-annotation events carry `annotation`, bulk ones `annotations` (a list)."""
    found = data.get("annotation") or data.get("annotations") or []
    return [found] if isinstance(found, Mapping) else list(found)


def _task_id(task: Mapping[str, Any]) -> TaskId:
    if not isinstance(task, Mapping):
        raise TaskError(f"a task must be a JSON object, got {type(task).__name__}")
    value = task.get("id")
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise TaskError(f"task without a valid `id` (keys present: {sorted(task)})")
    return value
