"""`echolabel jobs`, and how every command runs a catalogue job: here without REDIS_URL, else on
the workers, with a progress bar either way (Ctrl-C while following a queued job detaches; the
job goes on)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from echolabel.settings import Settings

from .progress import JobBar


def add_commands(sub: Any) -> None:
    jobs = sub.add_parser(
        "jobs", help="queued, running and failed jobs with progress; retraining rounds"
    )
    jobs.add_argument("--json", action="store_true")
    jobs.add_argument(
        "--rounds", action="store_true", help="with --json: the retraining rounds' records"
    )
    jobs.set_defaults(run=_jobs)


def run_job(settings: Settings, job: str, /, *, no_wait: bool = False, **arguments: Any) -> Any:
    """Run catalogue job `job` here (no REDIS_URL: the embedded store must not be held by a
    running server) or queue it and follow it to its end; its result (None with `no_wait`).
    A `project` is taken as --project gives it (an id or a name). A queued job that fails
    raises workers.catalogue.JobFailedError."""
    from echolabel.core.projects import project_id
    from workers.catalogue import job_spec, wait
    from workers.runtime import open_runtime, run_or_enqueue

    if "project" in arguments:
        arguments["project"] = project_id(arguments["project"])
    spec = job_spec(job)
    bar = JobBar(spec.progress_unit or "it", spec.describe(arguments))
    follow = bar if spec.progress_unit else None
    with open_runtime(settings) as runtime:
        try:
            launched = run_or_enqueue(runtime, job, on_progress=follow, **arguments)
            if launched.job is None:
                return launched.result
            print(f"job {launched.id} on queue {launched.queue}", file=sys.stderr)
            if no_wait:
                return None
            return wait(launched.job, follow)
        finally:
            bar.close()


def print_job(settings: Settings, job: str, /, *, no_wait: bool, **arguments: Any) -> int:
    """Run a catalogue job (`run_job`) and print its result as JSON."""
    result = run_job(settings, job, no_wait=no_wait, **arguments)
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _jobs(args: argparse.Namespace, settings: Settings) -> int:
    from workers.queues import connect, list_rq_jobs
    from workers.training.selection import SelectionLog

    rounds = SelectionLog(settings.selection_dir).all_projects()
    listed = (
        list_rq_jobs(connect(settings.redis_url)) if settings.redis_url and not args.rounds else []
    )
    if args.json:
        print(json.dumps({"retraining": rounds} if args.rounds else listed, indent=2))
        return 0 if settings.redis_url or args.rounds else 1
    if not settings.redis_url:
        print("REDIS_URL is not set: jobs run in the backend; see GET /jobs", file=sys.stderr)
    for job in listed:
        progress = job["progress"]
        done = f"{progress.get('done', '')}/{progress.get('total', '')}" if progress else ""
        print(
            f"{job['status']:9} {job['queue']:9} {job['id']:40} {done:12} "
            f"{job['error'] or job['description'] or ''}"
        )
    for project, state in rounds.items():
        live = state["live"]["encoder"] if state["live"] else "the first encoder"
        print(f"\nproject {project}: live encoder {live}; retraining rounds:")
        for c in state["candidates"]:
            print(
                f"  {c['started_at']}  {c['labelled']:>6} labelled  {c['decision']:11} "
                f"{c['challenger'] or '':28} {c['reason']}"
            )
    return 0 if settings.redis_url else 1
