"""The CLI's way to run a catalogue job: here without REDIS_URL, else on the workers, with a
progress bar either way (Ctrl-C while following a queued job detaches; the job goes on)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from tqdm import tqdm

from echolabel.settings import Settings


class _Bar:
    """A tqdm bar, opened on the first progress report (a job may report none)."""

    def __init__(self, unit: str, description: str) -> None:
        self.unit, self.description = unit, description
        self._bar: tqdm | None = None

    def __call__(self, progress: Mapping[str, Any], status: str | None = None) -> None:
        if self._bar is None:
            self._bar = tqdm(unit=self.unit, desc=self.description)
        bar = self._bar
        bar.total = progress.get("total") or bar.total
        bar.n = progress.get("done", 0)
        bar.set_postfix(stage=progress.get("stage", status), eta=progress.get("eta_s"))
        bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_job(settings: Settings, job: str, /, *, no_wait: bool = False, **arguments: Any) -> Any:
    """Run catalogue job `job` here (no REDIS_URL: the embedded store must not be held by a
    running server) or queue it and follow it to its end; its result (None with `no_wait`).
    A queued job that fails raises workers.catalogue.JobFailedError."""
    from workers.catalogue import job_spec, wait
    from workers.runtime import open_runtime, run_or_enqueue

    spec = job_spec(job)
    bar = _Bar(spec.progress_unit or "it", spec.describe(arguments))
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
