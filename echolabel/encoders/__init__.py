"""Encoder plug-ins: image → L2-normalised embedding, chosen by name from a registry.

The built-in encoders register themselves on the registry's first use (`available_encoders`,
`load_encoder`), which is when torch and timm are imported; `load_encoder(name)` builds one.
"""

from typing import Any

from echolabel.encoders.base import (
    DEFAULT_ENCODER,
    Encoder,
    EncoderError,
    WeightsMissingError,
    available_encoders,
    default_weights_dir,
    load_encoder,
    register_encoder,
    to_rgb,
)

# Names that need torch, imported when first asked for.
_LAZY = {
    "build_transform": "echolabel.encoders.timm_encoders",
    "create_timm_model": "echolabel.encoders.timm_encoders",
    "download_weights": "echolabel.encoders.weights",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_ENCODER",
    "Encoder",
    "EncoderError",
    "WeightsMissingError",
    "available_encoders",
    "build_transform",
    "create_timm_model",
    "default_weights_dir",
    "download_weights",
    "load_encoder",
    "register_encoder",
    "to_rgb",
]
