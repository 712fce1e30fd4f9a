"""Training on a labelled folder (`echolabel train-encoder --images`): its images read through
a fetcher rooted at the folder, the folder recorded as the encoder's source."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echolabel.core.runtime import Runtime
from echolabel.settings import Settings
from workers.training.options import TrainOptions
from workers.training.progress import TrainingProgress
from workers.training.samples import Sample
from workers.training.sources import folder_samples
from workers.training.trainer import train_encoder


@dataclass(frozen=True)
class FolderSource:
    """A folder of images with a labels CSV, and which of its rows train (`split_column`:
    `train_split` rows train, val rows validate, the others are never read)."""

    images: Path
    labels: Path
    fields: Sequence[str]
    image_column: str = "image"
    patient_column: str | None = None
    split_column: str | None = None
    train_split: str = "train"

    def samples(self) -> tuple[list[Sample], int]:
        """(samples, rows left out): see workers.training.sources.folder_samples."""
        return folder_samples(
            self.images,
            self.labels,
            self.fields,
            image_column=self.image_column,
            patient_column=self.patient_column,
            split_column=self.split_column,
            train_split=self.train_split,
        )


def train_on_folder(
    settings: Settings,
    source: FolderSource,
    samples: Sequence[Sample],
    rows_left_out: int,
    *,
    options: TrainOptions,
    name: str | None = None,
    on_progress: Callable[[TrainingProgress], None] = lambda progress: None,
) -> dict[str, Any]:
    """Train on `samples` (from `source.samples()`) and save under <artefacts>/encoders/ as
    `<name>-v<N>` (name: the folder's by default); the trainer's summary."""
    root = source.images.resolve()
    # The folder is the only place images are read from.
    runtime = Runtime.build(dataclasses.replace(settings, local_files_root=root))
    with runtime:
        return train_encoder(
            samples,
            source.fields,
            fetcher=runtime.fetcher,
            encoders_dir=settings.encoders_dir,
            name=name or root.name,
            options=options,
            source={
                "kind": "folder",
                "images": str(root),
                "labels": str(source.labels.resolve()),
                "split_column": source.split_column,
                "train_split": source.train_split,
                "rows_left_out": rows_left_out,
            },
            on_progress=on_progress,
        )
