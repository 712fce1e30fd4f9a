"""Pixel metrics of retrieved sets (Takacs Tables 6–8), on hand-made thumbnails."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from workers.evaluation.pixels import histogram_similarity, mse, pixel_metrics, thumbnail


def test_histogram_similarity_and_mse_extremes():
    black, white = np.zeros((64, 64), np.uint8), np.full((64, 64), 255, np.uint8)
    assert histogram_similarity(black, black) == 1.0 and mse(black, black) == 0.0
    assert histogram_similarity(black, white) == 0.0 and mse(black, white) == 1.0
    half = np.zeros((64, 64), np.uint8)
    half[:32] = 255  # half black, half white: shares half its histogram with black
    assert histogram_similarity(black, half) == pytest.approx(0.5)
    assert mse(black, half) == pytest.approx(0.5)


def test_thumbnail_is_grey_64():
    assert thumbnail(Image.new("RGB", (300, 200), (10, 200, 30))).shape == (64, 64)


def test_retrieved_sets_against_random_sets():
    # Two identical dark images and two identical bright ones; each retrieves its twin.
    dark, bright = np.full((64, 64), 20, np.uint8), np.full((64, 64), 230, np.uint8)
    thumbs = np.stack([dark, dark, bright, bright])
    indices = np.array([[1], [0], [3], [2]])
    result = pixel_metrics(thumbs, indices, seed=1)
    assert result["retrieved"] == {"histogram_similarity": 1.0, "mse": 0.0}
    # A random other image is the twin 1 time in 3: expected similarity 1/3, MSE 2/3 × d².
    assert 0.0 <= result["random"]["histogram_similarity"] < 1.0
    assert result["random"]["mse"] > 0.0
    with pytest.raises(ValueError, match="two images"):
        pixel_metrics(thumbs[:1], indices[:1])
