"""Fine-tune a pretrained backbone on labelled images (one classification head per choices
field, summed cross-entropy, optionally a supervised-contrastive term on the embedding), stop
early on the validation split, and save a versioned encoder the registry loads.

Images are decoded once, resized and centre-cropped to the input size, and kept as uint8 in
memory; each epoch augments them afresh. The stem and the first blocks stay frozen (generic
edges and textures; freezing them saves their backward pass and guards a small data set).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from echolabel.encoders.base import EncoderError, file_id, resolve_device
from echolabel.encoders.timm_encoders import TIMM_MODELS, load_packaged, packaged_weights_path
from echolabel.encoders.trained import normalise, resize_crop
from echolabel.encoders.trained_files import (
    BACKBONE_PREFIX,
    CONFIG_FILE,
    FORMAT,
    REPORT_FILE,
    WEIGHTS_FILE,
    check_base_name,
    encoder_name,
    next_version_dir,
)
from echolabel.images import ImageError, ImageFetcher
from echolabel.settings import Settings
from echolabel.vote import FieldVote, vote
from vectorstore import Neighbour
from workers.training.augment import UltrasoundAugment
from workers.training.samples import (
    Sample,
    TrainingRefused,
    check_trainable,
    class_counts,
    validation_split,
)

log = logging.getLogger(__name__)

# Backbones training can start from: the EfficientNets (stem, stages in `blocks`, head conv)
# whose weights ship with a package, so training works offline.
START_ENCODERS = tuple(name for name, spec in TIMM_MODELS.items() if spec.packaged)

# What `select_by` may name, and the validation score (a key of each epoch's curve) it picks
# the best epoch by: the heads' accuracy, or the product's vote of the training images.
SELECTION_SCORES = {"head": "val_accuracy", "neighbours": "val_neighbour_vote_accuracy"}


@dataclass(frozen=True)
class TrainOptions:
    start: str = "efficientnet_lite0"  # pretrained encoder whose backbone is fine-tuned
    epochs: int = 10
    patience: int = 3  # epochs without a better validation score before stopping
    batch_size: int = 32
    input_size: int = 160
    # The stem and this many first stages stay frozen. 4 (of 7) beat 5 on BUSI's validation
    # fold: product vote 0.802 vs 0.777, malignant recall 32/42 vs 29/42, no abstention
    # (docs/training.md, bench/recipe_validation.py).
    freeze_blocks: int = 4
    views: int = 4  # augmented views per image whose frozen features are computed once
    lr: float = 3e-4  # backbone; heads learn 10x faster (they start from scratch)
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    # Weight of the supervised-contrastive term (0: off). 0.5 beat 0 on the BUSI validation
    # split: kNN vote 0.86 vs 0.80, head accuracy 0.86 vs 0.83 (docs/training.md).
    metric_weight: float = 0.5
    val_fraction: float = 0.15
    hflip: bool = True
    # Embed (and validate) each image as the mean of its features and its mirror's: the
    # encoder then sees one geometry whichever way the probe was held.
    tta_hflip: bool = False
    seed: int = 0
    device: str = "cpu"
    min_per_class: int = 10  # the settings' default (ECHOLABEL_MIN_PER_CLASS)
    # Which validation score keeps the best epoch and drives `patience` (ties: lower loss):
    # "head", the heads' accuracy; or "neighbours", the vote the product makes: each
    # early-stopping image voted by its top-k nearest training images (embedded as the encoder
    # will embed them) with `echolabel.vote`, an abstention a miss. The head is never used to
    # predict; "neighbours" costs one forward of the trained part over the training images
    # per epoch. It did not beat "head" on BUSI's 4 validation folds: product vote +4, 0, 0,
    # -4 images, mean -0.000 +- 0.010 (docs/training.md, bench/recipe_validation.py).
    select_by: str = "head"
    # The vote "neighbours" scores: the settings' defaults (ECHOLABEL_TOP_K,
    # ECHOLABEL_MIN_NEIGHBOURS, ECHOLABEL_MIN_SCORE).
    vote_top_k: int = 10
    vote_min_neighbours: int = 3
    vote_min_score: float = 0.5

    @classmethod
    def from_settings(
        cls, settings: Settings, options: Mapping[str, Any] | None = None
    ) -> TrainOptions:
        """The recipe with the settings' device, minimum per class and vote (top-k, minimum
        neighbours, minimum share), and `options` (TrainOptions fields) over them."""
        chosen = {
            "device": settings.device,
            "min_per_class": settings.min_per_class,
            "vote_top_k": settings.top_k,
            "vote_min_neighbours": settings.min_neighbours,
            "vote_min_score": settings.min_score,
        }
        return cls(**{**chosen, **(options or {})})


@dataclass
class TrainingProgress:
    """Progress in the job's meta: `total`/`done` count images while loading and computing
    frozen features, epochs while training."""

    stage: str
    total: int
    done: int
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    val_accuracy: float | None = None
    eta_s: float | None = None

    def as_meta(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class _Loaded:
    samples: list[Sample] = field(default_factory=list)
    pixels: list[torch.Tensor] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class _Model(nn.Module):
    """An EfficientNet split at a stage: a frozen trunk (stem + first stages) whose output is
    computed once per augmented view and cached, the trained rest of the backbone (pooled
    features: the embedding), and one linear head per field."""

    def __init__(
        self, backbone: nn.Module, classes: Sequence[Sequence[str]], freeze_blocks: int
    ) -> None:
        super().__init__()
        if not 0 <= freeze_blocks < len(backbone.blocks):
            raise ValueError(
                f"freeze_blocks must be 0..{len(backbone.blocks) - 1}, got {freeze_blocks}"
            )
        self.backbone = backbone
        self.split = freeze_blocks
        self.trunk = nn.Sequential(
            backbone.conv_stem, backbone.bn1, *backbone.blocks[:freeze_blocks]
        )
        self.trunk.requires_grad_(False)
        self.dropout = nn.Dropout(0.2)
        self.heads = nn.ModuleList(nn.Linear(backbone.num_features, len(c)) for c in classes)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def rest(self, z: torch.Tensor) -> torch.Tensor:
        """Trunk output → pooled features."""
        b = self.backbone
        return b.forward_head(b.bn2(b.conv_head(b.blocks[self.split :](z))))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = self.rest(z)
        dropped = self.dropout(features)
        return features, [head(dropped) for head in self.heads]


def pretrained_backbone(start: str) -> tuple[nn.Module, str, str]:
    """(backbone without classifier, timm model id, weights id) of a pretrained encoder."""
    if start not in START_ENCODERS:
        raise EncoderError(
            f"training starts from one of {', '.join(START_ENCODERS)}, got {start!r}"
        )
    path = packaged_weights_path(start)
    model = load_packaged(start, path)
    model.reset_classifier(0)
    return model, TIMM_MODELS[start].model_id, file_id(path)


@torch.inference_mode()
def _trunk_features(
    model: _Model,
    pixels: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor],
    device: str,
    batch_size: int,
    on_batch: Callable[[int], None],
) -> torch.Tensor:
    """The frozen trunk's output for every image (after `transform`), as float16 on the CPU."""
    model.trunk.eval()
    chunks = []
    for start in range(0, len(pixels), batch_size):
        x = transform(pixels[start : start + batch_size]).to(device)
        chunks.append(model.trunk(x).to("cpu", torch.float16))
        on_batch(len(x))
    return torch.cat(chunks)


def supervised_contrastive(
    features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """SupCon (Khosla et al. 2020) on L2-normalised features: pulls same-label images together
    in the very space the neighbours are searched in. Labels < 0 are ignored."""
    z = F.normalize(features, dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~self_mask & (labels >= 0)[:, None]
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    count = positives.sum(dim=1)
    valid = count > 0
    if not valid.any():
        return features.new_zeros(())
    summed = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
    return -(summed[valid] / count[valid]).mean()


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


@dataclass
class FitResult:
    """The epoch loop's result: per-epoch curves and the best epoch (whose weights the model
    holds after `fit`)."""

    curves: list[dict[str, Any]]
    best: dict[str, Any]
    seconds: float


def check_options(options: TrainOptions) -> None:
    """Reject counts below 1 and an unknown starting backbone before any image is read."""
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
    if not val_set:
        raise TrainingRefused("no validation images: give a validation split or --val-fraction")
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


def build_model(
    options: TrainOptions, classes: Sequence[Sequence[str]], device: str
) -> tuple[_Model, dict[str, Any]]:
    """The pretrained backbone split at `freeze_blocks` with one head per field, and what the
    saved config records of it (timm model, start weights, mean/std)."""
    backbone, timm_model, start_weights = pretrained_backbone(options.start)
    data_config = timm.data.resolve_data_config({}, model=backbone)
    model = _Model(backbone, classes, options.freeze_blocks).to(device)
    return model, {
        "timm_model": timm_model,
        "start_weights_id": start_weights,
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
    }


def cache_trunk_features(
    model: _Model,
    data: TrainingData,
    options: TrainOptions,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    device: str,
    on_batch: Callable[[int], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(views, validation views): the frozen trunk's output for `options.views` augmented
    copies of every training image, and for every validation image as it is (and mirrored,
    with `tta_hflip`: the encoder averages both).

    The frozen trunk costs most of the compute (it runs at the highest resolutions), so it
    runs once per augmented view instead of once per epoch."""
    augment = UltrasoundAugment(hflip=options.hflip)
    views = torch.stack(
        [
            _trunk_features(
                model,
                data.pixels[data.train_idx],
                lambda batch: normalise(augment(batch, generator), mean, std),
                device,
                options.batch_size,
                on_batch,
            )
            for _ in range(options.views)
        ]
    )
    val_views = plain_trunk_features(
        model, data.pixels[data.val_idx], options, mean, std, device, on_batch
    )
    return views, val_views


def plain_trunk_features(
    model: _Model,
    pixels: torch.Tensor,
    options: TrainOptions,
    mean: Sequence[float],
    std: Sequence[float],
    device: str,
    on_batch: Callable[[int], None],
) -> torch.Tensor:
    """(passes, images, ...): the frozen trunk's output for images as the saved encoder will
    see them: as they are, and mirrored too with `tta_hflip`."""
    return torch.stack(
        [
            _trunk_features(
                model,
                pixels,
                lambda batch, mirror=mirror: normalise(
                    batch.flip(-1) if mirror else batch, mean, std
                ),
                device,
                options.batch_size,
                on_batch,
            )
            for mirror in ((False, True) if options.tta_hflip else (False,))
        ]
    )


def make_optimizer(
    model: _Model, options: TrainOptions
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (heads learn 10x faster: they start from scratch) with a cosine schedule."""
    optimizer = torch.optim.AdamW(
        [
            {"params": model.trainable(), "lr": options.lr},
            {"params": model.heads.parameters(), "lr": options.lr * 10},
        ],
        weight_decay=options.weight_decay,
    )
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.epochs)


def train_epoch(
    model: _Model,
    optimizer: torch.optim.Optimizer,
    views: torch.Tensor,
    train_y: torch.Tensor,
    options: TrainOptions,
    generator: torch.Generator,
    device: str,
) -> list[float]:
    """One pass over the training images in a random order, each from a random cached view;
    the loss of every batch."""
    model.train()
    model.trunk.eval()
    count = views.shape[1]
    permutation = torch.randperm(count, generator=generator)
    view_of = torch.randint(options.views, (count,), generator=generator)
    losses = []
    for start in range(0, len(permutation), options.batch_size):
        chosen = permutation[start : start + options.batch_size]
        if len(chosen) < 2:
            continue  # batch norm needs two images
        z = views[view_of[chosen], chosen].float().to(device)
        y = train_y[chosen].to(device)
        features, logits = model(z)
        loss = sum(
            F.cross_entropy(
                out, y[:, j], ignore_index=-100, label_smoothing=options.label_smoothing
            )
            for j, out in enumerate(logits)
        )
        if options.metric_weight > 0:
            loss = loss + options.metric_weight * sum(
                supervised_contrastive(features, y[:, j]) for j in range(y.shape[1])
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def fit(
    model: _Model,
    data: TrainingData,
    views: torch.Tensor,
    val_views: torch.Tensor,
    options: TrainOptions,
    generator: torch.Generator,
    device: str,
    progress: TrainingProgress,
    on_progress: Callable[[TrainingProgress], None],
    labelled_views: torch.Tensor | None = None,
) -> FitResult:
    """Train epoch after epoch, validate after each, stop after `patience` epochs without a
    better validation score (`options.select_by`; ties: lower loss), and leave the best
    epoch's weights loaded.

    `labelled_views` (`plain_trunk_features` of the training images) are the neighbours the
    product's vote is scored with; `select_by="neighbours"` needs them."""
    criterion = SELECTION_SCORES[options.select_by]
    if options.select_by == "neighbours" and labelled_views is None:
        raise ValueError("select_by='neighbours' needs the training images' trunk features")
    labelled = None if labelled_views is None else (labelled_views, data.train_y)
    optimizer, scheduler = make_optimizer(model, options)
    curves: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    epochs_without_gain = 0
    started = time.monotonic()
    progress.stage, progress.total, progress.done = "training", options.epochs, 0
    on_progress(progress)
    for epoch in range(1, options.epochs + 1):
        epoch_started = time.monotonic()
        losses = train_epoch(model, optimizer, views, data.train_y, options, generator, device)
        scheduler.step()
        scores = _validate(
            model,
            val_views,
            data.val_y,
            data.classes,
            data.fields,
            device,
            labelled=labelled,
            options=options,
        )
        seconds = time.monotonic() - epoch_started
        curves.append(
            {
                "epoch": epoch,
                "loss": round(float(np.mean(losses)), 4),
                "seconds": round(seconds, 1),
                **scores,
            }
        )
        improved = best is None or (scores[criterion], -scores["val_loss"]) > (
            best[criterion],
            -best["val_loss"],
        )
        if improved:
            best = curves[-1]
            best_state = copy.deepcopy(model.state_dict())
            epochs_without_gain = 0
        else:
            epochs_without_gain += 1
        progress.epoch = progress.done = epoch
        progress.loss = curves[-1]["loss"]
        progress.val_accuracy = scores["val_accuracy"]
        progress.eta_s = round(seconds * (options.epochs - epoch), 1)
        progress.stage = (
            f"epoch {epoch}/{options.epochs}: loss {progress.loss:.3f}, "
            f"val acc {scores['val_accuracy']:.3f}"
        )
        if labelled is not None:
            progress.stage += f", neighbours' vote {scores['val_neighbour_vote_accuracy']:.3f}"
        on_progress(progress)
        log.info("epoch", extra={k: v for k, v in curves[-1].items() if k != "val_fields"})
        if epochs_without_gain >= options.patience:
            break
    assert best is not None and best_state is not None
    model.load_state_dict(best_state)
    return FitResult(curves, best, time.monotonic() - started)


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
            else "patient-disjoint"
            if any(s.group for s in samples)
            else "stratified random"
        ),
        "curves": result.curves,
        "best_epoch": result.best["epoch"],
        # The curves' score that picked the best epoch and drove the early stopping.
        "selected_by": {"option": options.select_by, "score": SELECTION_SCORES[options.select_by]},
        "stopped_early": len(result.curves) < options.epochs,
        "validation": result.best,
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
    frozen trunk, heads), cache the frozen trunk's features, fit (the epoch loop with
    validation and early stopping), save. Raises TrainingRefused when a class has fewer than
    `options.min_per_class` images."""
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
    path = _save(encoders_dir, name, model, config, report)
    summary = {
        "encoder": encoder_name(path.name),
        "path": str(path),
        "best_epoch": result.best["epoch"],
        "epochs_run": len(result.curves),
        "val_accuracy": result.best["val_accuracy"],
        "selected_by": options.select_by,
        "val_selection_score": result.best[SELECTION_SCORES[options.select_by]],
        "val_fields": result.best["val_fields"],
        "class_counts": report["class_counts"],
        "validation_split": report["validation_split"],
        "failed_images": len(data.loaded.failed),
        "timing_s": report["timing_s"],
    }
    progress.stage = "saved"
    on_progress(progress)
    return summary


@torch.inference_mode()
def _validate(
    model: _Model,
    trunk_views: torch.Tensor,
    y: torch.Tensor,
    classes: Sequence[Sequence[str]],
    fields: Sequence[str],
    device: str,
    *,
    labelled: tuple[torch.Tensor, torch.Tensor] | None = None,
    options: TrainOptions = TrainOptions(),
    batch_size: int = 64,
) -> dict[str, Any]:
    """Head accuracy and loss per field on the validation images, and their mean; with
    `labelled` (the training images' plain trunk views and targets), also the product's vote
    of the training images for every validation image (`neighbour_vote_scores`).

    `trunk_views` is (views, images, ...): an image's features are the mean over its views
    (itself, and its mirror with test-time mirror averaging), as the saved encoder embeds."""
    model.eval()
    features = _embed(model, trunk_views, device, batch_size)
    embeddings = F.normalize(features, dim=1)
    knn = knn_vote_accuracy(embeddings, y)
    neighbour: list[tuple[float, float] | None] = [None] * len(fields)
    neighbour_s = None
    if labelled is not None:
        started = time.monotonic()
        labelled_features = _embed(model, labelled[0], device, batch_size)
        neighbour = neighbour_vote_scores(
            F.normalize(labelled_features, dim=1),
            labelled[1],
            embeddings,
            y,
            classes,
            fields,
            top_k=options.vote_top_k,
            min_neighbours=options.vote_min_neighbours,
            min_score=options.vote_min_score,
        )
        neighbour_s = time.monotonic() - started
    per_field: dict[str, Any] = {}
    losses, accuracies = [], []
    for j, name in enumerate(fields):
        logits, target = model.heads[j](features.to(device)).float().cpu(), y[:, j]
        known = target >= 0
        loss = float(F.cross_entropy(logits[known], target[known]))
        predicted = logits[known].argmax(dim=1)
        accuracy = float((predicted == target[known]).float().mean())
        recall = {
            cls: round(float((predicted[target[known] == c] == c).float().mean()), 4)
            for c, cls in enumerate(classes[j])
            if bool((target[known] == c).any())
        }
        per_field[name] = {
            "accuracy": round(accuracy, 4),
            "loss": round(loss, 4),
            "recall": recall,
            "knn_vote_accuracy": knn[j],
        }
        if labelled is not None:
            scored = neighbour[j]
            per_field[name]["neighbour_vote_accuracy"] = None if scored is None else scored[0]
            per_field[name]["neighbour_vote_coverage"] = None if scored is None else scored[1]
        losses.append(loss)
        accuracies.append(accuracy)
    scores: dict[str, Any] = {
        "val_loss": round(float(np.mean(losses)), 4),
        "val_accuracy": round(float(np.mean(accuracies)), 4),
        "val_knn_vote_accuracy": round(float(np.mean([a for a in knn if a is not None])), 4),
    }
    if labelled is not None:
        voted = [v for v in neighbour if v is not None]
        scores["val_neighbour_vote_accuracy"] = round(float(np.mean([a for a, _ in voted])), 4)
        scores["val_neighbour_vote_coverage"] = round(float(np.mean([c for _, c in voted])), 4)
        scores["neighbour_s"] = round(float(neighbour_s or 0.0), 2)
    return {**scores, "val_fields": per_field}


def _embed(model: _Model, trunk_views: torch.Tensor, device: str, batch_size: int) -> torch.Tensor:
    """Pooled features (float32, CPU) of every image: the mean over its (views, images, ...)
    trunk views, as the saved encoder embeds (before the L2 normalisation)."""
    chunks = []
    for start in range(0, trunk_views.shape[1], batch_size):
        chunks.append(
            torch.stack(
                [model.rest(v[start : start + batch_size].float().to(device)) for v in trunk_views]
            )
            .mean(dim=0)
            .float()
            .cpu()
        )
    return torch.cat(chunks)


def neighbour_votes(
    labelled: torch.Tensor,
    labels: Sequence[Mapping[str, str]],
    queries: torch.Tensor,
    fields: Sequence[str],
    *,
    top_k: int,
    min_neighbours: int,
    min_score: float,
) -> list[dict[str, FieldVote]]:
    """The vote the product makes for each query (rows L2-normalised): its `top_k` most
    similar labelled rows, each with its `labels`, voted by `echolabel.vote`."""
    sims, indices = (queries @ labelled.T).topk(min(top_k, len(labelled)), dim=1)
    return [
        vote(
            [
                Neighbour(task=int(i), similarity=float(s), labels=labels[int(i)])
                for s, i in zip(sims[row], indices[row], strict=True)
            ],
            fields,
            min_neighbours=min_neighbours,
            min_score=min_score,
        )
        for row in range(len(queries))
    ]


def neighbour_vote_scores(
    labelled: torch.Tensor,
    labelled_y: torch.Tensor,
    queries: torch.Tensor,
    query_y: torch.Tensor,
    classes: Sequence[Sequence[str]],
    fields: Sequence[str],
    *,
    top_k: int,
    min_neighbours: int,
    min_score: float,
) -> list[tuple[float, float] | None]:
    """Per field, (accuracy, coverage) of the vote the product makes: each query (row,
    L2-normalised) voted by its `top_k` most similar labelled rows with `echolabel.vote` and
    the given minimum support and share, an abstention counting as a miss; None for a field
    no query is labelled for. Targets are class indices, < 0 where an image has no label."""
    labels = [
        {name: classes[j][int(row[j])] for j, name in enumerate(fields) if row[j] >= 0}
        for row in labelled_y
    ]
    outcomes = neighbour_votes(
        labelled,
        labels,
        queries,
        fields,
        top_k=top_k,
        min_neighbours=min_neighbours,
        min_score=min_score,
    )
    out: list[tuple[float, float] | None] = []
    for j, name in enumerate(fields):
        known = [row for row in range(len(queries)) if query_y[row, j] >= 0]
        if not known:
            out.append(None)
            continue
        chosen = [outcomes[row][name].label for row in known]
        truth = [classes[j][int(query_y[row, j])] for row in known]
        correct = sum(c == t for c, t in zip(chosen, truth, strict=True))
        voted = sum(c is not None for c in chosen)
        out.append((round(correct / len(known), 4), round(voted / len(known), 4)))
    return out


def knn_vote_accuracy(embeddings: torch.Tensor, y: torch.Tensor, k: int = 10) -> list[float | None]:
    """Per field: how often the similarity-weighted vote of an image's k nearest other
    validation images is its label (leave-one-out within the validation split): the
    embedding's own quality, which the heads' accuracy only approximates."""
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(float("-inf"))
    k = min(k, len(embeddings) - 1)
    sims, indices = similarity.topk(k, dim=1)
    out = []
    for j in range(y.shape[1]):
        labels = y[:, j]
        known = labels >= 0
        if not known.any():
            out.append(None)  # no validation image has this field
            continue
        votes = torch.zeros(len(labels), int(labels.max()) + 1)
        neighbour = labels[indices]
        weights = sims.clamp(min=0) * (neighbour >= 0)
        votes.scatter_add_(1, neighbour.clamp(min=0), weights)
        out.append(round(float((votes.argmax(dim=1) == labels)[known].float().mean()), 4))
    return out


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


def _save(
    encoders_dir: Path,
    name: str,
    model: _Model,
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


__all__ = ["TrainOptions", "TrainingProgress", "TrainingRefused", "train_encoder"]
