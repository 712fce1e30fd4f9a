"""Encoders trained on a project's own labels (`echolabel train-encoder`), loaded by name.

The registry loads `<artefacts>/encoders/<name>-v<N>/` (its files: trained_files.py) as
`trained:<name>-v<N>`; the embedding is the backbone's pooled features, L2-normalised, with the
preprocessing training used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torchvision.transforms.v2 import functional as tvf

from echolabel.encoders.base import (
    EncoderError,
    embed_in_batches,
    file_id,
    register_encoder_family,
)
from echolabel.encoders.trained_files import (
    BACKBONE_PREFIX,
    PREFIX,
    WEIGHTS_FILE,
    encoder_dir,
    encoder_name,
    read_config,
)


def resize_crop(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image as a (3, size, size) uint8 tensor: shorter side to `size`, centre crop.

    Training caches this and augments from it; embedding normalises it. One code path, so the
    encoder sees at inference exactly the geometry it was trained on."""
    tensor = tvf.pil_to_tensor(image.convert("RGB"))
    tensor = tvf.resize(tensor, [size], interpolation=tvf.InterpolationMode.BICUBIC, antialias=True)
    return tvf.center_crop(tensor, [size, size])


def normalise(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or [0, 1] float images (…, 3, H, W) → the backbone's normalised input."""
    if batch.dtype == torch.uint8:
        batch = batch.float() / 255.0
    mean_t = torch.tensor(mean, dtype=batch.dtype, device=batch.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=batch.dtype, device=batch.device).view(3, 1, 1)
    return (batch - mean_t) / std_t


def build_backbone(timm_model: str) -> nn.Module:
    """The backbone architecture without classifier (pooled features), randomly initialised."""
    return timm.create_model(timm_model, pretrained=False, num_classes=0)


class TrainedEncoder:
    """Encoder over a backbone fine-tuned by `echolabel train-encoder`."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        config: dict[str, Any],
        *,
        weights_id: str,
        device: str,
        batch_size: int,
    ) -> None:
        self.name = name
        self.config = config
        self.model = model.eval().requires_grad_(False).to(device)
        self.dim: int = model.num_features
        self.weights_id = weights_id
        self.device = device
        self.batch_size = batch_size
        self.input_size = int(config["input_size"])
        self.input_side = self.input_size  # resize_crop's shorter side: draft decoding's floor
        self.mean, self.std = config["mean"], config["std"]
        # Encoders saved before the option existed embed the image alone.
        self.tta_hflip = bool(config.get("tta_hflip", False))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return normalise(resize_crop(image, self.input_size), self.mean, self.std)

    def pooled(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled features of a preprocessed batch; with test-time mirror averaging, the mean
        of the features of each image and of its mirror (as training validated them)."""
        features = self.model(batch)
        if self.tta_hflip:
            features = (features + self.model(batch.flip(-1))) / 2
        return features

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Return an (n, dim) float32 array of L2-normalised pooled features."""
        return embed_in_batches(
            images,
            preprocess=self.preprocess,
            forward=self.pooled,
            dim=self.dim,
            device=self.device,
            batch_size=self.batch_size,
        )


def load_trained(path: Path, device: str = "cpu", batch_size: int = 16) -> TrainedEncoder:
    """Load the trained encoder saved in directory `path`."""
    config = read_config(path)
    weights = path / WEIGHTS_FILE
    model = build_backbone(config["backbone"]["timm_model"])
    try:
        tensors = load_file(str(weights))
        backbone = {
            key[len(BACKBONE_PREFIX) :]: value
            for key, value in tensors.items()
            if key.startswith(BACKBONE_PREFIX)
        }
        model.load_state_dict(backbone, strict=True)
    except (RuntimeError, OSError, ValueError) as exc:
        raise EncoderError(f"could not load trained encoder weights {weights}: {exc}") from exc
    if model.num_features != config["dim"]:
        raise EncoderError(f"{weights}: {model.num_features} features, config says {config['dim']}")
    return TrainedEncoder(
        encoder_name(path.name),
        model,
        config,
        weights_id=file_id(weights),
        device=device,
        batch_size=batch_size,
    )


@register_encoder_family(PREFIX)
def _trained(
    member: str, encoders_dir: Path, weights_dir: Path, device: str, batch_size: int
) -> TrainedEncoder:
    return load_trained(encoder_dir(member, encoders_dir), device, batch_size)
