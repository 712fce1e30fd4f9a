"""Progress bars on stderr for the library's progress callbacks (tqdm)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm


class JobBar:
    """A job's progress meta (stage, done, total, eta_s) as a bar, opened on the first report
    (a job may report none)."""

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


@contextmanager
def counting(unit: str, description: str) -> Iterator[Callable[[int, int], None]]:
    """A bar for `on_progress(done, total)` callbacks (echolabel.core.indexing), opened on the
    first report: work refused before it starts shows none."""
    bar: tqdm | None = None

    def show(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit=unit, desc=description)
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        yield show
    finally:
        if bar is not None:
            bar.close()


@contextmanager
def per_encoder(total: int, unit: str, description: str) -> Iterator[Callable[[str, int], None]]:
    """A bar for `on_progress(encoder, images just embedded)` callbacks (evaluation, review)."""
    with tqdm(total=total, unit=unit, desc=description) as bar:

        def show(encoder: str, count: int) -> None:
            bar.set_postfix(encoder=encoder)
            bar.update(count)

        yield show
