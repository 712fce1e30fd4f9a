"""The training recipe (`TrainOptions`) and the validation scores `select_by` may pick the best
epoch by: a module of its own because every step of training reads it; it imports no torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from echolabel.settings import Settings

# What `select_by` may name, and the validation score (a key of each epoch's curve) it picks
# the best epoch by: the heads' accuracy, or the product's vote of the training images.
SELECTION_SCORES = {"head": "val_accuracy", "neighbours": "val_neighbour_vote_accuracy"}


@dataclass(frozen=True)
class TrainOptions:
    start: str = "efficientnet_lite0"  # pretrained encoder whose backbone is fine-tuned
    # With no early-stopping split (val_fraction 0), every epoch runs and the last is kept.
    epochs: int = 10
    # At least this many batches (optimiser steps): `epochs` rises on a small training set
    # (0: off; `epochs_for`).
    min_steps: int = 0
    patience: int = 3  # epochs without a better validation score before stopping
    batch_size: int = 32
    input_size: int = 160
    # The stem and this many first stages stay frozen. 4 (of 7) beat 5 on BUSI's validation
    # fold: product vote 0.802 vs 0.777, malignant recall 32/42 vs 29/42, no abstention
    # (docs/training.md, bench/recipe_validation.py).
    freeze_blocks: int = 4
    views: int = 4  # augmented views per image whose frozen features are computed once
    # Backbone; heads learn 10x faster (they start from scratch). 1e-3 beat 3e-4 in the
    # retraining loop's 200-label replay (mean right 0.644 vs 0.611 over 30 orders, +0.033 +-
    # 0.015, worse on 3) and on BUSI's 4 validation folds over 4 seeds (+0.013, malignant
    # recall higher with every seed) (docs/training.md, docs/retraining.md).
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    # Weight of the supervised-contrastive term (0: off). 0.5 beat 0 on the BUSI validation
    # split: kNN vote 0.86 vs 0.80, head accuracy 0.86 vs 0.83 (docs/training.md).
    metric_weight: float = 0.5
    # Share of the training images held out to pick the best epoch and stop early; 0: none,
    # all `epochs` run and the last is kept (rows marked validation are used all the same).
    # 0 with 6 epochs led on BUSI's 4 validation folds (product vote +0.016 +- 0.010) but
    # trailed in the 200-label replay of the retraining loop (mean right 0.611 vs 0.626 over
    # 10 seeds, worse on 3, better on 1): not kept (docs/training.md).
    val_fraction: float = 0.15
    hflip: bool = True
    # How far the training views move from the image (`UltrasoundAugment.scaled`): 1 is the
    # default's ±5°, ±5 % shift, zoom 0.9–1.1, gain and gamma 0.8–1.25.
    augment_strength: float = 1.0
    # Embed (and validate) each image as the mean of its features and its mirror's: the
    # encoder then sees one geometry whichever way the probe was held.
    tta_hflip: bool = False
    # Score and keep an exponential moving average of the weights with this half-life in
    # epochs instead of the live weights (0: off).
    ema_halflife_epochs: float = 0.0
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

    def batches_per_epoch(self, train_images: int) -> int:
        """Batches of `batch_size` in one pass over `train_images`, the last one partial."""
        return max(1, -(-train_images // self.batch_size))

    def epochs_for(self, train_images: int) -> int:
        """`epochs`, raised until `min_steps` batches pass over `train_images`: optimiser
        steps, but for a last batch of one image, which the epoch loop skips (batch norm needs
        two)."""
        return max(self.epochs, -(-self.min_steps // self.batches_per_epoch(train_images)))

    @classmethod
    def for_retraining(
        cls, settings: Settings, options: Mapping[str, Any] | None = None
    ) -> TrainOptions:
        """The recipe of the loop's challengers: `from_settings`, then `RETRAINING`, then the
        settings' ECHOLABEL_RETRAIN_OPTIONS and `options` over it, key by key."""
        return cls.from_settings(
            settings, {**RETRAINING, **settings.retrain_options, **(options or {})}
        )

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


# The loop's challengers train on 20-200 labels at first, where the early-stopping share would
# hold 3-30 images, too few to pick an epoch by (one round kept epoch 1 of 4 on 24): they run
# 6 epochs on every image instead. In BUSI's 200-label replay over 30 orders: right 0.731
# against 0.715 with early stopping (+0.016 +- 0.008), 12 orders at the bar against 5
# (docs/retraining.md, "Challengers trained on every image"). At 100-200 labels 6 epochs are
# only 18-30 optimiser steps: every challenger takes at least 96, what 6 epochs of a 500-image
# round take. Right 0.762 against 0.735 over 40 orders (+0.027 +- 0.006, better on 27, worse
# on 8): docs/retraining.md, "At least 96 optimiser steps".
RETRAINING: Mapping[str, Any] = {"val_fraction": 0.0, "epochs": 6, "min_steps": 96}
