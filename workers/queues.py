"""The RQ queues, the Redis connection, and how a caller degrades when Redis is down."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from echolabel.settings import Settings

log = logging.getLogger(__name__)

EMBED = "embed"
REEMBED = "reembed"
EVALUATE = "evaluate"
PREANNOTATE = "preannotate"  # pushing predictions into Label Studio, and refreshing them
QUEUES = (EMBED, REEMBED, EVALUATE, PREANNOTATE)
# Jobs on these read or write the store: with the embedded store, only its owner runs them.
STORE_QUEUES = (REEMBED, EVALUATE, PREANNOTATE)

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
T = TypeVar("T")


def connect(url: str) -> Redis:
    """A Redis connection that fails within seconds, not minutes, when Redis is gone."""
    return Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)


def queue(connection: Redis, name: str) -> Queue:
    return Queue(name, connection=connection)


ACTIVE = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED}


def fetch_job(connection: Redis, job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, connection=connection)
    except Exception:  # NoSuchJobError, or a job another version pickled
        return None


def enqueue_unique(
    target: Queue, job_id: str, func: Callable[..., object], *args: object, **options: object
) -> Job:
    """Enqueue under a deterministic id, unless that job is already queued or running."""
    existing = fetch_job(target.connection, job_id)
    if existing is not None and existing.get_status() in ACTIVE:
        return existing
    return target.enqueue(func, *args, job_id=job_id, **options)


def retry_policy(settings: Settings) -> Retry | None:
    """Retries with backoff for transient failures (image fetch, Qdrant briefly away)."""
    delays = settings.job_retry_intervals
    return Retry(max=len(delays), interval=list(delays)) if delays else None


class RedisGate:
    """Runs a Redis operation, or tells the caller to fall back when Redis is unreachable.

    Warns at most once a minute while Redis stays down, and once when it is back.
    """

    def __init__(self, warn_every_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._warn_every_s = warn_every_s
        self._clock = clock
        self._last_warning: float | None = None
        self._down = False
        self._lock = threading.Lock()
        self.warnings = 0

    def call(self, operation: Callable[[], T]) -> tuple[bool, T | None]:
        """(True, result) when Redis answered, (False, None) when it is unreachable."""
        try:
            result = operation()
        except REDIS_ERRORS as exc:
            self._record_down(exc)
            return False, None
        with self._lock:
            if self._down:
                log.warning("redis reachable again: using the queue")
                self._down = False
        return True, result

    def _record_down(self, exc: BaseException) -> None:
        with self._lock:
            self._down = True
            now = self._clock()
            if self._last_warning is None or now - self._last_warning >= self._warn_every_s:
                self._last_warning = now
                self.warnings += 1
                log.warning(
                    "redis unreachable: embedding inline until it is back",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )


# -- what is on the queues ----------------------------------------------------------------------


def list_rq_jobs(connection: Redis, finished_limit: int = 20) -> list[dict[str, Any]]:
    """Every echolabel queue's jobs by state, newest finished ones last."""
    out: list[dict[str, Any]] = []
    for name in QUEUES:
        rq_queue = queue(connection, name)
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
