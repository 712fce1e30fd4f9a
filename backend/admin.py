"""Admin operations: start the catalogue's jobs, and see every job with its progress and errors.

With Redis, a job goes to its RQ queue (workers/catalogue.py; one that touches the store runs
on a worker that may write it: any worker with a Qdrant server, the backend's own in-process
worker with the embedded store). Without Redis, or while it is unreachable, the backend runs
the same job function in a thread, recorded in its job journal (backend/job_journal.py) so
that a restart resumes what a crash or a stop interrupted.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rq.registry import ScheduledJobRegistry, StartedJobRegistry

from echolabel.core.runtime import Runtime
from echolabel.encoders.centred import centres
from workers.queues import STORE_QUEUES, list_rq_jobs, queue
from workers.runtime import Launched, RunHere, redis_dispatcher, run_or_enqueue
from workers.training.selection import RetrainPolicy, SelectionLog
from workers.worker import ThreadWorker

from .job_journal import JobJournal

log = logging.getLogger(__name__)


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
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.local_jobs: dict[str, LocalJob] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._worker_thread: threading.Thread | None = None
        self._timers: dict[str, threading.Thread] = {}
        self.journal = JobJournal(runtime.settings.model_dir / "jobs")
        # As many launches as RQ would try a job: its first, and one per retry interval.
        self._max_attempts = 1 + len(runtime.settings.job_retry_intervals)

    def resume_interrupted(self) -> list[str]:
        """Start again the jobs this process's predecessor ran in threads and never ended (a
        crash, or a stop that did not wait for them); their ids."""
        resumed = []
        for entry in self.journal.interrupted():
            self.journal.ended(entry.id)  # written again if it runs here once more
            if entry.attempts >= self._max_attempts:
                log.warning(
                    "job interrupted too often: not resumed",
                    extra={"job": entry.id, "attempts": entry.attempts},
                )
                continue
            log.warning("resuming an interrupted job", extra={"job": entry.id})
            self._start(entry.job, attempt=entry.attempts + 1, **entry.arguments)
            resumed.append(entry.id)
        return resumed

    def start_store_worker(self, every_s: float = 1.0) -> None:
        """With Redis and the embedded store, this process runs the store-writing jobs.

        A burst worker starts only when one of those queues holds a job (a due retry counts):
        idle, that is a few Redis reads a second, not a worker registration, a pub/sub thread
        and a scheduler run every second. The loop notices `stop` within a second, and a Redis
        outage only pauses it (RedisGate warns once a minute).
        """
        dispatcher = redis_dispatcher(self.runtime)
        if dispatcher is None or not self.runtime.store.single_writer or self._worker_thread:
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

        def due(project: int | str) -> bool:
            info = self.runtime.store.collection(project)
            return info is not None and bool(info.published_version and info.label_changes)

        self._start_timer("refresh-timer", every_s, due, self.start_refresh)

    def start_retraining_timer(self, every_s: float) -> None:
        """Every `every_s` seconds, start a retraining round for each project whose labels
        grew by ECHOLABEL_RETRAIN_GROWTH since its last decision (the round checks the
        guard-rail itself and records a refusal, which resets the clock)."""
        settings = self.runtime.settings
        if every_s <= 0 or not settings.auto_retrain:
            return
        selection = SelectionLog(settings.selection_dir)
        policy = RetrainPolicy.from_settings(settings)

        def due(project: int | str) -> bool:
            if self.runtime.store.collection(project) is None:
                return False
            labelled = self.runtime.store.count(project, labelled=True)
            return labelled >= policy.next_round_at(selection.labelled_at_last_decision(project))

        self._start_timer("retraining-timer", every_s, due, self.start_retraining)

    def start_centring_timer(self, every_s: float) -> None:
        """Every `every_s` seconds, centre the pretrained encoder of each project that holds
        ECHOLABEL_CENTRE_MIN_IMAGES embedded images and was never centred (a rollback from a
        centred encoder stays): the `centre-encoder` job, switching as a promotion does."""
        if every_s <= 0 or not self.runtime.settings.auto_centre:
            return
        self._start_timer("centring-timer", every_s, self.centring_due, self.start_centring)

    def centring_due(self, project: int | str) -> bool:
        """Whether the project's encoder is to be centred now (`centres`), never twice."""
        settings = self.runtime.settings
        info = self.runtime.store.collection(project)
        return (
            info is not None
            and centres(settings, info.encoder, self.runtime.store.count(project))
            and not SelectionLog(settings.selection_dir).centred_before(project)
        )

    def start_index_timer(self, every_s: float) -> None:
        """Every `every_s` seconds, build the vote index of each project whose labels outgrew
        it (the embedded store: `VectorStore.index_due`; a server indexes by itself)."""
        self._start_timer("index-timer", every_s, self.runtime.store.index_due, self.start_index)

    def _start_timer(
        self,
        name: str,
        every_s: float,
        due: Callable[[int | str], bool],
        start: Callable[[int | str], object],
    ) -> None:
        """A thread that, every `every_s` seconds (0: never), starts `start(project)` for each
        known project that is `due`."""
        if every_s <= 0 or name in self._timers:
            return

        def loop() -> None:
            while not self._stop.wait(every_s):
                for project in self.runtime.projects.known():
                    try:
                        if due(project):
                            start(project)
                    except Exception as exc:  # one project's trouble must not stop the timer
                        log.warning(name, extra={"project": project, "error": str(exc)})

        thread = self._timers[name] = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the store worker and the timers. A job still running after `timeout_s`
        (a long re-embedding) is left to die with the process: its generation never became
        live, and RQ retries it as abandoned (or, run in a thread here, the next start
        resumes it), continuing where it stopped."""
        self._stop.set()
        for thread in (self._worker_thread, *self._timers.values()):
            if thread is not None:
                thread.join(timeout=timeout_s)
                if thread.is_alive():
                    log.warning("job interrupted by shutdown", extra={"worker": thread.name})

    def start_centring(self, project: int | str) -> dict[str, Any]:
        """Queue (or, without Redis, start) centring the project's encoder and switching to it."""
        return self._start("centre-encoder", project=project, reembed_after=True)

    def start_reembed(self, project: int | str, encoder: str) -> dict[str, Any]:
        """Queue (or, without Redis, start) the re-embedding of a project."""
        return self._start("reembed", project=project, encoder=encoder)

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
            "train-encoder",
            project=project,
            fields=list(fields),
            name=name,
            options=dict(options or {}),
            patient_key=patient_key,
            reembed_after=reembed,
        )

    def start_preannotate(self, project: int | str) -> dict[str, Any]:
        """Queue (or start) pushing predictions for every unlabelled task of the project."""
        return self._start("preannotate", project=project)

    def start_diverse_first(
        self, project: int | str, limit: int | None = None, clear: bool = False
    ) -> dict[str, Any]:
        """Queue (or start) writing the diverse-first order into the project's task data."""
        return self._start("diverse-first", project=project, limit=limit, clear=clear)

    def start_refresh(self, project: int | str) -> dict[str, Any]:
        """Queue (or start) updating the predictions that recent label changes affect."""
        return self._start("refresh", project=project)

    def start_index(self, project: int | str) -> dict[str, Any]:
        """Queue (or start) building the project's vote index (the embedded store)."""
        return self._start("build-index", project=project)

    def start_retraining(self, project: int | str) -> dict[str, Any]:
        """Queue (or start) one round of the self-improving loop for the project."""
        return self._start("retrain", project=project)

    def start_rollback(self, project: int | str, encoder: str | None = None) -> dict[str, Any]:
        """Queue (or start) going back to an earlier encoder (default: the previous one)."""
        return self._start("rollback-encoder", project=project, encoder=encoder)

    def selection(self, project: int | str) -> dict[str, Any]:
        """The project's live encoder, lineage and every retraining round's record."""
        return SelectionLog(self.runtime.settings.selection_dir).read(project)

    def start_evaluation(self, project: int | str) -> dict[str, Any]:
        """Queue (or start) the evaluation report of a project's labelled tasks."""
        return self._start("evaluate", project=project)

    def start_review(self, project: int | str) -> dict[str, Any]:
        """Queue (or start) label QA of a project's labelled tasks; the result names
        review.csv / review.json."""
        return self._start("review", project=project)

    def _start(self, job: str, /, *, attempt: int = 1, **arguments: Any) -> dict[str, Any]:
        launched = run_or_enqueue(
            self.runtime,
            job,
            in_thread=functools.partial(self._start_local, attempt=attempt),
            redis_down_runs_here=True,
            **arguments,
        )
        if launched.job is not None:
            status = str(launched.job.get_status())
            return {"job": launched.id, "status": status, "queue": launched.queue}
        return {"job": launched.id, "status": "started", "queue": launched.queue}

    def _start_local(self, launched: Launched, run: RunHere, attempt: int = 1) -> None:
        """Without Redis: the job function in a thread of this process (once at a time),
        recorded in the journal until it ends."""
        with self._lock:
            running = self.local_jobs.get(launched.id)
            if running is not None and running.status == "started":
                return
            description = launched.description
            if attempt > 1:
                description += " (resumed after a restart)"
            local = self.local_jobs[launched.id] = LocalJob(launched.id, description)
            self.journal.started(launched.id, launched.spec.name, launched.arguments, attempt)

        def report(progress: Mapping[str, Any]) -> None:
            local.progress = dict(progress)

        def work() -> None:
            # The journal forgets the job before its end is shown: whoever sees it ended
            # (a caller polling the status) never finds it still waiting to be resumed.
            try:
                result = run(report)
            except Exception as exc:
                if self._stop.is_set():  # the store closed under it: the next start resumes
                    local.status = "interrupted"
                    return
                log.warning("job failed", extra={"job": launched.id, "error": str(exc)})
                self.journal.ended(launched.id)
                local.status, local.error = "failed", f"{type(exc).__name__}: {exc}"
                return
            self.journal.ended(launched.id)
            local.result, local.status = result, "finished"

        threading.Thread(target=work, name=launched.id, daemon=True).start()

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
        dispatcher = redis_dispatcher(self.runtime)
        if dispatcher is not None:
            ok, listed = dispatcher.gate.call(lambda: list_rq_jobs(dispatcher.connection))
            if ok and listed:
                out += listed
        return out
