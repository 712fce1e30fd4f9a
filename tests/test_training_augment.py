"""The training augmentation's strength knob (`TrainOptions.augment_strength`)."""

from __future__ import annotations

import pytest
import torch

from workers.training.augment import UltrasoundAugment


def test_strength_one_is_the_default() -> None:
    assert UltrasoundAugment.scaled(1.0) == UltrasoundAugment()


def test_strength_widens_every_range_on_a_log_scale() -> None:
    wide = UltrasoundAugment.scaled(2.0, hflip=False)
    assert wide.degrees == pytest.approx(10.0)
    assert wide.translate == pytest.approx(0.1)
    assert wide.scale == pytest.approx((0.81, 1.21))
    assert wide.gain == pytest.approx((0.64, 1.5625))
    assert wide.gamma == pytest.approx((0.64, 1.5625))
    assert wide.hflip is False


def test_strength_zero_without_mirror_leaves_the_pixels_as_they_are() -> None:
    batch = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    still = UltrasoundAugment.scaled(0.0, hflip=False)
    out = still(batch, torch.Generator().manual_seed(0))
    assert torch.allclose(out, batch.float() / 255.0, atol=1e-5)


def test_stronger_augmentation_moves_the_pixels_further() -> None:
    batch = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    plain = batch.float() / 255.0

    def moved(strength: float) -> float:
        augment = UltrasoundAugment.scaled(strength, hflip=False)
        out = augment(batch, torch.Generator().manual_seed(1))
        return float((out - plain).abs().mean())

    assert moved(0.5) < moved(1.0) < moved(2.0)
