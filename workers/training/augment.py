"""Augmentation suited to ultrasound: small affine moves of the probe, gain and gamma of the
display; no colour jitter (greyscale data), no blur or noise (speckle is signal), no crop that
could cut the finding out of the sector."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class UltrasoundAugment:
    """Random per-image augmentation of a uint8 batch (n, 3, H, W) → float batch in [0, 1].

    One batched affine resampling (affine_grid + grid_sample) for all images: per-image calls
    cost more than the network's forward pass on a busy CPU."""

    degrees: float = 5.0
    translate: float = 0.05  # fraction of the side
    scale: tuple[float, float] = (0.9, 1.1)
    gain: tuple[float, float] = (0.8, 1.25)  # overall brightness (TGC / gain knob)
    gamma: tuple[float, float] = (0.8, 1.25)  # display curve
    hflip: bool = True  # mirrored probe orientation; off where left/right carries the label

    @classmethod
    def scaled(cls, strength: float, *, hflip: bool = True) -> UltrasoundAugment:
        """The default ranges widened (or narrowed) by `strength`: angle, shift and the log of
        the zoom, gain and gamma factors all scale with it; 0 leaves only the mirror."""
        base = cls()

        def around_one(bounds: tuple[float, float]) -> tuple[float, float]:
            low, high = bounds
            return (math.exp(strength * math.log(low)), math.exp(strength * math.log(high)))

        return cls(
            degrees=base.degrees * strength,
            translate=base.translate * strength,
            scale=around_one(base.scale),
            gain=around_one(base.gain),
            gamma=around_one(base.gamma),
            hflip=hflip,
        )

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = batch.shape[0]
        u = torch.rand(n, 7, generator=generator)
        angle = (2 * u[:, 0] - 1) * math.radians(self.degrees)
        scale = self.scale[0] + u[:, 1] * (self.scale[1] - self.scale[0])
        flip = torch.where((u[:, 2] < 0.5) & self.hflip, -1.0, 1.0)
        # affine_grid maps output to input coordinates: zooming in by `scale` divides them.
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
        theta[:, :, 2] = (2 * u[:, 3:5] - 1) * self.translate * 2  # grid spans [-1, 1]
        values = batch.float() / 255.0
        grid = F.affine_grid(theta, list(values.shape), align_corners=False)
        moved = F.grid_sample(values, grid, mode="bilinear", align_corners=False)
        gain = self.gain[0] + u[:, 5] * (self.gain[1] - self.gain[0])
        gamma = self.gamma[0] + u[:, 6] * (self.gamma[1] - self.gamma[0])
        return (moved * gain.view(n, 1, 1, 1)).clamp_(0.0, 1.0).pow_(gamma.view(n, 1, 1, 1))
