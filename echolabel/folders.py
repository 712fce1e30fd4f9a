"""A labelled image folder: images under a root, labels (and patient ids) in a CSV."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".gif", ".webp"}


@dataclass(frozen=True)
class Item:
    task: str  # the image path relative to the root: a stable id
    path: Path
    labels: dict[str, str] = field(default_factory=dict)
    group: str | None = None  # patient / study id, for leave-patient-out


def read_folder(
    root: Path,
    labels_csv: Path | None = None,
    *,
    image_column: str = "image",
    fields: tuple[str, ...] = (),
    group_column: str | None = None,
    where: Mapping[str, str] | None = None,
) -> list[Item]:
    """Every image of the folder (no CSV), or the CSV's rows with their labels; with `where`,
    only the rows whose columns hold those values (e.g. {"split": "train"})."""
    root = root.resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of images")
    where = dict(where or {})
    if where and labels_csv is None:
        raise ValueError("selecting rows (where) needs a labels CSV")
    if labels_csv is None:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [Item(p.relative_to(root).as_posix(), p) for p in files]
    with open(labels_csv, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for needed in [image_column, *fields, *([group_column] if group_column else []), *where]:
            if needed not in columns:
                raise ValueError(f"{labels_csv} has no column {needed!r}; columns: {columns}")
        return [
            Item(
                task=row[image_column],
                path=root / row[image_column],
                labels={f: row[f] for f in fields if row.get(f)},
                group=(row.get(group_column) or None) if group_column else None,
            )
            for row in reader
            if all(row[column] == value for column, value in where.items())
        ]


def fingerprint(items: list[Item]) -> str:
    """Identifies the evaluated set: image names, sizes and labels (not the pixels)."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.task):
        size = item.path.stat().st_size if item.path.exists() else -1
        digest.update(
            f"{item.task}\t{size}\t{sorted(item.labels.items())}\t{item.group}\n".encode()
        )
    return digest.hexdigest()[:16]


def with_groups(items: Sequence[Item], field_name: str, mapping_csv: Path) -> list[Item]:
    """The items with a `<field>_group` label from a two-column CSV (label, group): e.g. an
    organ's organ group, so that a report measures the coarser field too."""
    with open(mapping_csv, newline="") as handle:
        mapping = {row[0]: row[1] for row in csv.reader(handle) if len(row) >= 2}
    return [
        replace(
            item, labels={**item.labels, f"{field_name}_group": mapping[item.labels[field_name]]}
        )
        if item.labels.get(field_name) in mapping
        else item
        for item in items
    ]
