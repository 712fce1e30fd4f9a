"""Every job echolabel runs, named once: function, queue, id, TTLs, timeout, retries, progress.

A job is a plain function with plain arguments (workers/jobs.py) over the core's work; this
table says how it travels. Functions are named by dotted path,
as RQ stores them, so the table imports none of them. Every job has the settings' timeout
(ECHOLABEL_JOB_TIMEOUT_S); a job with `retry` retries transient failures at the settings'
intervals (ECHOLABEL_JOB_RETRY_INTERVALS), and a permanent failure cancels its retries itself
(echolabel.core.errors.PermanentJobError).

Ids are deterministic: one per project (per batch of tasks for embedding), so a job asked for
again while it is queued or running is that job, not a second one (`queues.enqueue_unique`).

`workers.runtime.run_or_enqueue` runs an entry here or enqueues it; `wait` follows a queued
one to its end.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from rq.job import Job, JobStatus
from rq.utils import import_attribute

from echolabel.embedding import TaskImage
from echolabel.settings import Settings
from workers.queues import (
    EMBED,
    EVALUATE,
    PREANNOTATE,
    REEMBED,
    enqueue_unique,
    queue,
    retry_policy,
)

HOUR_S = 3600
WEEK_S = 7 * 24 * HOUR_S

# A queued job has ended in one of these (a failure that will be retried is "scheduled").
ENDED = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)

Describe = Callable[[Mapping[str, Any]], str]


@dataclass(frozen=True)
class JobSpec:
    """How one job travels.

    `progress_unit`: the job takes `on_progress` and writes `job.meta["progress"]` (stage,
    done, total, eta_s) counting this unit; None: it reports only its result.
    """

    name: str
    function: str
    queue: str
    id_format: str
    describe: Describe
    progress_unit: str | None = None
    result_ttl: int = WEEK_S
    failure_ttl: int = WEEK_S
    retry: bool = True

    def job_id(self, **fields: Any) -> str:
        return self.id_format.format(**fields)

    def resolve(self) -> Callable[..., Any]:
        """The job function itself (imported on first use)."""
        return import_attribute(self.function)

    def enqueue(
        self,
        connection: Redis,
        settings: Settings,
        job_id: str,
        description: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Job:
        """Enqueue under `job_id`, or answer that job if it is already queued or running."""
        return enqueue_unique(
            queue(connection, self.queue),
            job_id,
            self.function,
            args=tuple(args),
            kwargs=dict(kwargs or {}),
            retry=retry_policy(settings) if self.retry else None,
            job_timeout=settings.job_timeout_s,
            result_ttl=self.result_ttl,
            failure_ttl=self.failure_ttl,
            description=description,
        )


def _project(what: str) -> Describe:
    return lambda a: f"{what} project {a['project']}"


CATALOGUE: dict[str, JobSpec] = {
    spec.name: spec
    for spec in (
        # One batch of tasks for the encoder; its id hashes the batch (see enqueue_embed).
        # Results carry vectors: kept an hour, long enough for the store's owner to apply.
        JobSpec(
            "embed",
            "workers.jobs.embed_batch",
            EMBED,
            "embed-{project}-{key}",
            lambda a: (
                f"embed {len(a['tasks'])} task(s) of project {a['project']} with {a['encoder']}"
            ),
            result_ttl=HOUR_S,
        ),
        JobSpec(
            "reembed",
            "workers.jobs.reembed",
            REEMBED,
            "reembed-{project}",
            lambda a: f"re-embed project {a['project']} with {a['encoder']}",
            progress_unit="img",
        ),
        JobSpec(
            "train-encoder",
            "workers.jobs.train_encoder",
            REEMBED,
            "train-encoder-{project}",
            lambda a: (
                f"train encoder on project {a['project']}"
                + (" and re-embed" if a.get("reembed_after") else "")
            ),
            progress_unit="step",
        ),
        JobSpec(
            "centre-encoder",
            "workers.jobs.centre_encoder",
            REEMBED,
            "centre-encoder-{project}",
            lambda a: (
                f"centre the encoder of project {a['project']} on its images"
                + (" and re-embed" if a.get("reembed_after") else "")
            ),
            progress_unit="img",
        ),
        # One round of the self-improving loop; a promotion re-embeds in the same job, so it
        # runs where re-embedding does.
        JobSpec(
            "retrain",
            "workers.jobs.retrain_round",
            REEMBED,
            "retrain-{project}",
            _project("retraining round of"),
            progress_unit="step",
        ),
        JobSpec(
            "rollback-encoder",
            "workers.jobs.rollback_encoder",
            REEMBED,
            "rollback-encoder-{project}",
            lambda a: (
                f"go back to {a.get('encoder') or 'the previous encoder'} on project {a['project']}"
            ),
        ),
        # Builds the embedded store's graph in the process that holds the store.
        JobSpec(
            "build-index",
            "workers.jobs.build_vote_index",
            REEMBED,
            "build-index-{project}",
            _project("build the vote index of"),
        ),
        JobSpec(
            "evaluate",
            "workers.jobs.evaluate_project",
            EVALUATE,
            "evaluate-{project}",
            _project("evaluate"),
        ),
        # Label QA and near-duplicates read the store like the evaluation: the same queue.
        JobSpec(
            "review",
            "workers.jobs.review_project",
            EVALUATE,
            "review-{project}",
            _project("label QA of"),
        ),
        JobSpec(
            "duplicates",
            "workers.jobs.find_project_duplicates",
            EVALUATE,
            "duplicates-{project}",
            _project("near-duplicates of"),
        ),
        JobSpec(
            "preannotate",
            "workers.jobs.preannotate_project",
            PREANNOTATE,
            "preannotate-{project}",
            _project("pre-annotate"),
            progress_unit="task",
        ),
        JobSpec(
            "refresh",
            "workers.jobs.refresh_project",
            PREANNOTATE,
            "refresh-{project}",
            _project("refresh predictions of"),
            progress_unit="task",
        ),
        JobSpec(
            "diverse-first",
            "workers.jobs.diverse_first_project",
            PREANNOTATE,
            "diverse-first-{project}",
            lambda a: (
                f"diverse-first order of project {a['project']}"
                + (" (clear)" if a.get("clear") else "")
            ),
            progress_unit="task",
        ),
    )
}


def job_spec(name: str) -> JobSpec:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise ValueError(f"no job {name!r}; echolabel's jobs are {sorted(CATALOGUE)}") from None


# -- embedding batches --------------------------------------------------------------------------


def task_payload(item: TaskImage) -> dict[str, Any]:
    """A TaskImage as a job argument (plain JSON-able values)."""
    return {
        "task": item.task,
        "image": item.image,
        "labels": dict(item.labels),
        "annotation_id": item.annotation.id,
        "annotation_updated_at": item.annotation.updated_at,
    }


def enqueue_embed(
    connection: Redis,
    settings: Settings,
    project: int | str,
    encoder: str,
    items: Sequence[TaskImage],
    reply_to: str,
) -> list[Job]:
    """One `embed` job per batch, answering to the store's result list `reply_to`; a batch
    already queued or running is not queued twice (its id is derived from the store, project,
    encoder, task ids and annotations)."""
    spec = CATALOGUE["embed"]
    jobs = []
    for start in range(0, len(items), settings.batch_size):
        batch = items[start : start + settings.batch_size]
        # The annotation is part of the key: a newer annotation of a task still queued gets a
        # job of its own (the store keeps the newest labels whichever job lands last).
        key = hashlib.sha1(
            repr(
                (
                    reply_to,
                    project,
                    encoder,
                    sorted((str(i.task), str(i.annotation)) for i in batch),
                )
            ).encode()
        ).hexdigest()[:16]
        tasks = [task_payload(i) for i in batch]
        jobs.append(
            spec.enqueue(
                connection,
                settings,
                spec.job_id(project=project, key=key),
                spec.describe({"project": project, "encoder": encoder, "tasks": tasks}),
                # Positional: the dispatcher reads a job's tasks back from its arguments.
                args=(project, encoder, tasks, reply_to),
            )
        )
    return jobs


# -- following a queued job ---------------------------------------------------------------------


class JobFailedError(RuntimeError):
    """A queued job ended otherwise than finished; the message says how and why."""


def wait(
    job: Job,
    on_update: Callable[[Mapping[str, Any], str], None] | None = None,
    poll_s: float = 1.0,
) -> Any:
    """Follow `job` until it ends; its return value, or JobFailedError when it failed, was
    stopped or cancelled. `on_update` sees its progress meta and status at every poll."""
    while True:
        status = job.get_status(refresh=True)
        if on_update is not None:
            on_update(job.get_meta(refresh=True).get("progress", {}), JobStatus(status).value)
        if status in ENDED:
            break
        time.sleep(poll_s)
    if status != JobStatus.FINISHED:
        result = job.latest_result()
        reason = (result.exc_string if result else "") or ""
        raise JobFailedError(f"{job.description} {JobStatus(status).value}: {reason}")
    return job.return_value()
