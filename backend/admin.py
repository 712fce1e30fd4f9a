"""Admin operations: start a re-embedding, and see every job with its progress and errors.

With Redis, re-embedding is an RQ job on the `reembed` queue (run by a worker that may write
the store: any worker with a Qdrant server, the backend's own in-process worker with the
embedded store). Without Redis, the backend runs the same job function in a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rq import Queue
from rq.job import Job
from rq.registry import (
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from workers import jobs as job_functions
from workers.queues import (
    EMBED,
    EVALUATE,
    PREANNOTATE,
    QUEUES,
    REEMBED,
    STORE_QUEUES,
    enqueue_unique,
    queue,
    retry_policy,
)
from workers.reembed import Progress
from workers.training import TrainingProgress
from workers.worker import ThreadWorker

from . import diverse_first, preannotate
from .model import Services

log = logging.getLogger(__name__)


def reembed_job_id(project: int | str) -> str:
    return f"reembed-{project}"


def train_encoder_job_id(project: int | str) -> str:
    return f"train-encoder-{project}"


@dataclass
class LocalJob:
    """A job run in a thread of the backend when there is no Redis."""

    id: str
    description: str
    status: str = "started"
    progress: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    result: dict[str, Any] | None = None
    started_at: float = field(default_factory=time.time)


class Admin:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.local_jobs: dict[str, LocalJob] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._worker_thread: threading.Thread | None = None
        self._timer_thread: threading.Thread | None = None

    def start_store_worker(self, every_s: float = 1.0) -> None:
        """With Redis and the embedded store, this process runs the store-writing jobs.

        A burst worker starts only when one of those queues holds a job (a due retry counts):
        idle, that is a few Redis reads a second, not a worker registration, a pub/sub thread
        and a scheduler run every second. The loop notices `stop` within a second, and a Redis
        outage only pauses it (RedisGate warns once a minute).
        """
        dispatcher = self.services.dispatcher
        if dispatcher is None or not self.services.store.single_writer or self._worker_thread:
            return
        queues = [queue(dispatcher.connection, name) for name in STORE_QUEUES]

        def has_work() -> bool:
            # Queued jobs, retries that are due, and jobs a stopped process abandoned (a
            # burst's maintenance retries those).
            return any(
                q.count
                or ScheduledJobRegistry(queue=q).get_jobs_to_schedule(chunk_size=1)
                or StartedJobRegistry(queue=q).get_expired_job_ids()
                for q in queues
            )

        def work_queue() -> None:
            if has_work():
                worker = ThreadWorker(queues, connection=dispatcher.connection)
                worker.work(burst=True, with_scheduler=True, logging_level="WARNING")

        def loop() -> None:
            while not self._stop.is_set():
                dispatcher.gate.call(work_queue)
                self._stop.wait(every_s)

        self._worker_thread = threading.Thread(target=loop, name="reembed-worker", daemon=True)
        self._worker_thread.start()

    def start_refresh_timer(self, every_s: float) -> None:
        """Refresh pushed predictions of projects with label changes every `every_s` seconds
        (besides the refresh every ECHOLABEL_REFRESH_AFTER changes)."""
        if every_s <= 0 or self._timer_thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(every_s):
                for project in self.services.projects.known():
                    try:
                        info = self.services.store.collection(project)
                        if info is not None and info.published_version and info.label_changes:
                            self.start_refresh(project)
                    except Exception as exc:  # one project's trouble must not stop the timer
                        log.warning("refresh timer", extra={"project": project, "error": str(exc)})

        self._timer_thread = threading.Thread(target=loop, name="refresh-timer", daemon=True)
        self._timer_thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the store worker and the refresh timer. A job still running after `timeout_s`
        (a long re-embedding) is left to die with the process: its generation never became
        live, and RQ retries it as abandoned, resuming where it stopped."""
        self._stop.set()
        for thread in (self._worker_thread, self._timer_thread):
            if thread is not None:
                thread.join(timeout=timeout_s)
                if thread.is_alive():
                    log.warning("job interrupted by shutdown", extra={"thread": thread.name})

    def start_reembed(self, project: int | str, encoder: str) -> dict[str, Any]:
        """Queue (or, without Redis, start) the re-embedding of a project."""
        return self._start(
            reembed_job_id(project),
            REEMBED,
            job_functions.reembed,
            (project, encoder),
            f"re-embed project {project} with {encoder}",
            with_progress=True,
        )

    def start_training_encoder(
        self,
        project: int | str,
        fields: Sequence[str] = (),
        *,
        name: str | None = None,
        options: Mapping[str, Any] | None = None,
        patient_key: str | None = None,
        reembed: bool = False,
    ) -> dict[str, Any]:
        """Queue (or, without Redis, start) training an encoder on the project's labels,
        then optionally re-embedding the project with it. `options` are TrainOptions fields
        (epochs, input_size, ...); progress (epoch, loss, validation accuracy, ETA) is in
        the job's meta."""
        return self._start(
            train_encoder_job_id(project),
            REEMBED,
            job_functions.train_encoder,
            (project, list(fields), name, dict(options or {}), patient_key, reembed),
            f"train encoder on project {project}" + (" and re-embed" if reembed else ""),
            with_progress=True,
        )

    def start_preannotate(self, project: int | str) -> dict[str, Any]:
        """Queue (or start) pushing predictions for every unlabelled task of the project."""
        return self._start(
            f"preannotate-{project}",
            PREANNOTATE,
            preannotate.preannotate_project,
            (project,),
            f"pre-annotate project {project}",
            with_progress=True,
        )

    def start_diverse_first(
        self, project: int | str, limit: int | None = None, clear: bool = False
    ) -> dict[str, Any]:
        """Queue (or start) writing the diverse-first order into the project's task data."""
        return self._start(
            f"diverse-first-{project}",
            PREANNOTATE,
            diverse_first.diverse_first_project,
            (project, limit, clear),
            f"diverse-first order of project {project}" + (" (clear)" if clear else ""),
            with_progress=True,
        )

    def start_refresh(self, project: int | str) -> dict[str, Any]:
        """Queue (or start) updating the predictions that recent label changes affect."""
        return self._start(
            f"refresh-{project}",
            PREANNOTATE,
            preannotate.refresh_project,
            (project,),
            f"refresh predictions of project {project}",
        )

    def start_evaluation(self, project: int | str) -> dict[str, Any]:
        """Queue (or start) the evaluation report of a project's labelled tasks."""
        return self._start(
            f"evaluate-{project}",
            EVALUATE,
            job_functions.evaluate_project,
            (project,),
            f"evaluate project {project}",
        )

    def start_review(self, project: int | str) -> dict[str, Any]:
        """Queue (or start) label QA of a project's labelled tasks (on the `evaluate` queue:
        it reads the store like the evaluation); the result names review.csv / review.json."""
        return self._start(
            f"review-{project}",
            EVALUATE,
            job_functions.review_project,
            (project,),
            f"label QA of project {project}",
        )

    def _start(
        self,
        job_id: str,
        queue_name: str,
        func: Callable[..., dict],
        args: tuple[Any, ...],
        description: str,
        with_progress: bool = False,
    ) -> dict[str, Any]:
        dispatcher = self.services.dispatcher
        if dispatcher is not None:
            settings = self.services.settings
            ok, job = dispatcher.gate.call(
                lambda: enqueue_unique(
                    queue(dispatcher.connection, queue_name),
                    job_id,
                    func,
                    *args,
                    retry=retry_policy(settings),
                    job_timeout=settings.job_timeout_s,
                    result_ttl=7 * 24 * 3600,
                    failure_ttl=7 * 24 * 3600,
                    description=description,
                )
            )
            if ok and job is not None:
                return {"job": job.id, "status": str(job.get_status()), "queue": queue_name}
        return self._start_local(job_id, func, args, description, with_progress)

    def _start_local(
        self,
        job_id: str,
        func: Callable[..., dict],
        args: tuple[Any, ...],
        description: str,
        with_progress: bool,
    ) -> dict[str, Any]:
        """Without Redis: the same job function in a thread of this process."""
        with self._lock:
            running = self.local_jobs.get(job_id)
            if running is not None and running.status == "started":
                return {"job": job_id, "status": "started", "queue": "in-process"}
            local = self.local_jobs[job_id] = LocalJob(job_id, description)

        def report(progress: Progress | TrainingProgress) -> None:
            local.progress = progress.as_meta()

        def run() -> None:
            try:
                options = {"on_progress": report} if with_progress else {}
                local.result = func(*args, **options)
                local.status = "finished"
            except Exception as exc:
                local.status, local.error = "failed", f"{type(exc).__name__}: {exc}"
                log.warning("job failed", extra={"job": job_id, "error": str(exc)})

        threading.Thread(target=run, name=job_id, daemon=True).start()
        return {"job": job_id, "status": "started", "queue": "in-process"}

    def jobs(self) -> list[dict[str, Any]]:
        """Queued, running, failed and recently finished jobs, with progress and errors."""
        out = [
            {
                "id": j.id,
                "queue": "in-process",
                "status": j.status,
                "description": j.description,
                "progress": j.progress,
                "error": j.error,
                "result": j.result,
            }
            for j in self.local_jobs.values()
        ]
        dispatcher = self.services.dispatcher
        if dispatcher is not None:
            ok, listed = dispatcher.gate.call(lambda: list_rq_jobs(dispatcher.connection))
            if ok and listed:
                out += listed
        return out


def list_rq_jobs(connection: Any, finished_limit: int = 20) -> list[dict[str, Any]]:
    """Every echolabel queue's jobs by state, newest finished ones last."""
    out: list[dict[str, Any]] = []
    for name in QUEUES:
        rq_queue = Queue(name, connection=connection)
        groups = [
            ("queued", rq_queue.get_job_ids()),
            ("started", StartedJobRegistry(name, connection=connection).get_job_ids()),
            ("failed", FailedJobRegistry(name, connection=connection).get_job_ids()),
            (
                "finished",
                FinishedJobRegistry(name, connection=connection).get_job_ids()[-finished_limit:],
            ),
        ]
        for state, ids in groups:
            for job in Job.fetch_many(ids, connection=connection):
                if job is not None:
                    out.append(describe_job(job, name, state))
    return out


def describe_job(job: Job, queue_name: str, state: str) -> dict[str, Any]:
    error = None
    if state == "failed":
        result = job.latest_result()
        lines = [ln for ln in ((result.exc_string if result else "") or "").splitlines() if ln]
        error = lines[-1] if lines else "failed"
    # Embedding results carry vectors; the others are small summaries worth showing.
    result = job.return_value() if state == "finished" and queue_name != EMBED else None
    return {
        "id": job.id,
        "queue": queue_name,
        "status": state,
        "description": job.description,
        "progress": job.meta.get("progress", {}),
        "error": error,
        "result": result,
        "enqueued_at": job.enqueued_at.isoformat() if job.enqueued_at else None,
    }
