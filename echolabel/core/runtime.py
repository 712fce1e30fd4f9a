"""One runtime per process: what the app, the CLI, jobs, evaluation, review and bench work with.

It holds the settings, the store (opened on first use, once), the embedder with its loaded
encoders, the image fetcher, the projects' label schemas, the merged searches of concurrent
requests (merged_search.py), and how embedding that a request had
no time for is done in the background: by workers through an `EmbedQueue` (the jobs layer's
Redis dispatcher, attached by `workers.runtime.open_runtime` when REDIS_URL is set), or else by
this process's `Backlog` thread.

Who writes the store is decided here, once (`writes_store`): with a Qdrant server every process
may; an embedded store belongs to the one process that opened it (a file lock), so jobs of
other processes return their vectors to it (workers/results.py).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Protocol

from echolabel.core.projects import ProjectRegistry
from echolabel.embedding import Embedder, EmbedReport, TaskImage
from echolabel.images import ImageError, ImageFetcher
from echolabel.settings import Settings
from vectorstore import TaskId, VectorStore, open_store

from .backlog import Backlog
from .merged_search import MergedSearches


class EmbedQueue(Protocol):
    """Embedding done by other processes (workers), as the model needs it."""

    def submit(
        self, project: int | str, encoder: str, items: Sequence[TaskImage]
    ) -> Sequence[Any] | None:
        """Hand these tasks to the workers; None when the queue is unreachable (the caller
        embeds inline instead)."""
        ...

    def wait(self, submitted: Sequence[Any], timeout_s: float) -> EmbedReport:
        """Wait up to `timeout_s` for what `submit` handed over to be stored; failures and
        what is still pending."""
        ...

    def note_deleted(self, project: int | str, annotation_id: int | str) -> None:
        """An annotation was deleted: no result still on its way may bring its labels back."""
        ...

    def stop(self) -> None:
        """Stop applying results (before the store closes)."""
        ...

    def close(self) -> None:
        """Release the queue's connection, once nothing in this process uses it."""
        ...


def open_configured_store(settings: Settings) -> VectorStore:
    """The store the settings describe: the Qdrant server or the embedded one under MODEL_DIR."""
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    return open_store(
        path=settings.qdrant_path,
        url=settings.qdrant_url,
        api_key=settings.qdrant_api_key,
        exact_max_points=settings.exact_search_max_points,
        shards=settings.qdrant_shards,
        replication_factor=settings.qdrant_replication_factor,
        engine="local" if settings.embedded_engine == "local" else "edge",
        preprocessing=settings.preprocessing,
        edge_vectors=settings.edge_vectors,
    )


class _StoreSlot:
    """The store, opened once on first use; shared by a runtime and its `inline()` view."""

    def __init__(self, settings: Settings, store: VectorStore | None) -> None:
        self.settings = settings
        self.store = store
        self.owned = store.single_writer if store is not None else False
        self.lock = threading.Lock()

    def get(self) -> VectorStore:
        with self.lock:
            if self.store is None:
                self.store = open_configured_store(self.settings)
                self.owned = self.store.single_writer
            return self.store


class Runtime:
    """This process's settings, store, embedder, fetcher and project schemas (see module doc).

    Build it with `Runtime.build` (or, with the jobs layer's queue, `open_runtime`).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        embedder: Embedder,
        fetcher: ImageFetcher,
        projects: ProjectRegistry,
        store: VectorStore | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.fetcher = fetcher
        self.projects = projects
        self._slot = _StoreSlot(settings, store)
        # Concurrent requests' neighbour searches, sent to the store together.
        self.searches = MergedSearches(lambda: self.store)
        # Background embedding: workers when a queue is attached, else the backlog thread.
        self.dispatcher: EmbedQueue | None = None
        self.backlog: Backlog | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        store: VectorStore | None = None,
        embed_queue: Callable[[Runtime], EmbedQueue] | None = None,
    ) -> Runtime:
        """The one place where a process's embedder, fetcher and schema registry are made.

        `store`: an already open store (bench: in memory), else opened on first use.
        `embed_queue`: attaches the workers' queue; without it the backlog embeds here.
        """
        runtime = cls(
            settings,
            embedder=Embedder.from_settings(settings),
            fetcher=ImageFetcher(settings),
            projects=ProjectRegistry(settings.projects_dir),
            store=store,
        )
        if embed_queue is not None:
            runtime.dispatcher = embed_queue(runtime)
        else:
            runtime.backlog = Backlog(runtime.embed_later)
        return runtime

    # -- the store and who writes it --------------------------------------------------------

    @property
    def store(self) -> VectorStore:
        """The store, opened on first use (a server, or the embedded one if we may own it)."""
        return self._slot.get()

    @property
    def store_opened(self) -> bool:
        return self._slot.store is not None

    @property
    def owns_store(self) -> bool:
        """True in the process that opened the embedded store."""
        return self._slot.owned

    @owns_store.setter
    def owns_store(self, value: bool) -> None:
        self._slot.owned = value

    @property
    def writes_store(self) -> bool:
        """Whether jobs in this process upsert themselves (else they return vectors)."""
        return bool(self.settings.qdrant_url) or self.owns_store

    # -- embedding here ---------------------------------------------------------------------

    def project_encoder(self, project: int | str) -> str:
        """The encoder of the project's live collection, else the configured one."""
        info = self.store.collection(project)
        return info.encoder if info else self.settings.encoder

    def embed_here(
        self, project: int | str, encoder: str, items: Sequence[TaskImage]
    ) -> dict[TaskId, ImageError]:
        """Embed these tasks in this process and store them; the images that failed."""
        model = self.embedder.encoder(encoder)
        result = self.embedder.embed_tasks(encoder, items, self.fetcher.load)
        if result.points:
            self.store.ensure_collection(project, encoder, model.dim, model.weights_id)
            self.store.upsert(project, encoder, result.points)
        return result.failures

    def embed_later(self, project: int | str, items: Sequence[TaskImage]) -> None:
        """What the backlog thread does with a request's leftovers."""
        self.embed_here(project, self.project_encoder(project), items)

    def inline(self) -> Runtime:
        """The same store, encoders, fetcher and schemas, embedding in the caller's thread: what
        a job uses, since it already runs where the work is meant to happen."""
        view = copy.copy(self)
        view.dispatcher = None
        view.backlog = None
        return view

    # -- shutdown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the background threads that write the store, then close it and the queue."""
        if self.backlog is not None:
            self.backlog.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self._slot.store is not None:
            self._slot.store.close()
        self.fetcher.close()
        if self.dispatcher is not None:
            self.dispatcher.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
