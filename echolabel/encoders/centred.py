"""Pretrained encoders centred on a project's own images (`centred:<name>-v<N>`), by name.

Images of one modality share much of a pretrained encoder's features (a BUSI image's 10th
nearest neighbour is still at 0.78 cosine similarity). Subtracting the mean of the project's
embeddings and normalising again leaves what tells its images apart: on BUSI's validation
folds the frozen EfficientNet-Lite0/1/2 vote gained 13 to 36 images of 624, encoders trained
on the labels none (docs/evaluation.md, "Centring the embeddings"). The centre uses no label.

A centred encoder is a directory `<artefacts>/encoders/<name>-v<N>/` holding `centre.json`:
the pretrained encoder it is built on, that encoder's weights id, the centre and the number of
images it was fitted on. Its weights id is the file's, so vectors of another centre are told
apart as those of other weights are.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from echolabel.encoders.base import (
    Encoder,
    EncoderError,
    file_id,
    load_encoder,
    register_encoder_family,
)
from echolabel.encoders.trained_files import next_version_dir
from echolabel.settings import Settings

PREFIX = "centred"
FORMAT = "echolabel-centred-encoder/1"
CENTRE_FILE = "centre.json"


def centre_rows(vectors: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Rows minus the centre, L2-normalised again (float32)."""
    shifted = np.asarray(vectors, dtype=np.float32) - np.asarray(centre, dtype=np.float32)
    norms = np.linalg.norm(shifted, axis=1, keepdims=True)
    return (shifted / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def uncentre_rows(vectors: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The base encoder's unit rows back from centred ones: u = c + s·x with |u| = 1, where
    s = |u - c| > 0 is the positive root of s² + 2s(c·x) + |c|² - 1 = 0 (|c| < 1, the mean of
    unit rows). Similarity thresholds measured on the base encoder (near-duplicates) apply to
    these."""
    rows = np.asarray(vectors, dtype=np.float64)
    c = np.asarray(centre, dtype=np.float64)
    along = rows @ c
    s = -along + np.sqrt(np.maximum(along**2 - c @ c + 1.0, 0.0))
    return (c + s[:, None] * rows).astype(np.float32)


def fit_centre(vectors: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
    """The centre of a project's vectors: their mean. An (n, d) array, or rows one by one (a
    store's points, summed as they come: they need not fit in memory together)."""
    if isinstance(vectors, np.ndarray):
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(
                f"a centre needs at least one (n, d) vector, got shape {vectors.shape}"
            )
        return vectors.astype(np.float32, copy=False).mean(axis=0)
    total: np.ndarray | None = None
    count = 0
    for row in vectors:
        values = np.asarray(row, dtype=np.float64)
        total = values.copy() if total is None else total + values
        count += 1
    if total is None:
        raise ValueError("a centre needs at least one vector, got none")
    return (total / count).astype(np.float32)


def can_centre(encoder: str) -> bool:
    """Only a pretrained encoder is centred: a family member (`trained:…`, `centred:…`) is not,
    as a trained one gained nothing on validation and a centred one is centred already. Read
    from the name alone, so the backend's timer asks without importing any model."""
    return ":" not in encoder


def centres(settings: Settings, encoder: str, images: int) -> bool:
    """Whether the backend centres `encoder` for a project holding `images` embedded images
    (and `echolabel evaluate` measures it centred on as many)."""
    return settings.auto_centre and can_centre(encoder) and images >= settings.centre_min_images


class CentredEncoder:
    """A pretrained encoder whose embeddings point away from the project's centre."""

    def __init__(self, name: str, base: Encoder, centre: np.ndarray, weights_id: str) -> None:
        if centre.shape != (base.dim,):
            raise EncoderError(f"{name}: a centre of shape {centre.shape} for {base.dim}-d vectors")
        self.name = name
        self.base = base
        self.centre = centre.astype(np.float32)
        self.dim = base.dim
        self.weights_id = weights_id
        self.device = base.device
        # Draft decoding's floor (echolabel.embedding) is the base encoder's.
        self.input_side = getattr(base, "input_side", None)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        vectors = self.base.embed(images)
        return centre_rows(vectors, self.centre) if len(vectors) else vectors


def save_centred(
    encoders_dir: Path,
    base_name: str,
    *,
    start: str,
    start_weights_id: str,
    centre: np.ndarray,
    images: int,
    source: Mapping[str, Any],
) -> str:
    """Write `<encoders_dir>/<base_name>-v<N+1>/centre.json` (whole or not at all) and return
    the encoder's name, `centred:<base_name>-v<N+1>`."""
    if not can_centre(start):
        raise EncoderError(f"{start!r} is not a pretrained encoder: only those are centred")
    encoders_dir.mkdir(parents=True, exist_ok=True)
    path = next_version_dir(encoders_dir, base_name)
    path.mkdir()
    config = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "start": start,
        "start_weights_id": start_weights_id,
        "images": images,
        "source": dict(source),
        "centre": [float(x) for x in np.asarray(centre, dtype=np.float32)],
    }
    partial = path / (CENTRE_FILE + ".partial")
    partial.write_text(json.dumps(config))
    os.replace(partial, path / CENTRE_FILE)
    return f"{PREFIX}:{path.name}"


def _read(file: Path, name: str) -> dict[str, Any]:
    """A centred encoder's file, its centre as an array; EncoderError naming the file."""
    try:
        config = json.loads(file.read_text())
        config["centre"] = np.asarray(config["centre"], dtype=np.float32)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EncoderError(
            f"centred encoder {name!r}: cannot read {file} ({exc}); fit one with "
            "`echolabel centre-encoder --project P`"
        ) from None
    if config.get("format") != FORMAT:
        raise EncoderError(f"{file}: format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def centred_config(encoders_dir: Path, encoder: str) -> dict[str, Any] | None:
    """The saved file of encoder `encoder` when it is a centred one (None otherwise): its base
    encoder (`start`), the base's weights id and the centre. Read without loading any model."""
    prefix, sep, member = encoder.partition(":")
    if not sep or prefix != PREFIX:
        return None
    return _read(encoders_dir / member / CENTRE_FILE, encoder)


def load_centred(
    path: Path, weights_dir: Path, device: str = "cpu", batch_size: int = 16
) -> CentredEncoder:
    """Load the centred encoder saved in directory `path`, its base from `weights_dir`."""
    file = path / CENTRE_FILE
    config = _read(file, path.name)
    base = load_encoder(
        config["start"], weights_dir=weights_dir, device=device, batch_size=batch_size
    )
    if base.weights_id != config["start_weights_id"]:
        raise EncoderError(
            f"{file} was fitted on {config['start']} weights {config['start_weights_id']}, but "
            f"the weights here are {base.weights_id}: fit the centre again"
        )
    return CentredEncoder(f"{PREFIX}:{path.name}", base, config["centre"], file_id(file))


@register_encoder_family(PREFIX)
def _centred(
    member: str, encoders_dir: Path, weights_dir: Path, device: str, batch_size: int
) -> CentredEncoder:
    if "/" in member or member in ("", ".", ".."):
        raise EncoderError(f"centred encoder name {member!r} is not a directory name")
    return load_centred(encoders_dir / member, weights_dir, device, batch_size)
