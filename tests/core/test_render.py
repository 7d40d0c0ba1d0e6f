from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageSequence

from tests.helpers import unrle
from unetpp.core.datasets import synthetic_image
from unetpp.core.errors import BadParameter
from unetpp.core.imageio import decode_image, encode_png
from unetpp.core.render import bbox, mask_png, render, rle
from unetpp.core.task import Task


def _png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def test_rle_round_trips_and_starts_with_background():
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 9)) > 0.5, np.ones((3, 4), bool), np.zeros((3, 4), bool)):
        counts = rle(mask)
        assert sum(counts) == mask.size
        np.testing.assert_array_equal(unrle(counts, mask.shape), mask)
    assert rle(np.ones((2, 2), bool)) == [0, 4]


def test_masks_and_label_maps_encode_fast_and_exactly():
    """Masks and label maps are written with zlib level 1 and run-length matching: the pixels
    round-trip, and the file is no larger than the default level's on a segmentation."""
    _, mask = synthetic_image(np.random.default_rng(0), 256)
    png = mask_png(mask)
    np.testing.assert_array_equal(_png(png), mask.astype(np.uint8) * 255)
    assert len(png) <= len(encode_png(mask.astype(np.uint8) * 255))
    labels = (mask * (np.arange(256) // 64 + 1)).astype(np.uint8)  # classes 1..4 by column
    np.testing.assert_array_equal(_png(encode_png(labels, labels=True)), labels)
    rng = np.random.default_rng(1)
    for shape in ((1, 1), (3, 517), (300, 7)):  # 16-bit instance labels, any byte pattern
        objects = rng.integers(0, 65536, shape, dtype=np.uint16)
        np.testing.assert_array_equal(_png(encode_png(objects, labels=True)), objects)
        np.testing.assert_array_equal(decode_image(encode_png(objects, labels=True)), objects)


def test_bbox():
    mask = np.zeros((10, 20), bool)
    assert bbox(mask) is None
    mask[2:5, 7:9] = True
    assert bbox(mask) == {"x": 7, "y": 2, "width": 2, "height": 3}


def test_binary_formats():
    task = Task.binary(0.5)
    logits = np.full((1, 5, 6), -4.0, np.float32)
    logits[0, 1, 2] = 4.0
    image = np.full((5, 6), 1000, np.uint16)
    png = render(task, logits, image, "png")
    assert png.media_type == "image/png"
    mask = _png(png.content)
    assert mask.dtype == np.uint8 and mask[1, 2] == 255 and mask.sum() == 255
    body = render(task, logits, image, "json").content
    assert body["area"] == 1 and body["bbox"] == {"x": 2, "y": 1, "width": 1, "height": 1}
    np.testing.assert_array_equal(unrle(body["counts"], (5, 6)), mask > 0)
    over = _png(render(task, logits, image, "overlay").content)
    assert over.shape == (5, 6, 3)
    np.testing.assert_array_equal((over != over[0, 0]).any(axis=2), mask > 0)
    npy = render(task, logits, image, "probabilities", encoding="npy")
    probs = np.load(io.BytesIO(npy.content))
    assert npy.media_type == "application/x-npy" and probs.dtype == np.float32
    assert probs.shape == (5, 6) and probs[1, 2] > 0.98 and probs[0, 0] < 0.02
    png16 = _png(render(task, logits, image, "probabilities").content)
    np.testing.assert_allclose(png16 / 65535.0, probs, atol=1 / 65535)
    with pytest.raises(BadParameter, match="encoding"):
        render(task, logits, image, "probabilities", encoding="jpeg")
    with pytest.raises(BadParameter, match="format"):
        render(task, logits, image, "svg")


def test_multiclass_formats():
    task = Task.from_names(["round", "long"], colours=[(255, 0, 0), (0, 0, 255)])
    labels = np.zeros((6, 8), np.uint8)
    labels[1:3, 1:3] = 1
    labels[4, 2:7] = 2
    logits = np.where(np.arange(3)[:, None, None] == labels, 5.0, -5.0).astype(np.float32)
    image = np.full((6, 8, 3), 100, np.uint8)
    png = render(task, logits, image, "png")
    np.testing.assert_array_equal(_png(png.content), labels)
    body = render(task, logits, image, "json").content
    assert body["size"] == [6, 8]
    assert [(c["index"], c["name"], c["area"]) for c in body["classes"]] == [
        (1, "round", 4),
        (2, "long", 5),
    ]
    for c in body["classes"]:
        np.testing.assert_array_equal(unrle(c["counts"], (6, 8)), labels == c["index"])
    assert body["classes"][1]["bbox"] == {"x": 2, "y": 4, "width": 5, "height": 1}
    over = _png(render(task, logits, image, "overlay").content).astype(int)
    assert (over[labels == 0] == 100).all()
    assert (over[labels == 1][:, 0] > over[labels == 1][:, 2]).all()  # red
    assert (over[labels == 2][:, 2] > over[labels == 2][:, 0]).all()  # blue
    npy = np.load(io.BytesIO(render(task, logits, image, "probabilities", encoding="npy").content))
    assert npy.shape == (3, 6, 8) and npy.dtype == np.float32
    np.testing.assert_allclose(npy.sum(axis=0), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(npy.argmax(axis=0), labels)
    tiff = render(task, logits, image, "probabilities")
    assert tiff.media_type == "image/tiff"
    pages = [np.asarray(p) for p in ImageSequence.Iterator(Image.open(io.BytesIO(tiff.content)))]
    assert len(pages) == 3 and pages[0].dtype == np.uint16
    np.testing.assert_allclose(np.stack(pages) / 65535.0, npy, atol=1 / 65535)
