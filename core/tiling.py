"""Sliding-window inference for large images, in bounded memory.

The padded image is cut into `tile` x `tile` windows that overlap by `overlap` pixels; every
window starts at a multiple of 16, so each one sees the same pooling grid as the whole image
would. The last window of a row or column is aligned to the image's end. Windows are blended
with a separable weight that is 1 in the middle and ramps down linearly across the overlap, so
a pixel covered by one window only gets exactly that window's logits. Memory: the input and one
K x H x W accumulator, plus at most `in_flight` windows at a time; the weight sum is separable
and kept as two vectors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window origins along one axis covering [0, length); one window if it fits."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    origins = list(range(0, length - tile, stride))
    origins.append(length - tile)
    return origins


def ramp(size: int, overlap: int, first: bool, last: bool) -> np.ndarray:
    """1-D blending weight of a window: linear ramps over the overlap, except at the image edges."""
    weight = np.ones(size, dtype=np.float32)
    if overlap:
        up = (np.arange(overlap, dtype=np.float32) + 1) / (overlap + 1)
        if not first:
            weight[:overlap] = up
        if not last:
            weight[-overlap:] = up[::-1]
    return weight


def count(height: int, width: int, tile: int, overlap: int) -> int:
    return len(starts(height, tile, overlap)) * len(starts(width, tile, overlap))


async def infer_tiled(
    x: np.ndarray,
    run: Callable[[np.ndarray], Awaitable[np.ndarray]],
    *,
    tile: int,
    overlap: int,
    in_flight: int,
) -> np.ndarray:
    """Blend `run` (C x h x w -> K x h x w logits) over the windows of `x` (C x H x W, H and W
    multiples of 16) into K x H x W logits. `in_flight` windows are submitted at once so that
    they batch together."""
    height, width = x.shape[-2:]
    th, tw = min(tile, height), min(tile, width)
    ys, xs = starts(height, th, overlap), starts(width, tw, overlap)
    wy = [ramp(th, overlap, i == 0, i == len(ys) - 1) for i in range(len(ys))]
    wx = [ramp(tw, overlap, j == 0, j == len(xs) - 1) for j in range(len(xs))]
    norm_y = np.zeros(height, dtype=np.float32)
    norm_x = np.zeros(width, dtype=np.float32)
    for y0, w in zip(ys, wy, strict=True):
        norm_y[y0 : y0 + th] += w
    for x0, w in zip(xs, wx, strict=True):
        norm_x[x0 : x0 + tw] += w
    windows = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
    total: np.ndarray | None = None
    for first in range(0, len(windows), in_flight):
        chunk = windows[first : first + in_flight]
        outs = await asyncio.gather(
            *(run(x[:, ys[i] : ys[i] + th, xs[j] : xs[j] + tw]) for i, j in chunk)
        )
        for (i, j), logits in zip(chunk, outs, strict=True):
            if total is None:
                total = np.zeros((logits.shape[0], height, width), dtype=np.float32)
            weight = wy[i][:, None] * wx[j][None, :]
            total[:, ys[i] : ys[i] + th, xs[j] : xs[j] + tw] += logits * weight
    assert total is not None

    def normalise(total: np.ndarray) -> np.ndarray:
        total /= norm_y[None, :, None]
        total /= norm_x[None, None, :]
        return total

    return await asyncio.to_thread(normalise, total)
