"""Fine-tune a pretrained backbone on labelled images (one classification head per choices
field, summed cross-entropy, optionally a supervised-contrastive term on the embedding), for a
fixed number of epochs or stopping early on a validation split, and save a versioned encoder
the registry loads.

`train_encoder` runs the steps in order; each lives in a module of its own: `data`, `model`,
`fitting` (with `validation` after every epoch) and `output`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from echolabel.encoders.base import resolve_device
from echolabel.encoders.trained_files import check_base_name, encoder_name
from echolabel.images import ImageFetcher
from workers.training.data import prepare_data
from workers.training.fitting import fit
from workers.training.model import (
    START_ENCODERS,
    build_model,
    cache_trunk_features,
    plain_trunk_features,
)
from workers.training.options import SELECTION_SCORES, TrainOptions
from workers.training.output import build_config, build_report, save
from workers.training.progress import TrainingProgress
from workers.training.samples import Sample, check_trainable


def check_options(options: TrainOptions) -> None:
    """Reject counts below 1 and an unknown starting backbone before any image is read."""
    if options.min_steps < 0:
        raise ValueError(f"min_steps must be at least 0, got {options.min_steps}")
    for option in ("epochs", "views", "batch_size", "input_size", "patience"):
        if getattr(options, option) < 1:
            raise ValueError(f"{option} must be at least 1, got {getattr(options, option)}")
    if options.start not in START_ENCODERS:
        raise ValueError(
            f"training starts from one of {', '.join(START_ENCODERS)}, got {options.start!r}"
        )
    if options.select_by not in SELECTION_SCORES:
        raise ValueError(
            f"select_by must be one of {', '.join(SELECTION_SCORES)}, got {options.select_by!r}"
        )
    if options.select_by == "neighbours" and options.vote_top_k < options.vote_min_neighbours:
        raise ValueError(
            f"vote_min_neighbours {options.vote_min_neighbours} exceeds vote_top_k "
            f"{options.vote_top_k}: every early-stopping image would abstain"
        )


def train_encoder(
    samples: Sequence[Sample],
    fields: Sequence[str],
    *,
    fetcher: ImageFetcher,
    encoders_dir: Path,
    name: str,
    options: TrainOptions = TrainOptions(),
    source: Mapping[str, Any] | None = None,
    on_progress: Callable[[TrainingProgress], None] = lambda progress: None,
) -> dict[str, Any]:
    """Train, save under `encoders_dir/<name>-v<N>/`, and return a summary (its registry
    name, path, validation scores, class counts, timings).

    The steps: prepare the data (load, split, targets), build the model (pretrained backbone,
    frozen trunk, heads), cache the frozen trunk's features, fit (the epoch loop, with
    validation and early stopping where there are validation images), save. Raises
    TrainingRefused when a class has fewer than `options.min_per_class` images."""
    check_base_name(name)
    check_options(options)
    fields = list(fields)
    check_trainable(samples, fields, options.min_per_class)
    device = resolve_device(options.device)
    torch.manual_seed(options.seed)
    started = time.monotonic()

    progress = TrainingProgress("loading images", len(samples), 0, epochs=options.epochs)

    def loaded_so_far(done: int) -> None:
        progress.done = done
        on_progress(progress)

    data = prepare_data(samples, fields, fetcher, options, loaded_so_far)
    load_s = time.monotonic() - started
    options = replace(options, epochs=options.epochs_for(len(data.train_idx)))
    progress.epochs = options.epochs
    model, model_info = build_model(options, data.classes, device)
    generator = torch.Generator().manual_seed(options.seed)

    progress.stage = "computing frozen features"
    plain_passes = 2 if options.tta_hflip else 1
    # "neighbours" also embeds the training images as they are, the neighbours of the vote.
    plain_images = len(data.val_idx) + (
        len(data.train_idx) if options.select_by == "neighbours" else 0
    )
    progress.total = options.views * len(data.train_idx) + plain_passes * plain_images
    progress.done = 0

    def computed(count: int) -> None:
        progress.done += count
        on_progress(progress)

    cache_started = time.monotonic()
    views, val_views = cache_trunk_features(
        model, data, options, model_info["mean"], model_info["std"], generator, device, computed
    )
    cache_s = time.monotonic() - cache_started
    labelled_views = None
    timing = {"loading": load_s, "frozen_features": cache_s}
    if options.select_by == "neighbours":
        labelled_started = time.monotonic()
        labelled_views = plain_trunk_features(
            model,
            data.pixels[data.train_idx],
            options,
            model_info["mean"],
            model_info["std"],
            device,
            computed,
        )
        timing["frozen_features_neighbours"] = time.monotonic() - labelled_started
    result = fit(
        model,
        data,
        views,
        val_views,
        options,
        generator,
        device,
        progress,
        on_progress,
        labelled_views=labelled_views,
    )

    progress.stage, progress.eta_s = "saving", 0.0
    on_progress(progress)
    config = build_config(data, options, model_info, model.backbone.num_features, source)
    report = build_report(data, options, result, device, timing)
    path = save(encoders_dir, name, model, config, report)
    summary = {
        "encoder": encoder_name(path.name),
        "path": str(path),
        "best_epoch": result.best["epoch"],
        "epochs_run": len(result.curves),
        # None without validation images: the last epoch is kept (report["selected_by"]).
        "val_accuracy": result.best.get("val_accuracy"),
        "selected_by": report["selected_by"]["option"],
        "val_selection_score": result.best.get(SELECTION_SCORES[options.select_by]),
        "val_fields": result.best.get("val_fields", {}),
        "class_counts": report["class_counts"],
        "validation_split": report["validation_split"],
        "failed_images": len(data.loaded.failed),
        "timing_s": report["timing_s"],
    }
    progress.stage = "saved"
    on_progress(progress)
    return summary
