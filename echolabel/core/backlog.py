"""Tasks a /predict had no time to embed (embedded deployment): embedded after the reply.

Label Studio waits 100 s for one "Retrieve Predictions" call holding every selected task. Inline
embedding stops at ECHOLABEL_EMBED_WAIT_S; the rest is answered `[]` (Label Studio stores
nothing and asks again on the next click) and embedded here, one thread, in arrival order.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

from echolabel.embedding import TaskImage
from vectorstore import TaskId

log = logging.getLogger(__name__)

EmbedFunction = Callable[[int | str, Sequence[TaskImage]], object]


class Backlog:
    def __init__(self, embed: EmbedFunction) -> None:
        self._embed = embed
        self._queue: queue.Queue[tuple[int | str, list[TaskImage]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def submit(self, project: int | str, items: Sequence[TaskImage]) -> None:
        self._queue.put((project, list(items)))
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="backlog", daemon=True)
                self._thread.start()

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until everything submitted was embedded (tests, graceful shutdown)."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the batch being embedded; the rest is dropped (Label Studio asks again
        for tasks it got no prediction for)."""
        self._stopping.set()
        self._queue.put(None)  # wakes the thread
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None or self._stopping.is_set():
                self._queue.task_done()
                if entry is None:
                    return
                continue
            project, items = entry
            try:
                self._embed(project, items)
            except Exception as exc:  # the next click asks again; log, keep going
                tasks: list[TaskId] = [i.task for i in items]
                log.warning(
                    "background embedding failed",
                    extra={"project": project, "tasks": len(tasks), "error": str(exc)},
                )
            finally:
                self._queue.task_done()
