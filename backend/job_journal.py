"""The jobs the backend runs in its own threads, written down while they run, resumed at start.

With Redis, a job whose worker died is found abandoned in RQ's registry and retried. A job the
backend runs in a thread (no Redis, or Redis unreachable) dies with the process: a
re-embedding would stay half built (never live, never finished) and a push half written until
someone started them again. So each such job is recorded under `MODEL_DIR/jobs/` when it
starts and forgotten when it ends (finished or failed), and the next start of the backend runs
what is still recorded again. The jobs resume where they stopped: a re-embedding skips the
batches it wrote, a push the predictions Label Studio already holds.

A job interrupted as many times as RQ would try it (1 + ECHOLABEL_JOB_RETRY_INTERVALS) is given
up with a warning, so a job that kills its process cannot do so at every start.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote


@dataclass(frozen=True)
class Interrupted:
    """A recorded job that did not end: its catalogue name, arguments and launches so far."""

    id: str
    job: str
    arguments: dict[str, Any]
    attempts: int


class JobJournal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def started(
        self, job_id: str, job: str, arguments: Mapping[str, Any], attempts: int = 1
    ) -> None:
        """Record a job launched in this process (atomically: a kill leaves it whole or
        absent). `arguments` are the job function's plain values."""
        self.directory.mkdir(parents=True, exist_ok=True)
        entry = {"id": job_id, "job": job, "arguments": dict(arguments), "attempts": attempts}
        tmp = self.directory / f".{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, self._path(job_id))

    def ended(self, job_id: str) -> None:
        """Forget a job that finished or failed (a failure is reported, not resumed)."""
        self._path(job_id).unlink(missing_ok=True)

    def interrupted(self) -> list[Interrupted]:
        """The jobs recorded and never ended, oldest first."""
        if not self.directory.is_dir():
            return []
        for stale in self.directory.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        entries = sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        out = []
        for path in entries:
            entry = json.loads(path.read_text())
            out.append(
                Interrupted(
                    entry["id"], entry["job"], dict(entry["arguments"]), int(entry["attempts"])
                )
            )
        return out

    def _path(self, job_id: str) -> Path:
        return self.directory / f"{quote(job_id, safe='')}.json"
