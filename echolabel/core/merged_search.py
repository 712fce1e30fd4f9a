"""Concurrent neighbour searches merged into one batched store query.

`/predict` runs in the app's thread pool, one request per thread. A store search has a fixed
cost per call besides the scan (the request built, the store's lock, the engine's entry, and
for a Qdrant server a round trip), and the embedded engine holds the GIL while it searches,
so concurrent searches queue anyway. Here they queue on purpose: the first caller searches at
once for whatever is waiting, and the searches that arrive meanwhile are sent together by the
next of them when it is done (a hand-off, not a timer), so a lone request waits for nothing.
Each row of a batch is the request `nearest` would send alone, so the answers are the same.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from vectorstore import Neighbour, TaskId, VectorStore

# The most searches sent in one batch: bounds the wait of the search that leads it.
DEFAULT_MAX_BATCH = 32


@dataclass
class _Search:
    project: int | str
    vector: np.ndarray
    k: int
    exclude: Sequence[TaskId]
    ready: threading.Event = field(default_factory=threading.Event)
    leads: bool = False
    finished: bool = False
    found: list[Neighbour] = field(default_factory=list)
    error: BaseException | None = None


class MergedSearches:
    """`nearest` for many threads at once, sent to the store as batches."""

    def __init__(
        self, store: Callable[[], VectorStore], max_batch: int = DEFAULT_MAX_BATCH
    ) -> None:
        self._store = store
        self.max_batch = max(1, max_batch)  # 1: every search on its own (a bench baseline)
        self._lock = threading.Lock()
        self._waiting: list[_Search] = []
        self._busy = False

    def nearest(
        self, project: int | str, vector: np.ndarray, k: int, exclude: Sequence[TaskId] = ()
    ) -> list[Neighbour]:
        """What `store.nearest(project, vector, k, exclude)` answers."""
        search = _Search(project, np.asarray(vector, dtype=np.float32).reshape(-1), k, exclude)
        with self._lock:
            self._waiting.append(search)
            if not self._busy:  # nobody searching: lead at once
                self._busy = search.leads = True
        if not search.leads:
            search.ready.wait()  # answered, or handed the lead
        if not search.finished:
            self._lead()
        if search.error is not None:
            raise search.error
        return search.found

    def _lead(self) -> None:
        """Send what waits (this search first), then hand the lead to the next one waiting."""
        with self._lock:
            batch = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
        try:
            self._send(batch)
        finally:
            with self._lock:
                if self._waiting:
                    self._waiting[0].leads = True
                    self._waiting[0].ready.set()
                else:
                    self._busy = False

    def _send(self, batch: list[_Search]) -> None:
        groups: dict[tuple[str, int], list[_Search]] = {}
        for search in batch:
            groups.setdefault((str(search.project), search.k), []).append(search)
        for group in groups.values():
            try:
                found = self._store().nearest_batch(
                    group[0].project,
                    np.stack([s.vector for s in group]),
                    group[0].k,
                    [s.exclude for s in group],
                )
                for search, neighbours in zip(group, found, strict=True):
                    search.found = neighbours
            except BaseException as exc:  # each caller raises its own search's error
                for search in group:
                    search.error = exc
            for search in group:
                search.finished = True
                search.ready.set()
