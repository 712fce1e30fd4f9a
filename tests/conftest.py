"""Shared fixtures: a tiny deterministic encoder, settings under tmp, and image helpers."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echolabel.settings import Settings
from workers.encoders import available_encoders, register_encoder

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_ENCODER = "tiny-test"


class TinyEncoder:
    """A centred 4×4 grey thumbnail as a 16-d vector: fast, deterministic, image-dependent.

    For protocol tests only; quality claims use the real encoders on real images.
    """

    name = TINY_ENCODER
    dim = 16
    weights_id = "none"
    device = "cpu"

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        rows = [
            np.asarray(im.convert("L").resize((4, 4)), dtype=np.float32).reshape(-1) / 255 - 0.5
            for im in images
        ]
        out = np.array(rows, dtype=np.float32).reshape(-1, self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-12)


if TINY_ENCODER not in available_encoders():
    register_encoder(TINY_ENCODER)(lambda weights_dir, device, batch_size: TinyEncoder())


def png_bytes(
    colour: int | tuple[int, int, int], size: tuple[int, int] = (32, 32), pattern: int = 0
) -> bytes:
    image = Image.new("RGB", size, colour)
    if pattern:  # a bright square whose place depends on `pattern`
        x = (pattern * 7) % (size[0] - 8)
        image.paste((255, 255, 255), (x, x, x + 8, x + 8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    images = tmp_path / "images"
    images.mkdir()
    return Settings(
        model_dir=tmp_path / "model",
        encoder=TINY_ENCODER,
        local_files_root=images,
        min_neighbours=2,
        min_score=0.5,
        max_image_bytes=200_000,
        max_image_pixels=1_000_000,
    )
