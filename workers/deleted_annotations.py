"""Annotations deleted in Label Studio, remembered so that no later write brings them back.

An embed job queued for an annotation carries its labels. When the annotation is deleted while
the job waits, clearing the store finds no point, and the job's result would then write the
deleted labels back. So every delete is remembered (one empty file per annotation under
MODEL_DIR/deleted-annotations/<project>/, written before the webhook counts as handled) and
results are stored without the labels of a deleted annotation, in whatever order they land.

Label Studio never reuses an annotation id, so remembering one for long is harmless; entries
older than `keep_s` (30 days: far beyond any job's retries) are forgotten at start.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from urllib.parse import quote, unquote

KEEP_S = 30 * 24 * 3600


class DeletedAnnotations:
    def __init__(self, directory: Path, keep_s: float = KEEP_S) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._ids: dict[str, set[str]] = {}
        cutoff = time.time() - keep_s
        for folder in directory.glob("*") if directory.exists() else ():
            ids = self._ids.setdefault(unquote(folder.name), set())
            for entry in folder.iterdir():
                if entry.stat().st_mtime < cutoff:
                    entry.unlink(missing_ok=True)
                else:
                    ids.add(unquote(entry.name))

    def add(self, project: int | str, annotation_id: int | str) -> None:
        """Remember a deleted annotation (durably, before returning)."""
        folder = self.directory / _name(project)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _name(annotation_id)).touch()
        with self._lock:
            self._ids.setdefault(str(project), set()).add(str(annotation_id))

    def contains(self, project: int | str, annotation_id: int | str | None) -> bool:
        if annotation_id is None:
            return False
        with self._lock:
            return str(annotation_id) in self._ids.get(str(project), ())


def _name(value: int | str) -> str:
    return quote(str(value), safe="")
