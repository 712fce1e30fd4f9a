"""Turning tasks into stored points: load images, embed them in batches, build store points.

Used inline by the backend (embedded deployment), by the CLI, and by RQ jobs; it holds each
encoder once per process and runs one inference at a time, because threads racing for two
cores are slower than one batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from echolabel.encoders import Encoder, load_encoder
from echolabel.images import ImageError
from echolabel.settings import Settings
from vectorstore import Annotation, Point, TaskId

log = logging.getLogger(__name__)


class ImageLoader(Protocol):
    """Loads a task's image; `min_side` lets the decoder reduce large images cheaply (the
    encoder's resize side), as `ImageFetcher.load` does."""

    def __call__(self, ref: str, *, min_side: int | None = None) -> Image.Image: ...


@dataclass(frozen=True)
class TaskImage:
    """A task to embed: its id, image reference, and labels if it is already annotated."""

    task: TaskId
    image: str
    labels: dict[str, str] = field(default_factory=dict)
    annotation: Annotation = field(default_factory=Annotation)


@dataclass
class EmbedResult:
    points: list[Point] = field(default_factory=list)
    failures: dict[TaskId, ImageError] = field(default_factory=dict)


@dataclass
class EmbedReport:
    """Tasks whose image failed, and tasks still being embedded by a worker."""

    failures: dict[TaskId, ImageError] = field(default_factory=dict)
    pending: set[TaskId] = field(default_factory=set)


@dataclass
class _Request:
    """One caller's images waiting for a forward pass."""

    encoder: str
    images: list[Image.Image]
    done: bool = False
    vectors: np.ndarray | None = None
    error: BaseException | None = None


class Embedder:
    """Keeps loaded encoders for the life of the process and serialises inference."""

    def __init__(
        self,
        *,
        weights_dir: Path | None,
        device: str = "cpu",
        batch_size: int = 16,
        encoders_dir: Path | None = None,
    ):
        self.weights_dir = weights_dir
        self.encoders_dir = encoders_dir  # trained encoders (<artefacts>/encoders)
        self.device = device
        self.batch_size = batch_size
        self._encoders: dict[str, Encoder] = {}
        self._load_lock = threading.Lock()
        self._inference_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._waiting: list[_Request] = []
        self.loads = 0  # how many times an encoder was loaded (workers prove "once" with it)
        self.inferences = 0  # forward passes run, and requests they served (merged batches)
        self.merged_requests = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Embedder:
        return cls(
            weights_dir=settings.weights_dir,
            device=settings.device,
            batch_size=settings.batch_size,
            encoders_dir=settings.encoders_dir,
        )

    def encoder(self, name: str) -> Encoder:
        with self._load_lock:
            if name not in self._encoders:
                log.info("loading encoder", extra={"encoder": name, "device": self.device})
                self._encoders[name] = load_encoder(
                    name,
                    weights_dir=self.weights_dir,
                    device=self.device,
                    batch_size=self.batch_size,
                    encoders_dir=self.encoders_dir,
                )
                self.loads += 1
            return self._encoders[name]

    def embed_images(self, encoder_name: str, images: Sequence[Image.Image]) -> np.ndarray:
        """Vectors of these images; concurrent callers are merged into shared batches.

        One inference runs at a time. Whoever holds the inference lock embeds every waiting
        request of the same encoder (up to a batch) in one forward pass, so eight threads
        asking for one image each cost one batch of eight, not eight passes fighting for two
        cores.
        """
        encoder = self.encoder(encoder_name)
        request = _Request(encoder_name, list(images))
        with self._queue_lock:
            self._waiting.append(request)
        with self._inference_lock:
            while not request.done:
                self._infer(encoder, self._take(encoder_name))
        if request.error is not None:
            raise request.error
        assert request.vectors is not None
        return request.vectors

    def _take(self, encoder_name: str) -> list[_Request]:
        """Waiting requests of this encoder, oldest first, up to a batch (at least one)."""
        taken: list[_Request] = []
        size = 0
        with self._queue_lock:
            for request in list(self._waiting):
                if request.encoder != encoder_name:
                    continue
                if taken and size + len(request.images) > self.batch_size:
                    break
                taken.append(request)
                size += len(request.images)
                self._waiting.remove(request)
        return taken

    def _infer(self, encoder: Encoder, requests: list[_Request]) -> None:
        images = [image for request in requests for image in request.images]
        try:
            vectors = encoder.embed(images) if images else np.empty((0, encoder.dim))
        except Exception as exc:  # every merged caller gets the failure, not a hang
            for request in requests:
                request.error, request.done = exc, True
            return
        self.inferences += 1
        self.merged_requests += len(requests)
        start = 0
        for request in requests:
            request.vectors = vectors[start : start + len(request.images)]
            request.done = True
            start += len(request.images)

    def embed_tasks(
        self, encoder_name: str, tasks: Sequence[TaskImage], load_image: ImageLoader
    ) -> EmbedResult:
        """Points for every task whose image loads; a bad image fails only its own task."""
        result = EmbedResult()
        # Encoders without the attribute get full-size images (their own resize does the rest).
        min_side = getattr(self.encoder(encoder_name), "input_side", None)
        for start in range(0, len(tasks), self.batch_size):
            batch = tasks[start : start + self.batch_size]
            loaded: list[tuple[TaskImage, Image.Image]] = []
            for item in batch:
                try:
                    loaded.append((item, load_image(item.image, min_side=min_side)))
                except ImageError as exc:
                    log.warning(
                        "image refused",
                        extra={"task": item.task, "reason": exc.reason, "error": str(exc)},
                    )
                    result.failures[item.task] = exc
            if not loaded:
                continue
            vectors = self.embed_images(encoder_name, [image for _, image in loaded])
            for (item, _), vector in zip(loaded, vectors, strict=True):
                result.points.append(
                    Point(
                        task=item.task,
                        vector=vector,
                        image=item.image,
                        labels=dict(item.labels),
                        annotation=item.annotation,
                    )
                )
        return result
