"""Embedding through the RQ queue when REDIS_URL is set: submit batches, wait a bounded time,
and store what the workers send back (workers.results).

The backend never loads an encoder in this mode. When Redis is unreachable, `submit` answers
None and the caller embeds inline (RedisGate warns once a minute).

One collector thread blocks on this store's result list and applies each message: with the
embedded store it upserts the points (without the labels of annotations deleted meanwhile);
with a Qdrant server the worker stored them and the collector only clears labels of deleted
annotations. Idle, that is one Redis round trip a second.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from redis import Redis
from rq.job import Job, JobStatus

from echolabel.embedding import EmbedReport, TaskImage
from echolabel.images import ImageError
from echolabel.settings import Settings
from vectorstore import Annotation, Point, StoreUnavailableError, VectorStore
from workers.catalogue import enqueue_embed
from workers.queues import REDIS_ERRORS, RedisGate, connect, fetch_job
from workers.results import EmbedMessage, ResultList, store_key

from .deleted_annotations import DeletedAnnotations

log = logging.getLogger(__name__)

APPLIED = "applied"  # job meta, for people and tests: this run's result is in the store
_REMEMBERED_OUTCOMES = 4096  # per-job failures kept for `wait` (a request waits seconds)


class EmbedDispatcher:
    """The runtime's `EmbedQueue` with Redis (echolabel.core.runtime), and this process's link
    to the job queues: its connection and gate serve every job it enqueues."""

    def __init__(self, settings: Settings, store: Callable[[], VectorStore]) -> None:
        assert settings.redis_url
        self.settings = settings
        self._store_of = store  # opened only when a result is applied (the store's owner)
        # Deletes that a queued job's result must not undo (see deleted_annotations.py).
        self.deleted = DeletedAnnotations(settings.model_dir / "deleted-annotations")
        self.connection: Redis = connect(settings.redis_url)
        self.gate = RedisGate()
        self._apply_lock = threading.Lock()
        self._applied: OrderedDict[str, dict[str, dict[str, str]]] = OrderedDict()
        self._stop = threading.Event()
        self._collector: threading.Thread | None = None

    @functools.cached_property
    def results(self) -> ResultList:
        """This store's result list (named on first use: a CLI that only enqueues other jobs
        leaves MODEL_DIR alone)."""
        return ResultList(self.connection, store_key(self.settings.model_dir))

    @property
    def store(self) -> VectorStore:
        return self._store_of()

    # -- submit and wait ----------------------------------------------------------------------

    def submit(
        self, project: int | str, encoder: str, items: Sequence[TaskImage]
    ) -> list[Job] | None:
        """One job per batch; a batch already queued or running is not queued twice."""
        ok, jobs = self.gate.call(lambda: self.enqueue(project, encoder, items))
        return jobs if ok else None

    def enqueue(self, project: int | str, encoder: str, items: Sequence[TaskImage]) -> list[Job]:
        """`submit` without the gate: Redis errors reach the caller (the CLI)."""
        return enqueue_embed(
            self.connection, self.settings, project, encoder, items, self.results.key
        )

    def note_deleted(self, project: int | str, annotation_id: int | str) -> None:
        """Remember the delete first: a job still queued may carry this annotation's labels."""
        self.deleted.add(project, annotation_id)

    def wait(self, jobs: Sequence[Job], timeout_s: float) -> EmbedReport:
        """Wait up to `timeout_s` for the jobs' results to be stored; report failures and
        what is still pending."""
        deadline = time.monotonic() + timeout_s
        outcome = EmbedReport()
        remaining = list(jobs)
        while remaining:
            still = []
            for job in remaining:
                status = job.get_status(refresh=True)
                if status == JobStatus.FINISHED:
                    failed = self._failed_images(job)
                    if failed is None:  # finished, its message not applied yet
                        still.append(job)
                        continue
                    by_key = {str(t["task"]): t["task"] for t in job.args[2]}
                    outcome.failures.update(
                        {by_key[k]: ImageError(f["reason"], f["detail"]) for k, f in failed.items()}
                    )
                elif status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                    error = ImageError(
                        "unreachable", f"embedding job {job.id} failed: {_failure_reason(job)}"
                    )
                    outcome.failures.update({t["task"]: error for t in job.args[2]})
                else:
                    still.append(job)
            remaining = still
            if remaining and time.monotonic() < deadline:
                time.sleep(0.05)
            elif remaining:
                break
        for job in remaining:
            outcome.pending.update(t["task"] for t in job.args[2])
        return outcome

    def _failed_images(self, job: Job) -> dict[str, dict[str, str]] | None:
        """A finished job's failed images once its points are stored (None: not yet)."""
        summary = job.return_value() or {}
        if "stored" in summary:  # the worker wrote the store itself (Qdrant server)
            return dict(summary.get("failed") or {})
        with self._apply_lock:
            if job.id not in self._applied:
                self._drain()
            return self._applied.get(job.id)

    # -- applying results ---------------------------------------------------------------------

    def collect_once(self) -> int:
        """Apply every result waiting now (and any a crash left half-applied)."""
        with self._apply_lock:
            return self._drain()

    def _drain(self) -> int:
        applied = 0
        for raw in self.results.in_processing():
            applied += self._apply(raw)
        while (raw := self.results.take_now()) is not None:
            applied += self._apply(raw)
        return applied

    def _apply(self, raw: bytes) -> int:
        """Apply one message (caller holds the apply lock), then forget it; 1 if applied."""
        if not self.results.still_processing(raw):
            return 0  # another thread applied it meanwhile
        try:
            message = EmbedMessage.decode(raw)
            self._store(message)
        except (*REDIS_ERRORS, StoreUnavailableError):
            raise  # kept in `processing`: applied again once Redis and the store answer
        except Exception as exc:  # a bad result must not block the ones behind it
            log.warning("embedding result not applied", extra={"error": f"{exc!r}"[:500]})
            self.results.done(raw)
            return 0
        self.results.done(raw)
        self._applied[message.job] = message.failed
        while len(self._applied) > _REMEMBERED_OUTCOMES:
            self._applied.popitem(last=False)
        self._mark_applied(message.job)
        return 1

    def _store(self, message: EmbedMessage) -> None:
        project = message.project
        if message.points:
            info = self.store.ensure_collection(
                project, message.encoder, message.dim, message.weights_id
            )
            points = [self._without_deleted(project, p) for p in message.points]
            self.store.upsert(info.project, message.encoder, points)
        for annotation in {a for a in message.stored.values() if a is not None}:
            if self.deleted.contains(project, annotation):
                self.store.clear_labels(project, annotation)

    def _without_deleted(self, project: int | str, point: Point) -> Point:
        if not self.deleted.contains(project, point.annotation.id):
            return point
        return dataclasses.replace(point, labels={}, annotation=Annotation())

    def _mark_applied(self, job_id: str) -> None:
        job = fetch_job(self.connection, job_id) if job_id else None
        if job is not None:
            job.meta[APPLIED] = True
            job.save_meta()

    def start_collector(self, timeout_s: float = 1.0) -> None:
        """Apply results in the background as they arrive."""
        if self._collector is not None:
            return

        def take_and_apply() -> None:
            raw = self.results.take(timeout_s)
            if raw is not None:
                with self._apply_lock:
                    self._apply(raw)

        def loop() -> None:
            left_over = True  # what a previous run (or a failed apply) left in `processing`
            while not self._stop.is_set():
                try:
                    ok, _ = self.gate.call(self.collect_once if left_over else take_and_apply)
                    left_over = not ok
                except Exception as exc:  # the thread must outlive any one failure
                    log.warning("applying embedding results", extra={"error": repr(exc)[:500]})
                    left_over = True
                if left_over:
                    self._stop.wait(timeout_s)

        self._collector = threading.Thread(target=loop, name="embed-collector", daemon=True)
        self._collector.start()

    def stop(self) -> None:
        """Stop the collector after the message it is applying (it blocks at most a second).

        The connection stays open: the backend's store worker and requests share it, and
        closing its pool cuts their commands in flight (redis-py then fails inside the read
        with AttributeError 'readline'). `close` releases it at the very end.
        """
        self._stop.set()
        if self._collector is not None:
            self._collector.join(timeout=10)
            self._collector = None

    def close(self) -> None:
        """Stop the collector and release the connection (nothing may use it afterwards)."""
        self.stop()
        self.connection.close()


def _failure_reason(job: Job) -> str:
    text = job.latest_result().exc_string if job.latest_result() else ""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"job {job.id} {job.get_status()}"
