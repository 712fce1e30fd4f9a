"""A durable inbox for Label Studio webhooks: answer at once, do the work after, lose nothing.

Label Studio waits 1 s for a webhook and never retries. Each payload is written to disk before
we answer, then handled by one background thread in arrival order; a crash or restart replays
what is left. A payload that cannot be handled is moved to `failed/` next to its reason; one
that failed for a transient reason (the Qdrant server is down) stays first in line and is
retried with backoff, so later annotations never overtake it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[Mapping[str, Any]], object]


class WebhookInbox:
    def __init__(
        self,
        directory: Path,
        handle: Handler,
        *,
        transient: tuple[type[BaseException], ...] = (),
        retry_after_s: Sequence[float] = (5, 30, 120),
    ) -> None:
        self.directory = directory
        self.failed_dir = directory / "failed"
        self._handle = handle
        self._transient = transient
        self._retry_after_s = tuple(retry_after_s) or (5,)
        self.blocked_by: str | None = None  # the transient error the inbox is waiting out
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.directory.mkdir(parents=True, exist_ok=True)

    def put(self, payload: Mapping[str, Any]) -> str:
        """Persist one payload (atomically) and wake the handler thread; returns its id."""
        # Time-ordered names keep arrival order across restarts.
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self.directory / f".{name}.tmp"
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, self.directory / f"{name}.json")
        self._wake.set()
        return name

    def pending(self) -> list[Path]:
        return sorted(self.directory.glob("*.json"))

    def failed(self) -> list[Path]:
        return sorted(self.failed_dir.glob("*.json")) if self.failed_dir.exists() else []

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="webhook-inbox", daemon=True)
            self._thread.start()
            self._wake.set()  # replay whatever a previous run left

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every pending payload was handled (for tests and graceful shutdown)."""
        deadline = time.monotonic() + timeout
        while self.pending():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)  # a poll, not a spin: the handler thread needs the GIL
        return True

    def _run(self) -> None:
        attempts = 0
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            for path in self.pending():
                if self._stop.is_set():
                    return
                if not self.process(path):
                    delay = self._retry_after_s[min(attempts, len(self._retry_after_s) - 1)]
                    attempts += 1
                    self._stop.wait(delay)
                    self._wake.set()
                    break
                attempts = 0

    def process(self, path: Path) -> bool:
        """Handle one stored payload; False when it must be retried later (transient error).

        On any other failure the payload is kept in failed/ with the reason.
        """
        try:
            payload = json.loads(path.read_text())
            self._handle(payload)
        except self._transient as exc:
            self.blocked_by = f"{type(exc).__name__}: {exc}"
            log.warning("webhook deferred", extra={"file": path.name, "error": self.blocked_by})
            return False
        except Exception as exc:  # one bad webhook must not stop the others
            log.warning(
                "webhook failed", extra={"file": path.name, "error": f"{type(exc).__name__}: {exc}"}
            )
            self.failed_dir.mkdir(exist_ok=True)
            (self.failed_dir / f"{path.stem}.error.txt").write_text(f"{type(exc).__name__}: {exc}")
            os.replace(path, self.failed_dir / path.name)
        else:
            path.unlink(missing_ok=True)
        self.blocked_by = None
        return True
