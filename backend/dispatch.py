"""Embedding through the RQ queue when REDIS_URL is set: submit batches, wait a bounded time,
and (embedded store) upsert what the workers return.

The backend never loads an encoder in this mode. When Redis is unreachable, `submit` answers
None and the caller embeds inline (RedisGate warns once a minute).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from redis import Redis
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry

from echolabel.images import ImageError
from echolabel.settings import Settings
from vectorstore import VectorStore
from workers.embedding import EmbedReport, TaskImage
from workers.jobs import enqueue_embed, points_of
from workers.queues import EMBED, RedisGate, connect, fetch_job, queue

log = logging.getLogger(__name__)

APPLIED = "applied"  # job meta flag: this result's points are in the store


class EmbedDispatcher:
    def __init__(self, settings: Settings, store: VectorStore) -> None:
        assert settings.redis_url
        self.settings = settings
        self.store = store
        self.connection: Redis = connect(settings.redis_url)
        self.queue = queue(self.connection, EMBED)
        self.gate = RedisGate()
        self._apply_lock = threading.Lock()
        self._stop = threading.Event()
        self._collector: threading.Thread | None = None

    # -- submit and wait ----------------------------------------------------------------------

    def submit(
        self, project: int | str, encoder: str, items: Sequence[TaskImage]
    ) -> list[Job] | None:
        """One job per batch; a batch already queued or running is not queued twice."""
        ok, jobs = self.gate.call(lambda: self._enqueue(project, encoder, items))
        return jobs if ok else None

    def _enqueue(self, project: int | str, encoder: str, items: Sequence[TaskImage]) -> list[Job]:
        return enqueue_embed(self.connection, self.settings, project, encoder, items)

    def wait(self, jobs: Sequence[Job], timeout_s: float) -> EmbedReport:
        """Wait up to `timeout_s` for the jobs; apply results; report failures and pending."""
        deadline = time.monotonic() + timeout_s
        outcome = EmbedReport()
        remaining = list(jobs)
        while remaining:
            still = []
            for job in remaining:
                status = job.get_status(refresh=True)
                if status == JobStatus.FINISHED:
                    summary = self.apply(job)
                    by_key = {str(t["task"]): t["task"] for t in job.args[2]}
                    outcome.failures.update(
                        {
                            by_key[k]: ImageError(f["reason"], f["detail"])
                            for k, f in summary.get("failed", {}).items()
                        }
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
                time.sleep(0.1)
            elif remaining:
                break
        for job in remaining:
            outcome.pending.update(t["task"] for t in job.args[2])
        return outcome

    # -- results of the embedded store's workers ------------------------------------------

    def apply(self, job: Job) -> dict:
        """Upsert a finished job's returned points (once); returns its summary."""
        summary = job.return_value() or {}
        if "points" not in summary:
            return summary  # the worker stored them itself (Qdrant server)
        with self._apply_lock:
            job.refresh()
            if not job.meta.get(APPLIED):
                info = self.store.ensure_collection(
                    summary["project"], summary["encoder"], summary["dim"], summary["weights_id"]
                )
                self.store.upsert(info.project, summary["encoder"], points_of(summary))
                job.meta[APPLIED] = True
                job.save_meta()
        return summary

    def collect_once(self) -> int:
        """Apply every finished, not yet applied embed job (pre-embedding, CLI, late ones)."""
        registry = FinishedJobRegistry(EMBED, connection=self.connection)
        applied = 0
        for job_id in registry.get_job_ids():
            job = fetch_job(self.connection, job_id)
            if job is None or job.meta.get(APPLIED):
                continue
            try:
                self.apply(job)
                applied += 1
            except Exception as exc:  # one bad result must not stop the others
                log.warning("could not apply job result", extra={"job": job_id, "error": str(exc)})
        return applied

    def start_collector(self, every_s: float = 1.0) -> None:
        """Apply finished jobs in the background (only needed for the embedded store)."""
        if not self.store.single_writer or self._collector is not None:
            return

        def loop() -> None:
            while not self._stop.wait(every_s):
                self.gate.call(self.collect_once)

        self._collector = threading.Thread(target=loop, name="embed-collector", daemon=True)
        self._collector.start()

    def stop(self) -> None:
        self._stop.set()
        if self._collector is not None:
            self._collector.join(timeout=5)
        self.connection.close()


def _failure_reason(job: Job) -> str:
    text = job.latest_result().exc_string if job.latest_result() else ""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"job {job.id} {job.get_status()}"
