"""The runtime with its jobs-layer parts: opened once per process, installed for its jobs, and
the one way to run a catalogue job here or on the queues.

`open_runtime` is what the app, the CLI and the worker call: the core's `Runtime` plus, when
REDIS_URL is set, the Redis `EmbedDispatcher` (workers embed; this process's link to the job
queues). A worker process (RQ `SimpleWorker`: no fork per job) installs its runtime once and
keeps the loaded encoders in it across jobs; the backend installs its own, so jobs it runs in
process share its store and encoders.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rq.job import Job

from echolabel.core.indexing import index_tasks
from echolabel.core.runtime import Runtime
from echolabel.embedding import TaskImage
from echolabel.settings import Settings
from vectorstore import VectorStore
from workers.catalogue import JobSpec, job_spec
from workers.dispatch import EmbedDispatcher

Progress = Callable[[Mapping[str, Any]], None]  # a job's progress meta (stage, done, total, ...)


def open_runtime(settings: Settings, *, store: VectorStore | None = None) -> Runtime:
    """This process's runtime: with REDIS_URL the workers embed (the dispatcher), without it
    the backlog thread embeds what a request had no time for. `store`: an open one (bench)."""
    if not settings.redis_url:
        return Runtime.build(settings, store=store)
    return Runtime.build(
        settings,
        store=store,
        embed_queue=lambda runtime: EmbedDispatcher(settings, lambda: runtime.store),
    )


def redis_dispatcher(runtime: Runtime) -> EmbedDispatcher | None:
    """The Redis side of a runtime opened with REDIS_URL (the core knows it as an EmbedQueue):
    its connection and gate are the ones jobs are enqueued with."""
    dispatcher = runtime.dispatcher
    return dispatcher if isinstance(dispatcher, EmbedDispatcher) else None


# -- the process's runtime, for jobs ------------------------------------------------------------

_current: Runtime | None = None
_current_lock = threading.Lock()


def current() -> Runtime:
    """This process's runtime, opened from the environment on first use."""
    global _current
    with _current_lock:
        if _current is None:
            _current = open_runtime(Settings.from_env())
        return _current


def install(runtime: Runtime | None) -> None:
    """Make `runtime` the one jobs in this process use (the app, the worker, tests)."""
    global _current
    with _current_lock:
        _current = runtime


@contextmanager
def installed(runtime: Runtime) -> Iterator[Runtime]:
    """`runtime` installed for the block; the one installed before is back afterwards. Already
    installed (the backend's jobs): left as it is, so a job ending never uninstalls it."""
    with _current_lock:
        previous = _current
    if previous is runtime:
        yield runtime
        return
    install(runtime)
    try:
        yield runtime
    finally:
        install(previous)


# -- run here or enqueue ------------------------------------------------------------------------


@dataclass
class Launched:
    """A catalogue job asked for: queued on RQ (`job`), or run in this process."""

    spec: JobSpec
    id: str
    description: str
    job: Job | None = None
    result: Any = None  # run here to its end (None while a thread runs it)
    arguments: Mapping[str, Any] = field(default_factory=dict)  # the job function's

    @property
    def queue(self) -> str:
        return self.spec.queue if self.job is not None else "in-process"


RunHere = Callable[[Progress | None], Any]


def embed_or_enqueue(
    runtime: Runtime,
    project: int,
    items: Sequence[TaskImage],
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Embed a project's task images ahead of its predictions (`echolabel index --project`):
    queued for the workers when REDIS_URL is set (the process holding the store stores the
    vectors, with the configured encoder), else here, skipping tasks that hold a vector.
    The jobs queued, or what `index_tasks` did."""
    dispatcher = redis_dispatcher(runtime)
    if dispatcher is not None:
        return {"jobs": len(dispatcher.enqueue(project, runtime.settings.encoder, items))}
    return index_tasks(runtime, project, items, on_progress)


def run_or_enqueue(
    runtime: Runtime,
    job: str,
    /,
    *,
    on_progress: Progress | None = None,
    in_thread: Callable[[Launched, RunHere], None] | None = None,
    redis_down_runs_here: bool = False,
    **arguments: Any,
) -> Launched:
    """Run catalogue job `job` with `arguments`: on the RQ queues when REDIS_URL is set (a job
    with the same id still queued or running is answered instead of a second one), else here.

    Here, it runs on `runtime` with progress to `on_progress` (or, given `in_thread`, is handed
    to it to start: the backend's admin runs jobs in threads). `redis_down_runs_here`: an
    unreachable Redis runs the job here instead of raising (the backend keeps working).
    """
    spec = job_spec(job)
    launched = Launched(
        spec, spec.job_id(**arguments), spec.describe(arguments), arguments=dict(arguments)
    )
    dispatcher = redis_dispatcher(runtime)
    if dispatcher is not None:

        def enqueue() -> Job:
            return spec.enqueue(
                dispatcher.connection,
                runtime.settings,
                launched.id,
                launched.description,
                kwargs=arguments,
            )

        if not redis_down_runs_here:
            launched.job = enqueue()
            return launched
        ok, queued = dispatcher.gate.call(enqueue)
        if ok and queued is not None:
            launched.job = queued
            return launched

    def run(progress: Progress | None) -> Any:
        return run_here(runtime, spec, arguments, progress)

    if in_thread is not None:
        in_thread(launched, run)
    else:
        launched.result = run(on_progress)
    return launched


def run_here(
    runtime: Runtime,
    spec: JobSpec,
    arguments: Mapping[str, Any],
    on_progress: Progress | None = None,
) -> Any:
    """The job function on `runtime` in this thread; its progress meta to `on_progress` (the
    dict a queued job writes to `job.meta["progress"]`)."""
    options: dict[str, Any] = {}
    if on_progress is not None and spec.progress_unit is not None:
        options["on_progress"] = lambda progress: on_progress(progress.as_meta())
    with installed(runtime):
        return spec.resolve()(**arguments, **options)
