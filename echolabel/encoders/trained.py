"""Encoders trained on a project's own labels (`echolabel train-encoder`), loaded by name.

Each one is a directory `MODEL_DIR/encoders/<name>-v<N>/` holding `weights.safetensors`
(the fine-tuned backbone and its classification heads), `config.json` (backbone, input size,
normalisation, fields and classes, the training images) and `report.json` (class counts,
curves, validation metrics). The registry loads it as `trained:<name>-v<N>`; the embedding is
the backbone's pooled features, L2-normalised, with the preprocessing training used.
"""

from __future__ import annotations

import json
import re
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
    encoder_family,
    file_id,
    register_encoder_family,
)

PREFIX = "trained"
FORMAT = "echolabel-trained-encoder/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
REPORT_FILE = "report.json"
BACKBONE_PREFIX = "backbone."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def encoder_name(directory_name: str) -> str:
    """The registry name of a trained encoder directory (`busi-v1` → `trained:busi-v1`)."""
    return f"{PREFIX}:{directory_name}"


def is_trained(name: str) -> bool:
    """Whether `name` is a trained encoder (as opposed to a pretrained one)."""
    return encoder_family(name) == PREFIX


def check_base_name(name: str) -> str:
    """A base name for versioned directories: letters, digits, `_.-`, no `-v<N>` suffix."""
    if not _NAME.match(name) or re.search(r"-v\d+$", name):
        raise ValueError(
            f"encoder name {name!r}: expected letters, digits, '_', '.' or '-' "
            "(starting with a letter or digit), without a '-v<N>' version suffix"
        )
    return name


def next_version_dir(encoders_dir: Path, base: str) -> Path:
    """`<encoders_dir>/<base>-v<N+1>` where N is the highest version already there."""
    versions = [
        int(match.group(1))
        for path in encoders_dir.glob(f"{base}-v*")
        if (match := re.fullmatch(re.escape(base) + r"-v(\d+)", path.name))
    ]
    return encoders_dir / f"{base}-v{max(versions, default=0) + 1}"


def encoder_dir(member: str, encoders_dir: Path) -> Path:
    """The directory of trained encoder `member` (`busi-v1`), checked to exist."""
    if not _NAME.match(member):
        raise EncoderError(f"trained encoder name {member!r} is not a directory name")
    path = encoders_dir / member
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        known = ", ".join(encoder_name(p.name) for p in list_trained(encoders_dir)) or "none"
        raise EncoderError(
            f"trained encoder {member!r} not found: expected {path / CONFIG_FILE} and "
            f"{path / WEIGHTS_FILE} (trained encoders here: {known}); "
            "train one with `echolabel train-encoder`"
        )
    return path


def list_trained(encoders_dir: Path) -> list[Path]:
    """Every complete trained-encoder directory under `encoders_dir`, sorted by name."""
    if not encoders_dir.is_dir():
        return []
    return sorted(
        p
        for p in encoders_dir.iterdir()
        if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()
    )


def read_config(path: Path) -> dict[str, Any]:
    """The config.json of a trained encoder directory."""
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT:
        raise EncoderError(f"{path / CONFIG_FILE}: expected format {FORMAT!r}")
    return config


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
def _trained(member: str, encoders_dir: Path, device: str, batch_size: int) -> TrainedEncoder:
    return load_trained(encoder_dir(member, encoders_dir), device, batch_size)
