"""The epoch loop: train on the frozen trunk's cached features, validate after every epoch, stop
early, and keep the best epoch's weights; without validation images, run every epoch and keep
the last."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from workers.training.data import TrainingData
from workers.training.model import Model
from workers.training.options import SELECTION_SCORES, TrainOptions
from workers.training.progress import TrainingProgress
from workers.training.validation import validate

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """The epoch loop's result: per-epoch curves and the best epoch (whose weights the model
    holds after `fit`)."""

    curves: list[dict[str, Any]]
    best: dict[str, Any]
    seconds: float


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


def make_optimizer(
    model: Model, options: TrainOptions
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
    model: Model,
    optimizer: torch.optim.Optimizer,
    views: torch.Tensor,
    train_y: torch.Tensor,
    options: TrainOptions,
    generator: torch.Generator,
    device: str,
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """One pass over the training images in a random order, each from a random cached view;
    the loss of every batch. `after_step` runs after every optimiser step."""
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
        if after_step is not None:
            after_step()
        losses.append(float(loss.detach()))
    return losses


def weight_average(
    model: Model, options: TrainOptions, steps_per_epoch: int
) -> AveragedModel | None:
    """An exponential moving average of the model's weights and batch-norm statistics whose
    half-life is `options.ema_halflife_epochs` epochs (None: off). Scored and kept instead of
    the live weights, it smooths the last steps' noise out of the chosen epoch."""
    if options.ema_halflife_epochs <= 0:
        return None
    decay = 0.5 ** (1 / (options.ema_halflife_epochs * max(steps_per_epoch, 1)))
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def fit(
    model: Model,
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
    epoch's weights loaded. Without validation images, every epoch runs and the last is
    kept.

    `labelled_views` (`plain_trunk_features` of the training images) are the neighbours the
    product's vote is scored with; `select_by="neighbours"` needs them."""
    criterion = SELECTION_SCORES[options.select_by]
    if options.select_by == "neighbours" and labelled_views is None:
        raise ValueError("select_by='neighbours' needs the training images' trunk features")
    labelled = None if labelled_views is None else (labelled_views, data.train_y)
    optimizer, scheduler = make_optimizer(model, options)
    averaged = weight_average(model, options, options.batches_per_epoch(views.shape[1]))
    scored = model if averaged is None else averaged.module
    after_step = None if averaged is None else (lambda: averaged.update_parameters(model))
    curves: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    epochs_without_gain = 0
    validating = bool(data.val_set)  # no validation images: every epoch runs, the last kept
    started = time.monotonic()
    progress.stage, progress.total, progress.done = "training", options.epochs, 0
    on_progress(progress)
    for epoch in range(1, options.epochs + 1):
        epoch_started = time.monotonic()
        losses = train_epoch(
            model, optimizer, views, data.train_y, options, generator, device, after_step
        )
        scheduler.step()
        scores = (
            validate(
                scored,
                val_views,
                data.val_y,
                data.classes,
                data.fields,
                device,
                labelled=labelled,
                options=options,
            )
            if validating
            else {}
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
        improved = (
            not validating
            or best is None
            or (scores[criterion], -scores["val_loss"]) > (best[criterion], -best["val_loss"])
        )
        if improved:
            best = curves[-1]
            # Without validation the last epoch is kept: no copy until the loop ends.
            best_state = copy.deepcopy(scored.state_dict()) if validating else None
            epochs_without_gain = 0
        else:
            epochs_without_gain += 1
        progress.epoch = progress.done = epoch
        progress.loss = curves[-1]["loss"]
        progress.val_accuracy = scores.get("val_accuracy")
        progress.eta_s = round(seconds * (options.epochs - epoch), 1)
        progress.stage = f"epoch {epoch}/{options.epochs}: loss {progress.loss:.3f}"
        if validating:
            progress.stage += f", val acc {scores['val_accuracy']:.3f}"
        if validating and labelled is not None:
            progress.stage += f", neighbours' vote {scores['val_neighbour_vote_accuracy']:.3f}"
        on_progress(progress)
        log.info("epoch", extra={k: v for k, v in curves[-1].items() if k != "val_fields"})
        if epochs_without_gain >= options.patience:
            break
    assert best is not None
    if best_state is None and averaged is not None:
        best_state = averaged.module.state_dict()  # no validation: the last average
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(curves, best, time.monotonic() - started)
