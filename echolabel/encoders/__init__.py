"""Encoder plug-ins: image → L2-normalised embedding, chosen by name from a registry.

Importing this package registers every encoder; `load_encoder(name)` builds one.
"""

from echolabel.encoders import dreamsim_encoder, timm_encoders, trained
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
from echolabel.encoders.timm_encoders import build_transform, create_timm_model
from echolabel.encoders.weights import download_weights

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
    "dreamsim_encoder",
    "load_encoder",
    "register_encoder",
    "timm_encoders",
    "to_rgb",
    "trained",
]
