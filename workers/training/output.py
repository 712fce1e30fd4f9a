"""Writing a trained encoder: config.json (what the registry loads, and the training data's
identity), report.json (how the training went) and the weights, put in place atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save_file

from echolabel.encoders.trained_files import (
    BACKBONE_PREFIX,
    CONFIG_FILE,
    FORMAT,
    REPORT_FILE,
    WEIGHTS_FILE,
    next_version_dir,
)
from workers.training.data import TrainingData
from workers.training.fitting import FitResult
from workers.training.model import Model
from workers.training.options import SELECTION_SCORES, TrainOptions
from workers.training.samples import Sample, class_counts


def build_config(
    data: TrainingData,
    options: TrainOptions,
    model_info: Mapping[str, Any],
    dim: int,
    source: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """config.json: what the registry needs to load the encoder, and the training data's
    identity (source, fingerprint, every image's id and hash)."""
    training_images = data.training_images()
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backbone": {
            "timm_model": model_info["timm_model"],
            "start": options.start,
            "start_weights_id": model_info["start_weights_id"],
        },
        "dim": dim,
        "input_size": options.input_size,
        "tta_hflip": options.tta_hflip,
        "mean": model_info["mean"],
        "std": model_info["std"],
        "fields": {f: data.classes[j] for j, f in enumerate(data.fields)},
        "training": {
            "source": dict(source or {}),
            "fingerprint": _fingerprint(training_images, data.loaded.samples, data.fields),
            "images": training_images,
        },
    }


def build_report(
    data: TrainingData,
    options: TrainOptions,
    result: FitResult,
    device: str,
    timing: Mapping[str, float],
) -> dict[str, Any]:
    """report.json: class counts of both splits, curves, the best epoch's validation scores,
    failed images, options and timings."""
    samples = data.loaded.samples
    return {
        "class_counts": {
            "train": class_counts(data.train_set, data.fields),
            "validation": class_counts(data.val_set, data.fields),
        },
        "validation_split": (
            "given"
            if any(s.role == "validation" for s in samples)
            else "none"
            if not data.val_set
            else "patient-disjoint"
            if any(s.group for s in samples)
            else "stratified random"
        ),
        "curves": result.curves,
        "best_epoch": result.best["epoch"],
        # The curves' score that picked the best epoch and drove the early stopping; without
        # validation images every epoch ran and the last was kept.
        "selected_by": (
            {"option": options.select_by, "score": SELECTION_SCORES[options.select_by]}
            if data.val_set
            else {"option": "last epoch", "score": None}
        ),
        "stopped_early": len(result.curves) < options.epochs,
        "validation": result.best if data.val_set else None,
        "failed_images": data.loaded.failed,
        "options": asdict(options),
        "device": device,
        "timing_s": {
            "loading": round(timing["loading"], 1),
            "frozen_features": round(timing["frozen_features"], 1),
            "training": round(result.seconds, 1),
            "per_epoch": round(result.seconds / len(result.curves), 1),
            "train_images_per_s": round(
                len(data.train_set) * len(result.curves) / result.seconds, 1
            ),
            # select_by="neighbours": the training images' plain pass through the frozen
            # trunk (once), and embedding them and voting (every epoch, within `per_epoch`).
            **(
                {
                    "frozen_features_neighbours": round(timing["frozen_features_neighbours"], 1),
                    "neighbours_per_epoch": round(
                        float(np.mean([c["neighbour_s"] for c in result.curves])), 2
                    ),
                }
                if "frozen_features_neighbours" in timing
                else {}
            ),
        },
    }


def _fingerprint(
    images: Sequence[Mapping[str, str]], samples: Sequence[Sample], fields: Sequence[str]
) -> str:
    """Identifies the training data: image hashes, roles and labels."""
    labels = {s.id: s.labels for s in samples}
    digest = hashlib.sha256()
    for image in sorted(images, key=lambda i: i["sha256"]):
        chosen = sorted((f, labels[image["id"]].get(f)) for f in fields)
        digest.update(f"{image['sha256']}\t{image['role']}\t{chosen}\n".encode())
    return digest.hexdigest()[:16]


def save(
    encoders_dir: Path,
    name: str,
    model: Model,
    config: Mapping[str, Any],
    report: Mapping[str, Any],
) -> Path:
    """Write the encoder into a hidden directory, then rename it into place: a reader never
    sees half an encoder, and a crash leaves no version behind."""
    encoders_dir.mkdir(parents=True, exist_ok=True)
    partial = encoders_dir / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    tensors = {
        f"{BACKBONE_PREFIX}{k}": v.detach().cpu().contiguous()
        for k, v in model.backbone.state_dict().items()
    }
    tensors.update(
        {f"heads.{k}": v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}
    )
    save_file(tensors, str(partial / WEIGHTS_FILE))
    (partial / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    (partial / REPORT_FILE).write_text(json.dumps(report, indent=1))
    while True:
        target = next_version_dir(encoders_dir, name)
        try:
            partial.rename(target)
            return target
        except OSError:  # another training took this version meanwhile
            if not target.exists():
                raise
