"""Evaluate encoders on a labelled folder: embed every image once per encoder, then measure."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from echolabel.core.runtime import Runtime
from echolabel.embedding import Embedder, ImageLoader, TaskImage
from echolabel.encoders.centred import centre_rows, centres, fit_centre
from echolabel.folders import Item, fingerprint
from echolabel.images import ImageFetcher
from echolabel.settings import Settings
from workers.training.options import TrainOptions
from workers.training.samples import Sample
from workers.training.selection import RetrainPolicy
from workers.training.trainer import train_encoder

from .held_out import held_out, note, trained_on
from .learning_curve import batch_sizes
from .pixels import thumbnail
from .report import evaluate_vectors, new_report
from .retraining_curve import RETRAINING_ORDERS, Retrain, replay_retraining, replay_sessions

Progress = Callable[[str, int], None]  # (encoder, images just embedded)


@dataclass(frozen=True)
class RetrainingReplay:
    """Replay the self-improving loop too: rounds at `policy`'s points, trained with `options`."""

    policy: RetrainPolicy
    options: TrainOptions
    seeds: Sequence[int] = (0,)
    orders: Sequence[str] = RETRAINING_ORDERS
    up_to: int | None = None  # the last curve point at or below this many labels; None: all

    def sizes(self, items: int) -> list[int]:
        """The curve's points for this many items, up to `up_to` labels."""
        sizes = batch_sizes(items)
        if self.up_to is None:
            return sizes
        kept = [s for s in sizes if s <= self.up_to]
        if not kept:
            raise ValueError(f"--retraining-up-to {self.up_to}: the first point is {sizes[0]}")
        return kept

    @classmethod
    def from_settings(
        cls, settings: Settings, seeds: Sequence[int], options: Mapping[str, Any] | None = None
    ) -> RetrainingReplay:
        """The product's policy (ECHOLABEL_RETRAIN_GROWTH, ECHOLABEL_MIN_PER_CLASS) and training
        options: the loop's, as the backend's rounds train (`TrainOptions.for_retraining`),
        `options` (TrainOptions fields) over them."""
        return cls(
            policy=RetrainPolicy.from_settings(settings),
            options=TrainOptions.for_retraining(settings, options),
            seeds=seeds,
        )


def evaluate_folder(
    items: Sequence[Item],
    fields: Sequence[str],
    encoders: Sequence[str],
    settings: Settings,
    *,
    root: Path,
    k: int = 10,
    min_class_size: int = 20,
    k_candidates: Sequence[int] = (),
    near_duplicate_threshold: float | None = None,
    learning_curve_seeds: Sequence[int] = (),
    retraining: RetrainingReplay | None = None,
    command: str = "",
    on_progress: Progress = lambda encoder, n: None,
) -> dict[str, Any]:
    """The report for these items: one block per encoder under `encoders`.

    With a trained encoder among `encoders`, the images it was trained on are left out for
    every encoder (held-out images only; see held_out.py). With `retraining`, each pretrained
    encoder's block also gets `learning_curve_retraining`: the session replayed with the
    self-improving loop starting from that encoder (`retraining_curve.py`).

    A pretrained encoder is measured as the backend uses it: centred on the folder's images
    when ECHOLABEL_AUTO_CENTRE is on and they are at least ECHOLABEL_CENTRE_MIN_IMAGES
    (echolabel/encoders/centred.py); its block says so under `centred_on`."""
    # The folder is the only place images are read from.
    settings = dataclasses.replace(settings, local_files_root=root)
    runtime = Runtime.build(settings)  # no store: the folder is the data
    fetcher, embedder = runtime.fetcher, runtime.embedder
    trained = trained_on(encoders, settings.encoders_dir)
    items, excluded = held_out(items, trained.values(), lambda i: fetcher.fetch_bytes(str(i.path)))
    if not items:
        runtime.close()
        raise ValueError("every image was used to train the encoder(s): nothing held out")
    report = new_report(
        command=command,
        k=k,
        min_neighbours=settings.min_neighbours,
        min_score=settings.min_score,
        min_class_size=min_class_size,
        dataset={
            "description": f"folder {root}",
            "items": len(items),
            "fingerprint": fingerprint(list(items)),
            "groups": any(i.group for i in items),
            "fields": list(fields),
            # Preprocessing changes every vector: a report says which it measured.
            "ultrasound_crop": settings.ultrasound_crop,
            "dicom_frame": settings.dicom_frame,
        },
    )
    note(report, trained, excluded)
    thumbnails: dict[str, np.ndarray] = {}

    def load(ref: str, *, min_side: int | None = None) -> Image.Image:
        image = fetcher.load(ref, min_side=min_side)
        if ref not in thumbnails:  # decoded once per encoder anyway; thumbnail the first time
            thumbnails[ref] = thumbnail(image)
        return image

    try:
        for name in encoders:
            model = embedder.encoder(name)
            vectors, kept, failed = embed_all(embedder, load, name, items, on_progress)
            centred_on, plain = None, None
            if centres(settings, name, len(kept)):
                # Near-duplicates stay those of the encoder's own similarity (its threshold).
                plain, centred_on = vectors, len(kept)
                vectors = centre_rows(vectors, fit_centre(vectors))
            labels = {f: [kept_item.labels.get(f) for kept_item in kept] for f in fields}
            groups = [kept_item.group for kept_item in kept]
            result = evaluate_vectors(
                vectors,
                labels,
                groups=groups,
                k=k,
                min_class_size=min_class_size,
                min_neighbours=settings.min_neighbours,
                min_score=settings.min_score,
                thumbnails=np.stack([thumbnails[str(i.path)] for i in kept]),
                k_candidates=k_candidates,
                near_duplicate_threshold=near_duplicate_threshold,
                near_duplicates_by=plain,
                learning_curve_seeds=learning_curve_seeds,
            )
            if retraining is not None and name not in trained:
                retrain = _retrain_from(kept, fields, settings, fetcher, load, retraining.options)
                result["learning_curve_retraining"] = {
                    "policy": dataclasses.asdict(retraining.policy),
                    "options": dataclasses.asdict(retraining.options),
                    "sessions": [
                        replay_retraining(
                            vectors,
                            labels,
                            retrain,
                            order=order,
                            seed=seed,
                            sizes=retraining.sizes(len(kept)),
                            policy=retraining.policy,
                            groups=groups,
                        )
                        for order, seed in replay_sessions(retraining.orders, retraining.seeds)
                    ],
                }
            report["encoders"][name] = {
                "encoder": name,
                "weights_id": model.weights_id,
                "dim": model.dim,
                "images": len(kept),
                "centred_on": centred_on,
                "failed": failed,
                **({"trained": trained[name].describe()} if name in trained else {}),
                **result,
            }
    finally:
        runtime.close()
    return report


def embed_all(
    embedder: Embedder,
    load: ImageLoader,
    encoder: str,
    items: Sequence[Item],
    on_progress: Progress,
) -> tuple[np.ndarray, list[Item], dict[str, str]]:
    """(vectors, the items whose image loaded, failed image → reason), in chunks with progress;
    ValueError when no image loads."""
    by_task = {item.task: item for item in items}
    rows: list[np.ndarray] = []
    kept: list[Item] = []
    failed: dict[str, str] = {}
    chunk = max(embedder.batch_size, 32)
    for start in range(0, len(items), chunk):
        batch = [TaskImage(i.task, str(i.path)) for i in items[start : start + chunk]]
        result = embedder.embed_tasks(encoder, batch, load)
        for point in result.points:
            rows.append(np.asarray(point.vector, dtype=np.float32))
            kept.append(by_task[point.task])
        failed.update({str(t): f"{e.reason}: {e}" for t, e in result.failures.items()})
        on_progress(encoder, len(batch))
    if not rows:
        raise ValueError(f"no image could be read with {encoder}: {list(failed.values())[:3]}")
    return np.stack(rows), kept, failed


def _retrain_from(
    items: Sequence[Item],
    fields: Sequence[str],
    settings: Settings,
    fetcher: ImageFetcher,
    load: ImageLoader,
    options: TrainOptions,
) -> Retrain:
    """Train a challenger on the given rows of `items` (in a scratch encoders folder), and
    embed every item with it."""

    def retrain(rows: Sequence[int]) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="echolabel-replay-") as scratch:
            local = dataclasses.replace(settings, artefacts_dir=Path(scratch))
            summary = train_encoder(
                [
                    Sample(
                        id=items[r].task,
                        ref=str(items[r].path),
                        labels=dict(items[r].labels),
                        group=items[r].group,
                    )
                    for r in rows
                ],
                fields,
                fetcher=fetcher,
                encoders_dir=local.encoders_dir,
                name="replay",
                options=options,
            )
            scratch_runtime = Runtime.build(local)  # its embedder finds the scratch encoders
            try:
                vectors, kept, failed = embed_all(
                    scratch_runtime.embedder, load, summary["encoder"], items, lambda e, n: None
                )
            finally:
                scratch_runtime.close()
        if len(kept) != len(items):
            raise ValueError(f"the challenger could not read {len(failed)} image(s): {failed}")
        return vectors

    return retrain
