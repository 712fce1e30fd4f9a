"""The label schema of every project we were set up for, kept on disk under MODEL_DIR.

Webhooks may arrive without the label config; the schema remembered from `/setup` or
`/predict` tells which choices fields to read from an annotation and where its image is.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from echolabel.label_config import LabelConfigError, LabelSchema, parse_label_config


def project_id(raw: object) -> int | str:
    """Label Studio sends `"12.1700000000"` (id.epoch) in /setup; tasks carry plain 12."""
    if isinstance(raw, dict):
        raw = raw.get("id")
    if isinstance(raw, bool) or raw is None:
        raise LabelConfigError("the request names no project")
    if isinstance(raw, int):
        return raw
    text = str(raw).strip()
    head = text.split(".", 1)[0]
    if head.isdigit():
        return int(head)
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        return text
    raise LabelConfigError(f"project id {text!r} is neither a number nor a short name")


class ProjectRegistry:
    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._schemas: dict[str, LabelSchema] = {}
        # The config text each schema was parsed from: Label Studio sends the same config
        # with every /predict, and parsing it is ~4 % of a prediction (docs/performance.md §2).
        self._parsed_from: dict[str, str] = {}
        self._lock = threading.Lock()

    def remember(self, project: int | str, label_config: str) -> LabelSchema:
        """Parse and keep the project's config (LabelConfigError if it cannot be served)."""
        key = str(project)
        with self._lock:
            if self._parsed_from.get(key) == label_config and key in self._schemas:
                return self._schemas[key]
        schema = self.save(project, parse_label_config(label_config))
        with self._lock:
            self._parsed_from[key] = label_config
        return schema

    def save(self, project: int | str, schema: LabelSchema) -> LabelSchema:
        """Keep a schema built without a Label Studio config (e.g. a CLI-indexed folder)."""
        with self._lock:
            if self._schemas.get(str(project)) != schema:
                self._dir.mkdir(parents=True, exist_ok=True)
                path = self._path(project)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(schema.to_json())
                os.replace(tmp, path)  # atomic: a crash never leaves half a schema
                self._schemas[str(project)] = schema
                self._parsed_from.pop(str(project), None)
        return schema

    def schema(self, project: int | str, label_config: str | None = None) -> LabelSchema:
        """The project's schema from this config if given, else the one remembered."""
        if label_config:
            return self.remember(project, label_config)
        with self._lock:
            cached = self._schemas.get(str(project))
            if cached is not None:
                return cached
            path = self._path(project)
            if not path.exists():
                raise LabelConfigError(
                    f"project {project} has no label config yet: connect the backend in Label "
                    "Studio (it calls /setup) or send `label_config` with the request"
                )
            schema = self._schemas[str(project)] = LabelSchema.from_json(path.read_text())
            return schema

    def known(self) -> list[int | str]:
        """Every project a schema was remembered for."""
        if not self._dir.exists():
            return []
        return [project_id(path.stem) for path in sorted(self._dir.glob("*.json"))]

    def _path(self, project: int | str) -> Path:
        return self._dir / f"{project}.json"
