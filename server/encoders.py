"""Responses of POST /v1/segment: mask PNG, JSON with an RLE mask, overlay, probabilities."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from unetpp.core.imageio import encode_png
from unetpp.core.preprocess import normalize, to_channels

OVERLAY_COLOUR = np.array([255, 40, 40], dtype=np.float32)
OVERLAY_ALPHA = 0.45


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)


def mask_png(mask: np.ndarray) -> bytes:
    """Boolean H x W -> 8-bit grey PNG, 0 background / 255 foreground."""
    return encode_png(mask.astype(np.uint8) * np.uint8(255))


def rle(mask: np.ndarray) -> list[int]:
    """Run lengths of the row-major flattened mask, alternating, starting with background (the
    first count is 0 when the first pixel is foreground)."""
    flat = mask.ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(edges).tolist()
    return [0, *counts] if flat.size and flat[0] else counts


def bbox(mask: np.ndarray) -> dict[str, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    y, x = int(rows[0]), int(cols[0])
    return {"x": x, "y": y, "width": int(cols[-1]) - x + 1, "height": int(rows[-1]) - y + 1}


def mask_json(mask: np.ndarray) -> dict[str, Any]:
    return {
        "encoding": "rle",
        "order": "row-major",
        "size": list(mask.shape),
        "counts": rle(mask),
        "area": int(np.count_nonzero(mask)),
        "bbox": bbox(mask),
    }


def display_rgb(image: np.ndarray) -> np.ndarray:
    """Any decoded image -> 8-bit RGB for people: 8-bit images as they are, others stretched
    between their 1st and 99.8th percentiles."""
    chw = to_channels(image, 3)
    if image.dtype == np.uint8:
        return chw.transpose(1, 2, 0).astype(np.uint8)
    scaled = np.clip(normalize(chw, 1.0, 99.8), 0.0, 1.0) * 255.0
    return scaled.transpose(1, 2, 0).astype(np.uint8)


def overlay_png(image: np.ndarray, mask: np.ndarray) -> bytes:
    rgb = display_rgb(image).astype(np.float32)
    rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * OVERLAY_COLOUR
    return encode_png(rgb.round().astype(np.uint8))


def probabilities_png16(probabilities: np.ndarray) -> bytes:
    """H x W probabilities in [0, 1] -> 16-bit grey PNG (value / 65535 is the probability)."""
    return encode_png(np.round(probabilities * 65535.0).astype(np.uint16))


def probabilities_npy(probabilities: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, probabilities.astype(np.float32), allow_pickle=False)
    return buf.getvalue()
