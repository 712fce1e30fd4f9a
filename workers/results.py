"""Embedding results on their way from a worker to the process that holds the store.

A worker that may not write the store (the embedded store belongs to one process) pushes each
job's points onto a Redis list that names the store, as the job's last act; the store's owner
takes them off one at a time, upserts them and only then forgets them. So:

- nothing depends on RQ's job records: a result is applied because it is in the list, not
  because a flag on a job says so (RQ keeps a job's meta when the same id is enqueued again,
  so a flag on a reused job id claimed "applied" for a run that was never applied);
- the owner blocks on the list (one Redis round trip a second when idle) instead of polling
  every finished job;
- a message moves to a `processing` list while it is applied (Redis LMOVE), so a backend that
  dies mid-apply applies it again at start; applying twice is harmless (deterministic point
  ids, newest-annotation-wins labels).

With a Qdrant server the workers upsert themselves and push a notice without vectors, so the
backend can still enforce annotations deleted while the job was queued.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis

from vectorstore import Annotation, Point, TaskId

_PREFIX = "echolabel:embedded"


def store_key(model_dir: Path) -> str:
    """The list that carries results to the store under `model_dir`.

    Named by an id kept in MODEL_DIR (made on first use), so two stores sharing one Redis never
    take each other's results, and a fresh MODEL_DIR is a fresh destination.
    """
    path = model_dir / "store-id"
    if not path.exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = model_dir / f".store-id.{uuid.uuid4().hex}"
        tmp.write_text(uuid.uuid4().hex)
        try:
            os.link(tmp, path)  # atomic, and never replaces an id another process made
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return f"{_PREFIX}:{path.read_text().strip()}"


@dataclass
class EmbedMessage:
    """One finished embed job, as its worker reports it to the store's owner."""

    job: str
    project: int | str
    encoder: str
    dim: int
    weights_id: str
    points: list[Point] = field(default_factory=list)
    # Tasks the worker stored itself (Qdrant server), with their annotation ids.
    stored: dict[TaskId, int | str | None] = field(default_factory=dict)
    failed: dict[str, dict[str, str]] = field(default_factory=dict)
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex)

    def encode(self) -> bytes:
        return json.dumps(
            {
                "job": self.job,
                "project": self.project,
                "encoder": self.encoder,
                "dim": self.dim,
                "weights_id": self.weights_id,
                "points": [_encode_point(p) for p in self.points],
                "stored": [[task, annotation] for task, annotation in self.stored.items()],
                "failed": self.failed,
                "nonce": self.nonce,
            }
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> EmbedMessage:
        data = json.loads(raw)
        return cls(
            job=data["job"],
            project=data["project"],
            encoder=data["encoder"],
            dim=int(data["dim"]),
            weights_id=data["weights_id"],
            points=[_decode_point(p) for p in data["points"]],
            stored={task: annotation for task, annotation in data["stored"]},
            failed=data["failed"],
            nonce=data["nonce"],
        )

    def tasks(self) -> list[TaskId]:
        return [p.task for p in self.points] + list(self.stored)


class ResultList:
    """The Redis list of one store's results, and the list of those being applied."""

    def __init__(self, connection: Redis, key: str) -> None:
        self.connection = connection
        self.key = key
        self.processing_key = f"{key}:processing"

    def push(self, message: EmbedMessage) -> None:
        self.connection.rpush(self.key, message.encode())

    def take(self, timeout_s: float) -> bytes | None:
        """The oldest waiting message, moved to `processing`; None after `timeout_s`."""
        raw = self.connection.blmove(self.key, self.processing_key, timeout_s, "LEFT", "RIGHT")
        return bytes(raw) if raw is not None else None

    def take_now(self) -> bytes | None:
        raw = self.connection.lmove(self.key, self.processing_key, "LEFT", "RIGHT")
        return bytes(raw) if raw is not None else None

    def in_processing(self) -> list[bytes]:
        return [bytes(raw) for raw in self.connection.lrange(self.processing_key, 0, -1)]

    def still_processing(self, raw: bytes) -> bool:
        return self.connection.lpos(self.processing_key, raw) is not None

    def done(self, raw: bytes) -> None:
        self.connection.lrem(self.processing_key, 1, raw)

    def waiting(self) -> int:
        return int(self.connection.llen(self.key)) + int(self.connection.llen(self.processing_key))


def _encode_point(point: Point) -> dict[str, Any]:
    vector = np.asarray(point.vector, dtype="<f4").reshape(-1)
    return {
        "task": point.task,
        "image": point.image,
        "labels": dict(point.labels),
        "annotation_id": point.annotation.id,
        "annotation_updated_at": point.annotation.updated_at,
        "vector": base64.b64encode(vector.tobytes()).decode("ascii"),
    }


def _decode_point(raw: Mapping[str, Any]) -> Point:
    return Point(
        task=raw["task"],
        vector=np.frombuffer(base64.b64decode(raw["vector"]), dtype="<f4").copy(),
        image=raw["image"],
        labels=dict(raw.get("labels") or {}),
        annotation=Annotation(raw.get("annotation_id"), raw.get("annotation_updated_at")),
    )
