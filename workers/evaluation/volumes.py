"""Evaluate encoders on labelled 3D volumes, as Khun Jush et al. 2023 (shared/papers) do.

Each volume's sampled slices are embedded; each slice's top k come from the slices of the
*other* volumes (leave-one-volume-out: `leave_one_out_neighbours` with the volume as group),
the backend's vote labels the slice, and the volume takes the label most of its slices got
(`echolabel.volumes.volume_vote`). Reported per field: the volume-level recall per class (the
paper's tables), accuracy, coverage and confusion; and the usual slice-level report
(`evaluate_vectors`) under `fields`, whose leave-patient-out view is leave-one-volume-out.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from echolabel.core.runtime import Runtime
from echolabel.embedding import Embedder
from echolabel.folders import Item, fingerprint
from echolabel.settings import Settings
from echolabel.volumes import Sampling, VolumeError, read_volume, volume_vote

from .metrics import leave_one_out_neighbours, neighbour_votes
from .report import evaluate_vectors, new_report

Progress = Callable[[str, int], None]  # (encoder, volumes just embedded)


def evaluate_volumes(
    items: Sequence[Item],
    fields: Sequence[str],
    encoders: Sequence[str],
    settings: Settings,
    *,
    samplings: Sequence[Sampling],
    seed: int = 0,
    k: int = 10,
    min_class_size: int = 20,
    command: str = "",
    description: str = "",
    on_progress: Progress = lambda encoder, n: None,
) -> dict[str, Any]:
    """The report for these volumes (`Item.path`: a NIfTI file or a DICOM series folder).

    One block per encoder and sampling under `encoders`, keyed by the encoder's name, or by
    "<encoder> <sampling>" when several samplings are compared (as the paper's tables do);
    each slice is embedded once however many samplings pick it.
    """
    if not samplings:
        raise ValueError("no sampling given: expected at least one (e.g. every-n:4)")
    runtime = Runtime.build(settings)  # no store: the volumes are the data
    embedder = runtime.embedder
    report = new_report(
        command=command,
        k=k,
        min_neighbours=settings.min_neighbours,
        min_score=settings.min_score,
        min_class_size=min_class_size,
        dataset={
            "description": description or "volumes",
            "items": len(items),
            "unit": "volumes",
            "fingerprint": fingerprint(list(items)),
            "groups": True,  # the volume is the group: leave-one-volume-out
            "fields": list(fields),
            "sampling": ", ".join(map(str, samplings)),
            "seed": seed,
        },
    )
    with runtime:
        for name in encoders:
            model = embedder.encoder(name)
            embedded, failed = _embed_volumes(embedder, name, items, samplings, seed, on_progress)
            for sampling in samplings:
                rows = [
                    (item, vectors[i]) for item, picks, vectors in embedded for i in picks[sampling]
                ]
                key = name if len(samplings) == 1 else f"{name} {sampling}"
                report["encoders"][key] = {
                    "encoder": name,
                    "sampling": str(sampling),
                    "weights_id": model.weights_id,
                    "dim": model.dim,
                    "images": len(rows),
                    "volumes": len(embedded),
                    "failed": failed,
                    **_evaluate_slices(rows, fields, settings, k, min_class_size),
                }
    return report


def _evaluate_slices(
    rows: Sequence[tuple[Item, np.ndarray]],
    fields: Sequence[str],
    settings: Settings,
    k: int,
    min_class_size: int,
) -> dict[str, Any]:
    """The slice-level report and, under `volume_vote`, the count vote per field."""
    vectors = np.stack([vector for _, vector in rows])
    labels = {f: [item.labels.get(f) for item, _ in rows] for f in fields}
    groups = [item.task for item, _ in rows]
    result = evaluate_vectors(
        vectors,
        labels,
        groups=groups,
        k=k,
        min_class_size=min_class_size,
        min_neighbours=settings.min_neighbours,
        min_score=settings.min_score,
    )
    indices, similarities = leave_one_out_neighbours(vectors, k, groups=groups)
    volumes = list({item.task: item for item, _ in rows}.values())
    by_field = {}
    for field in fields:
        votes = neighbour_votes(
            labels[field],
            indices,
            similarities,
            field=field,
            k=k,
            min_neighbours=settings.min_neighbours,
            min_score=settings.min_score,
        )
        by_field[field] = volume_metrics(volumes, field, groups, [v.label for v in votes])
    return {**result, "volume_vote": by_field}


def volume_metrics(
    volumes: Sequence[Item],
    field: str,
    slice_volume: Sequence[str],
    slice_labels: Sequence[str | None],
) -> dict[str, Any]:
    """Count vote per volume over its slices' voted labels, and its quality.

    `per_class[c]`: volumes, voted, correct, `recall` = correct / volumes (an abstaining
    volume counts as a miss, so recall is comparable with the paper's, which never abstains)
    and `precision` = correct / volumes voted c (None when none). `accuracy` is over voted
    volumes, `coverage` = voted / labelled volumes, `macro_recall` the mean recall over classes,
    `confusion` rows = true label, columns = voted label. `volumes` lists each volume's truth,
    vote and slice counts.
    """
    slices: dict[str, list[str | None]] = {}
    for volume, label in zip(slice_volume, slice_labels, strict=True):
        slices.setdefault(volume, []).append(label)
    rows = []
    for volume in volumes:
        truth = volume.labels.get(field)
        if truth is None:
            continue
        voted, counts = volume_vote(slices.get(volume.task, []))
        rows.append({"volume": volume.task, "truth": truth, "voted": voted, "counts": counts})
    classes = sorted({r["truth"] for r in rows} | {r["voted"] for r in rows if r["voted"]})
    position = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for r in rows:
        if r["voted"] is not None:
            confusion[position[r["truth"]], position[r["voted"]]] += 1
    per_class = {}
    for c in sorted({r["truth"] for r in rows}):
        i = position[c]
        total = sum(r["truth"] == c for r in rows)
        predicted = int(confusion[:, i].sum())
        per_class[c] = {
            "volumes": total,
            "voted": int(confusion[i].sum()),
            "correct": int(confusion[i, i]),
            "recall": float(confusion[i, i] / total),
            "precision": float(confusion[i, i] / predicted) if predicted else None,
        }
    voted = int(confusion.sum())
    return {
        "field": field,
        "volumes": len(rows),
        "voted": voted,
        "coverage": voted / len(rows) if rows else 0.0,
        "accuracy": float(np.trace(confusion) / voted) if voted else None,
        "macro_recall": float(np.mean([v["recall"] for v in per_class.values()]))
        if per_class
        else None,
        "per_class": per_class,
        "confusion": {"classes": classes, "matrix": confusion.tolist()},
        "volume_votes": rows,
    }


def volume_headline(report: dict[str, Any]) -> str:
    """The volume-level table the CLI prints: recall per class, like the paper's tables."""
    lines = [f"volumes, sampling {report['dataset'].get('sampling')}:"]
    for encoder, result in report["encoders"].items():
        for field, metrics in result.get("volume_vote", {}).items():
            recalls = ", ".join(f"{c} {v['recall']:.3f}" for c, v in metrics["per_class"].items())
            accuracy = "-" if metrics["accuracy"] is None else f"{metrics['accuracy']:.3f}"
            lines.append(
                f"{field:12} {encoder:20} volumes {metrics['volumes']}, accuracy {accuracy}, "
                f"coverage {metrics['coverage']:.2f}, recall: {recalls}"
            )
    return "\n".join(lines)


def _embed_volumes(
    embedder: Embedder,
    encoder: str,
    items: Sequence[Item],
    samplings: Sequence[Sampling],
    seed: int,
    on_progress: Progress,
) -> tuple[list[tuple[Item, dict[Sampling, list[int]], dict[int, np.ndarray]]], dict[str, str]]:
    """Per readable volume: the slices each sampling picks and the vector of every picked
    slice (each embedded once); and the reasons of the volumes that could not be read."""
    embedded: list[tuple[Item, dict[Sampling, list[int]], dict[int, np.ndarray]]] = []
    failed: dict[str, str] = {}
    for item in items:
        try:
            volume = read_volume(item.path)
        except VolumeError as exc:
            failed[item.task] = str(exc)
            on_progress(encoder, 1)
            continue
        # A seed per volume (from the run's seed and the volume's name): random sampling does
        # not pick the same slice numbers in every volume, and a rerun picks the same ones.
        volume_seed = [seed, zlib.crc32(item.task.encode())]
        picks = {s: s.pick(volume.positions_mm, seed=volume_seed) for s in samplings}
        wanted = sorted({i for chosen in picks.values() for i in chosen})
        vectors: dict[int, np.ndarray] = {}
        for start in range(0, len(wanted), embedder.batch_size):
            batch = wanted[start : start + embedder.batch_size]
            out = embedder.embed_images(encoder, [volume.slice_image(i) for i in batch])
            vectors.update(zip(batch, np.asarray(out, dtype=np.float32), strict=True))
        embedded.append((item, picks, vectors))
        on_progress(encoder, 1)
    if not embedded:
        raise ValueError(f"no volume could be read: {list(failed.values())[:3]}")
    return embedded, failed
