"""Where training samples come from: a project's live generation in the store (labels and
image references from the payload), or a folder of images with a labels CSV."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from echolabel.folders import read_folder
from echolabel.vote import is_multi_choice
from vectorstore import VectorStore
from workers.training.samples import Sample, TrainingRefused

VALIDATION_SPLITS = ("val", "valid", "validation")


def project_samples(
    store: VectorStore,
    project: int | str,
    fields: Sequence[str] = (),
    patient_key: str | None = None,
) -> tuple[list[Sample], list[str]]:
    """(samples, fields) from the labelled points of the project's live generation; fields
    default to every single-choice field that has labels (a multi-choice field, whose labels
    are lists, cannot train a single-label head). `patient_key` names a payload key."""
    if store.collection(project) is None:
        raise TrainingRefused(f"project {project} has no collection: index it first")
    samples = [
        Sample(
            id=str(point.task),
            ref=point.image,
            labels=dict(point.labels),
            group=str(point.extra[patient_key]) if patient_key in point.extra else None,
        )
        for point in store.iter_points(project, labelled=True, with_vectors=False)
    ]
    found = sorted({name for s in samples for name in s.labels})
    multi = [name for name in found if is_multi_choice(s.labels.get(name) for s in samples)]
    if not fields and found and len(multi) == len(found):
        raise TrainingRefused(
            f"project {project}: every labelled field ({', '.join(multi)}) is multi-choice; "
            "the encoder trains single-label heads"
        )
    return samples, list(fields) or [name for name in found if name not in multi]


def folder_samples(
    images: Path,
    labels_csv: Path,
    fields: Sequence[str],
    *,
    image_column: str = "image",
    patient_column: str | None = None,
    split_column: str | None = None,
    train_split: str = "train",
) -> tuple[list[Sample], int]:
    """(samples, rows left out) from a labelled folder. With `split_column`, rows whose split
    is `train_split` train, rows marked val/valid/validation validate, and every other row
    (test) is left out: never read, never trained on."""
    items = read_folder(
        images,
        labels_csv,
        image_column=image_column,
        fields=tuple(fields),
        group_column=patient_column,
    )
    splits = _column(labels_csv, split_column, image_column) if split_column else {}
    samples, left_out = [], 0
    for item in items:
        split = splits.get(item.task, train_split) if split_column else train_split
        if split == train_split:
            role = "train"
        elif split.lower() in VALIDATION_SPLITS:
            role = "validation"
        else:
            left_out += 1
            continue
        samples.append(Sample(item.task, str(item.path), dict(item.labels), item.group, role))
    return samples, left_out


def _column(labels_csv: Path, column: str, image_column: str) -> dict[str, str]:
    import csv

    with open(labels_csv, newline="") as handle:
        reader = csv.DictReader(handle)
        if column not in (reader.fieldnames or []):
            raise ValueError(f"{labels_csv} has no column {column!r}; columns: {reader.fieldnames}")
        return {row[image_column]: (row[column] or "").strip() for row in reader}
