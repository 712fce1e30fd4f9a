"""What jobs run with: one per process, built once, kept across jobs.

A worker process (RQ `SimpleWorker`: no fork per job) builds its context on the first job and
keeps the loaded encoders in it. The backend installs its own context, so jobs it runs in
process share its store and encoders.

Who writes vectors is decided here, once: with a Qdrant server every process may write, so
jobs upsert themselves; an embedded store belongs to one process (a file lock), so jobs of
other processes return their vectors and the owner upserts them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from echolabel.images import ImageFetcher
from echolabel.settings import Settings
from vectorstore import VectorStore, open_store
from workers.embedding import Embedder


@dataclass
class JobContext:
    settings: Settings
    embedder: Embedder
    fetcher: ImageFetcher
    owns_store: bool = False  # True in the process that opened the embedded store
    _store: VectorStore | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobContext:
        return cls(
            settings=settings,
            embedder=Embedder.from_settings(settings),
            fetcher=ImageFetcher(settings),
        )

    @property
    def writes_store(self) -> bool:
        """Whether jobs in this process upsert themselves (else they return vectors)."""
        return bool(self.settings.qdrant_url) or self.owns_store

    @property
    def store(self) -> VectorStore:
        """The store, opened on first use (a server, or the embedded one if we may own it)."""
        with self._lock:
            if self._store is None:
                self._store = open_configured_store(self.settings)
                self.owns_store = self._store.single_writer
            return self._store


_current: JobContext | None = None
_current_lock = threading.Lock()


def current() -> JobContext:
    """This process's context, built from the environment on first use."""
    global _current
    with _current_lock:
        if _current is None:
            _current = JobContext.from_settings(Settings.from_env())
        return _current


def install(context: JobContext | None) -> None:
    """Make `context` the one jobs in this process use (the backend, tests)."""
    global _current
    with _current_lock:
        _current = context


def open_configured_store(settings: Settings) -> VectorStore:
    """The store the settings describe: the Qdrant server or the embedded one under MODEL_DIR."""
    return open_store(
        path=settings.qdrant_path,
        url=settings.qdrant_url,
        api_key=settings.qdrant_api_key,
        exact_max_points=settings.exact_search_max_points,
        shards=settings.qdrant_shards,
        replication_factor=settings.qdrant_replication_factor,
        engine="local" if settings.embedded_engine == "local" else "edge",
        preprocessing=settings.preprocessing,
    )
