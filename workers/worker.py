"""The echolabel RQ worker: one process, models loaded once, kept across jobs.

RQ's default `Worker` forks a work-horse per job: the child would load the encoder again for
every job, and a CUDA context cannot cross `fork`. `SimpleWorker` runs jobs in the worker
process itself, so the encoders loaded by the first job (kept in the process's runtime,
`workers.runtime`) serve every later one. One worker per GPU; scale out with more processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from rq import SimpleWorker
from rq.timeouts import TimerDeathPenalty

from echolabel.settings import Settings
from workers.queues import QUEUES, STORE_QUEUES, connect, queue
from workers.runtime import install, open_runtime

# How long the worker's pub/sub thread blocks on one read. RQ passes 60 s and relies on
# unsubscribing to wake it, but redis-py 8's `stop()` joins that thread without a timeout, and a
# thread that has already handled the unsubscribe reply waits the whole read for a subscription
# that never comes: a burst worker then takes up to 60 s to exit (3 bursts in 20 on a loaded
# machine; the backend's store-worker loop and the tests stall alike). Reading in 1 s slices
# bounds that wait at a second.
PUBSUB_READ_S = 1.0


class EcholabelWorker(SimpleWorker):
    """SimpleWorker that keeps the process's loaded encoders across jobs."""

    def subscribe(self) -> None:
        """RQ's subscription to the worker's command channel, its thread reading in short
        slices (PUBSUB_READ_S) so that the worker's teardown never waits out a long read."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=PUBSUB_READ_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )


class ThreadWorker(EcholabelWorker):
    """For a worker loop in a non-main thread (the backend's in-process `reembed` worker):
    signals only reach the main thread, so no signal handlers and a timer-based timeout."""

    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self) -> None:
        pass


def default_queues(settings: Settings) -> tuple[str, ...]:
    """Every queue with a Qdrant server; without one, the store's queues belong to the process
    that holds the embedded store (the backend runs them in process)."""
    return QUEUES if settings.qdrant_url else tuple(q for q in QUEUES if q not in STORE_QUEUES)


def run_worker(
    settings: Settings,
    queue_names: Sequence[str] | None = None,
    *,
    burst: bool = False,
    device: str | None = None,
) -> bool:
    """Work the queues until stopped (or, with `burst`, until they are empty)."""
    queue_names = queue_names or default_queues(settings)
    if not settings.redis_url:
        raise ValueError(
            "REDIS_URL is not set: a worker needs Redis (e.g. redis://127.0.0.1:6379/0)"
        )
    unknown = sorted(set(queue_names) - set(QUEUES))
    if unknown:
        raise ValueError(f"unknown queue(s) {unknown}; echolabel's queues are {list(QUEUES)}")
    if device:
        settings = dataclasses.replace(settings, device=device)
    install(open_runtime(settings))
    connection = connect(settings.redis_url)
    worker = EcholabelWorker(
        [queue(connection, name) for name in queue_names], connection=connection
    )
    # The scheduler moves retries with a delay back to their queue (burst runs it once too).
    return worker.work(burst=burst, with_scheduler=True, logging_level="WARNING")
