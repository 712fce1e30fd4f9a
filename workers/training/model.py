"""The network training fine-tunes: a pretrained EfficientNet split at a stage into a frozen
trunk and a trained rest with one head per field, and the frozen trunk's cached output.

The stem and the first blocks stay frozen (generic edges and textures; freezing them saves
their backward pass and guards a small data set), so their output is computed once per
augmented view, not every epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import timm.data
import torch
from torch import nn

from echolabel.encoders.base import EncoderError, file_id
from echolabel.encoders.timm_encoders import TIMM_MODELS, load_packaged, packaged_weights_path
from echolabel.encoders.trained import normalise
from workers.training.augment import UltrasoundAugment
from workers.training.data import TrainingData
from workers.training.options import TrainOptions

# Backbones training can start from: the EfficientNets (stem, stages in `blocks`, head conv)
# whose weights ship with a package, so training works offline.
START_ENCODERS = tuple(name for name, spec in TIMM_MODELS.items() if spec.packaged)


class Model(nn.Module):
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


def build_model(
    options: TrainOptions, classes: Sequence[Sequence[str]], device: str
) -> tuple[Model, dict[str, Any]]:
    """The pretrained backbone split at `freeze_blocks` with one head per field, and what the
    saved config records of it (timm model, start weights, mean/std)."""
    backbone, timm_model, start_weights = pretrained_backbone(options.start)
    data_config = timm.data.resolve_data_config({}, model=backbone)
    model = Model(backbone, classes, options.freeze_blocks).to(device)
    return model, {
        "timm_model": timm_model,
        "start_weights_id": start_weights,
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
    }


@torch.inference_mode()
def _trunk_features(
    model: Model,
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


def cache_trunk_features(
    model: Model,
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
    augment = UltrasoundAugment.scaled(options.augment_strength, hflip=options.hflip)
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
    if not len(data.val_idx):
        return views, views[:, :0]  # no early-stopping split
    val_views = plain_trunk_features(
        model, data.pixels[data.val_idx], options, mean, std, device, on_batch
    )
    return views, val_views


def plain_trunk_features(
    model: Model,
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
