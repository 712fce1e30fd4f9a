"""The data step of training: fetch and decode every image, split off validation, build the
per-field targets.

Images are decoded once, resized and centre-cropped to the input size, and kept as uint8 in
memory; each epoch augments them afresh.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from echolabel.encoders.trained import resize_crop
from echolabel.images import ImageError, ImageFetcher
from workers.training.options import TrainOptions
from workers.training.samples import (
    Sample,
    TrainingRefused,
    check_trainable,
    class_counts,
    validation_split,
)


@dataclass
class _Loaded:
    samples: list[Sample] = field(default_factory=list)
    pixels: list[torch.Tensor] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def load_images(
    samples: Sequence[Sample],
    fetcher: ImageFetcher,
    *,
    size: int,
    on_loaded: Callable[[int], None] = lambda done: None,
) -> _Loaded:
    """Fetch (through the ImageFetcher), hash and decode every sample's image; a bad image is
    listed in `failed` and left out."""
    loaded = _Loaded()
    for index, sample in enumerate(samples):
        try:
            data = fetcher.fetch_bytes(sample.ref)
            image = fetcher.decode(data, source=sample.id, min_side=size)
        except ImageError as exc:
            loaded.failed[sample.id] = f"{exc.reason}: {exc}"
            continue
        loaded.samples.append(sample)
        loaded.pixels.append(resize_crop(image, size))
        loaded.hashes.append(hashlib.sha256(data).hexdigest())
        if index % 16 == 0 or index == len(samples) - 1:
            on_loaded(index + 1)
    return loaded


@dataclass
class TrainingData:
    """The data step's result: decoded images, the split, the classes and the targets."""

    loaded: _Loaded
    fields: list[str]
    train_set: list[Sample]
    val_set: list[Sample]
    classes: list[list[str]]  # per field, sorted
    pixels: torch.Tensor  # (n, 3, size, size) uint8, in the order of loaded.samples
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    train_y: torch.Tensor  # (train, fields); -100 where an image has no label for a field
    val_y: torch.Tensor

    def training_images(self) -> list[dict[str, str]]:
        """id, sha256 and role of every image trained or validated on."""
        index_of = {s.id: i for i, s in enumerate(self.loaded.samples)}
        return [
            {"id": s.id, "sha256": self.loaded.hashes[index_of[s.id]], "role": role}
            for role, chosen in (("train", self.train_set), ("validation", self.val_set))
            for s in chosen
        ]


def prepare_data(
    samples: Sequence[Sample],
    fields: Sequence[str],
    fetcher: ImageFetcher,
    options: TrainOptions,
    on_loaded: Callable[[int], None] = lambda done: None,
) -> TrainingData:
    """Load every image, check the guard-rail again on what was read, split off validation,
    and build the per-field targets."""
    fields = list(fields)
    loaded = load_images(samples, fetcher, size=options.input_size, on_loaded=on_loaded)
    # Images that failed to load may leave a class short: check again on what was read.
    check_trainable(loaded.samples, fields, options.min_per_class)
    train_set, val_set = validation_split(
        loaded.samples, fields, options.val_fraction, options.seed
    )
    if not val_set and options.val_fraction > 0:
        raise TrainingRefused("no validation images: give a validation split or --val-fraction")
    if not val_set and options.select_by != "head":
        raise ValueError(
            f"select_by={options.select_by!r} picks the epoch on validation images: give a "
            "validation split or --val-fraction"
        )
    classes = [sorted(class_counts(loaded.samples, fields)[f]) for f in fields]
    index_of = {s.id: i for i, s in enumerate(loaded.samples)}

    def targets(chosen: Sequence[Sample]) -> torch.Tensor:
        # (n, fields); -100 where an image has no label for a field (ignored by the loss).
        return torch.tensor(
            [
                [
                    classes[j].index(s.labels[f]) if s.labels.get(f) else -100
                    for j, f in enumerate(fields)
                ]
                for s in chosen
            ],
            dtype=torch.long,
        )

    return TrainingData(
        loaded=loaded,
        fields=fields,
        train_set=train_set,
        val_set=val_set,
        classes=classes,
        pixels=torch.stack(loaded.pixels),
        train_idx=torch.tensor([index_of[s.id] for s in train_set]),
        val_idx=torch.tensor([index_of[s.id] for s in val_set]),
        train_y=targets(train_set),
        val_y=targets(val_set),
    )
