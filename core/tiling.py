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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import numpy as np

# the defaults of the server's Settings and of `unetpp predict` (a test holds them together)
TILE_ABOVE_PIXELS = 1 << 20  # images with more (padded) pixels are tiled
TILE_SIZE = 512
TILE_OVERLAP = 64
# the server's default candidate sides, measured per graph in the background calibration
TILE_SIDES = (256, 384, 512, 768, 1024)
# a tile within this factor of the best measured rate counts as fast as it; the one of them
# holding the fewest activation bytes wins (a shared CPU's timings vary by about this much)
RATE_SLACK = 1.1


@dataclass(frozen=True)
class TileRun:
    """A measured run of `batch` windows of `side` x `side` pixels: `ms` for the whole batch,
    and the activation bytes it was measured to hold (0: not measured)."""

    side: int
    batch: int
    ms: float
    bytes: int = 0

    @property
    def pixels(self) -> int:
        """Input pixels of the batch (its activation bytes are proportional to them)."""
        return self.batch * self.side * self.side

    def activations(self, bytes_per_pixel: int) -> int:
        """Its measured bytes, else `bytes_per_pixel` times its pixels."""
        return self.bytes or bytes_per_pixel * self.pixels

    def ms_per_pixel(self, overlap: int) -> float:
        """Per new output pixel of a large image: each window adds about (side - overlap)^2."""
        return self.ms / (self.batch * (self.side - overlap) ** 2)


def choose_tile(
    runs: Iterable[TileRun], *, overlap: int, bytes_per_pixel: int, room: int
) -> TileRun | None:
    """The tile (side and batch) for a graph from its measured runs: the lowest ms per new
    output pixel among the runs whose activations fit `room` bytes (as measured for the run,
    else `bytes_per_pixel` per input pixel) and whose side is over twice the overlap; of those
    within RATE_SLACK of it, the one with the fewest input pixels (then the smaller side).
    None when none qualifies."""
    fits = [
        r
        for r in runs
        if r.side > 2 * overlap and r.ms > 0 and r.activations(bytes_per_pixel) <= room
    ]
    if not fits:
        return None
    best = min(r.ms_per_pixel(overlap) for r in fits)
    near = [r for r in fits if r.ms_per_pixel(overlap) <= RATE_SLACK * best]
    return min(near, key=lambda r: (r.pixels, r.side, r.ms_per_pixel(overlap), r.bytes))


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


class Blend:
    """The windows of an H x W image and the accumulator their logits are blended into; shared
    by `infer_tiled` (async, windows batched with other requests) and `infer_tiled_sync`."""

    def __init__(self, height: int, width: int, tile: int, overlap: int) -> None:
        self.th, self.tw = min(tile, height), min(tile, width)
        self.ys, self.xs = starts(height, self.th, overlap), starts(width, self.tw, overlap)
        ny, nx = len(self.ys), len(self.xs)
        self.wy = [ramp(self.th, overlap, i == 0, i == ny - 1) for i in range(ny)]
        self.wx = [ramp(self.tw, overlap, j == 0, j == nx - 1) for j in range(nx)]
        self.norm_y = np.zeros(height, dtype=np.float32)
        self.norm_x = np.zeros(width, dtype=np.float32)
        for y0, w in zip(self.ys, self.wy, strict=True):
            self.norm_y[y0 : y0 + self.th] += w
        for x0, w in zip(self.xs, self.wx, strict=True):
            self.norm_x[x0 : x0 + self.tw] += w
        self.windows = [(i, j) for i in range(ny) for j in range(nx)]
        self.total: np.ndarray | None = None

    def crop(self, x: np.ndarray, window: tuple[int, int]) -> np.ndarray:
        i, j = window
        return x[:, self.ys[i] : self.ys[i] + self.th, self.xs[j] : self.xs[j] + self.tw]

    def add(self, window: tuple[int, int], logits: np.ndarray) -> None:
        i, j = window
        if self.total is None:
            shape = (logits.shape[0], len(self.norm_y), len(self.norm_x))
            self.total = np.zeros(shape, dtype=np.float32)
        weight = self.wy[i][:, None] * self.wx[j][None, :]
        self.crop(self.total, window)[...] += logits * weight

    def result(self) -> np.ndarray:
        """The blended K x H x W logits (normalised in place; call once, after every window)."""
        assert self.total is not None, "no window was added"
        self.total /= self.norm_y[None, :, None]
        self.total /= self.norm_x[None, None, :]
        return self.total


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
    blend = Blend(*x.shape[-2:], tile, overlap)
    for first in range(0, len(blend.windows), in_flight):
        chunk = blend.windows[first : first + in_flight]
        outs = await asyncio.gather(*(run(blend.crop(x, w)) for w in chunk))
        for window, logits in zip(chunk, outs, strict=True):
            blend.add(window, logits)
    return await asyncio.to_thread(blend.result)


def infer_tiled_sync(
    x: np.ndarray, run: Callable[[np.ndarray], np.ndarray], *, tile: int, overlap: int
) -> np.ndarray:
    """`infer_tiled` for a caller without an event loop (`unetpp predict`), one window at a time."""
    blend = Blend(*x.shape[-2:], tile, overlap)
    for window in blend.windows:
        blend.add(window, run(blend.crop(x, window)))
    return blend.result()
