"""DreamSim (ensemble of DINO, CLIP and OpenCLIP ViT-B/16 with LoRA): a perceptual embedding.

The dreamsim package downloads whatever is missing from its cache directory (GitHub releases,
then torch hub for DINO's code and weights). We check every file it reads first, so an offline
machine gets WeightsMissingError at once instead of a download attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from echolabel.encoders.base import (
    EncoderError,
    WeightsMissingError,
    embed_in_batches,
    file_id,
    register_encoder,
)

DREAMSIM_TYPE = "ensemble"
DREAMSIM_SOURCE = (
    "github.com/ssundaram21/dreamsim releases (dreamsim_ensemble_checkpoint.zip) "
    "and torch hub facebookresearch/dino"
)

# What dreamsim(dreamsim_type="ensemble") reads from its cache_dir. The first four come from
# the release zip; DINO ViT-B/16 itself is built through torch hub, whose code and weights
# dreamsim fetches into the same directory (it sets torch hub's dir to cache_dir).
_REQUIRED_FILES = (
    "dino_vitb16_pretrain.pth",
    "clip_vitb16_pretrain.pth.tar",
    "open_clip_vitb16_pretrain.pth.tar",
    "ensemble_lora/adapter_config.json",
    "facebookresearch_dino_main/hubconf.py",
    "checkpoints/dino_vitbase16_pretrain.pth",
)
# peft accepts either name for the LoRA weights.
_ADAPTER_FILES = ("ensemble_lora/adapter_model.safetensors", "ensemble_lora/adapter_model.bin")


def dreamsim_cache_dir(weights_dir: Path) -> Path:
    """The directory DreamSim's weights live in, inside the echolabel weights directory."""
    return weights_dir / "dreamsim"


def dreamsim_files(cache_dir: Path) -> list[Path]:
    """Every file the DreamSim ensemble needs, with the LoRA weights as the last entry.

    The LoRA weights may be .safetensors or .bin; the one present is listed, else .safetensors.
    """
    adapter = next(
        (cache_dir / name for name in _ADAPTER_FILES if (cache_dir / name).is_file()),
        cache_dir / _ADAPTER_FILES[0],
    )
    return [cache_dir / name for name in _REQUIRED_FILES] + [adapter]


def missing_dreamsim_files(cache_dir: Path) -> list[Path]:
    """The files from `dreamsim_files` that are not there."""
    return [path for path in dreamsim_files(cache_dir) if not path.is_file()]


def build_dreamsim(cache_dir: Path, device: str) -> tuple[Any, Any]:
    """Call dreamsim() on `cache_dir` (it downloads anything missing): (model, preprocess).

    dreamsim changes torch hub's global directory; it is restored so other code is unaffected.
    """
    from dreamsim import dreamsim  # imports peft and open_clip: seconds, so only when needed

    previous_hub_dir = torch.hub.get_dir()
    try:
        return dreamsim(
            pretrained=True, cache_dir=str(cache_dir), device=device, dreamsim_type=DREAMSIM_TYPE
        )
    finally:
        torch.hub.set_dir(previous_hub_dir)


class DreamSimEncoder:
    """Encoder over DreamSim's embedding (mean-centred by DreamSim, then L2-normalised)."""

    name = "dreamsim"

    def __init__(
        self, model: Any, preprocess: Any, *, weights_id: str, device: str, batch_size: int
    ) -> None:
        self.model = model
        self._preprocess = preprocess
        # The sum of the three backbones' feature sizes: 768 + 512 + 512 = 1792 for the ensemble.
        self.dim: int = model.get_base_model().embed_size
        self.weights_id = weights_id
        self.device = device
        self.batch_size = batch_size
        self.input_side = 224  # DreamSim's preprocess resizes every image to 224 × 224

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Return an (n, dim) float32 array of L2-normalised DreamSim embeddings."""
        return embed_in_batches(
            images,
            # DreamSim's preprocess resizes to 224x224 and returns a (1, 3, H, W) tensor in [0, 1];
            # the model normalises per backbone itself.
            preprocess=lambda image: self._preprocess(image)[0],
            forward=self.model.embed,
            dim=self.dim,
            device=self.device,
            batch_size=self.batch_size,
        )


@register_encoder("dreamsim")
def _dreamsim(weights_dir: Path, device: str, batch_size: int) -> DreamSimEncoder:
    cache_dir = dreamsim_cache_dir(weights_dir)
    missing = missing_dreamsim_files(cache_dir)
    if missing:
        raise WeightsMissingError("dreamsim", missing, weights_dir, source=DREAMSIM_SOURCE)
    try:
        model, preprocess = build_dreamsim(cache_dir, device)
    # dreamsim, peft and torch hub raise many kinds of errors on a corrupt or partial cache.
    except Exception as exc:
        raise EncoderError(f"could not load DreamSim from {cache_dir}: {exc}") from exc
    # The LoRA adapter is what makes DreamSim DreamSim; its hash tells weight versions apart.
    adapter = dreamsim_files(cache_dir)[-1]
    return DreamSimEncoder(
        model, preprocess, weights_id=file_id(adapter), device=device, batch_size=batch_size
    )
