from __future__ import annotations

import io

import numpy as np
from PIL import Image
from unetpp.server.encoders import bbox, mask_png, overlay_png, probabilities_npy, rle


def unrle(counts: list[int], shape: tuple[int, int]) -> np.ndarray:
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(shape)


def test_rle_round_trips_and_starts_with_background():
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 9)) > 0.5, np.ones((3, 4), bool), np.zeros((3, 4), bool)):
        counts = rle(mask)
        assert sum(counts) == mask.size
        np.testing.assert_array_equal(unrle(counts, mask.shape), mask)
    assert rle(np.ones((2, 2), bool)) == [0, 4]


def test_bbox():
    mask = np.zeros((10, 20), bool)
    assert bbox(mask) is None
    mask[2:5, 7:9] = True
    assert bbox(mask) == {"x": 7, "y": 2, "width": 2, "height": 3}


def test_images():
    mask = np.zeros((5, 6), bool)
    mask[1, 2] = True
    png = np.asarray(Image.open(io.BytesIO(mask_png(mask))))
    assert png.dtype == np.uint8 and png[1, 2] == 255 and png.sum() == 255
    image = np.full((5, 6), 1000, np.uint16)
    over = np.asarray(Image.open(io.BytesIO(overlay_png(image, mask))))
    assert over.shape == (5, 6, 3)
    changed = (over != over[0, 0]).any(axis=2)
    np.testing.assert_array_equal(changed, mask)
    probs = np.load(io.BytesIO(probabilities_npy(np.full((2, 3), 0.25))))
    assert probs.dtype == np.float32 and probs.shape == (2, 3)
