"""How raw pixels become the network's input, defined once for training, export and serving.

The recipe is a small frozen dataclass recorded in every checkpoint and manifest, so the
server reproduces exactly what the model saw during training:

1. channels: grey images are repeated to RGB, RGB(A) is reduced to luminance for grey models;
   alpha is dropped.
2. normalisation: per image and channel-independent, the p_low/p_high percentiles map to 0/1
   (robust to the bit depth and exposure of a microscope; 8- and 16-bit images alike).
3. size: padded (reflect) to a multiple of 16, the network's total down-sampling, and cropped
   back after inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from unetpp.core.errors import InvalidInput

MULTIPLE = 16  # 2**4: four 2x2 poolings between X(0,0) and X(4,0)
LEVELS = (np.uint8, np.uint16)  # integer pixels whose percentiles come from a histogram


@dataclass(frozen=True)
class Preprocessing:
    """Pixel recipe; `to_dict`/`from_dict` are the form stored in checkpoints and manifests."""

    channels: int = 1
    p_low: float = 1.0
    p_high: float = 99.8
    multiple: int = MULTIPLE

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise InvalidInput(f"preprocessing channels must be 1 or 3, got {self.channels}")
        if not 0.0 <= self.p_low < self.p_high <= 100.0:
            raise InvalidInput(
                f"percentiles must satisfy 0 <= p_low < p_high <= 100, got {self.p_low}, {self.p_high}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "percentile", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        data = dict(data)
        kind = data.pop("kind", "percentile")
        if kind != "percentile":
            raise InvalidInput(f"unknown preprocessing kind {kind!r}")
        return cls(**data)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """HxW or HxWxC image of any numeric dtype -> float32 array of shape (C, H, W)."""
        chw = to_channels(image, self.channels)
        # one grey 8/16-bit channel: its percentiles from the integers themselves (the same
        # numbers; a grey image made RGB is three copies, whose percentiles differ)
        grey = image.ndim == 2 and self.channels == 1 and image.dtype in LEVELS
        levels = image if grey else None
        return normalize(chw, self.p_low, self.p_high, levels=levels)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """HxW or HxWxC (C in 1..4) -> float32 CxHxW with the requested channel count."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise InvalidInput(f"expected an HxW or HxWxC image with C in 1..4, got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if arr.shape[2] in (2, 4):  # grey+alpha, RGBA: drop alpha
        arr = arr[:, :, :-1]
    if channels == 1 and arr.shape[2] == 3:
        arr = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        arr = arr[:, :, None]
    elif channels == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def percentiles(values: np.ndarray, q: tuple[float, ...]) -> list[float]:
    """`np.percentile(values, q)` of float32 values (its default, linear method), the same
    numbers; when they are integers in 0..65535 (8- and 16-bit images, or such arrays
    themselves), read from their histogram instead of partitioning them: 4x faster at 256x256
    (benchmarks/REPORT.md, `overhead`)."""
    levels = values if values.dtype in LEVELS else _as_levels(values)
    if levels is None:
        return np.percentile(values, q).tolist()
    cumulative = np.cumsum(np.bincount(levels.ravel()))

    def order(k: int) -> float:
        return float(np.searchsorted(cumulative, k, side="right"))

    return [interpolated(order, levels.size, p) for p in q]


def _as_levels(values: np.ndarray) -> np.ndarray | None:
    """The values as uint16 when they are all integers in its range, else None."""
    if not values.size or values.min() < 0 or values.max() > np.iinfo(np.uint16).max:
        return None
    levels = values.astype(np.uint16)
    return levels if np.array_equal(levels, values) else None


def interpolated(order: Callable[[int], float], n: int, p: float) -> float:
    """The p-th percentile of n float32 values as np.percentile interpolates it (its linear
    method), from `order(k)`, the k-th smallest value (counted from 0)."""
    index = (p / 100) * (n - 1)
    k = math.floor(index)
    low, high = np.float32(order(k)), np.float32(order(min(k + 1, n - 1)))
    gap, t = high - low, np.float64(index - k)  # numpy's lerp: the gap in float32, then float64
    return float(high - gap * (1 - t) if t >= 0.5 else low + gap * t)


def normalize(
    chw: np.ndarray, p_low: float, p_high: float, *, levels: np.ndarray | None = None
) -> np.ndarray:
    """Map the image's p_low/p_high percentiles to 0/1 (float32, not clipped). `levels`: the
    same pixels as uint8/uint16, whose percentiles are read without checking the floats."""
    lo, hi = percentiles(chw if levels is None else levels, (p_low, p_high))
    scale = hi - lo if hi > lo else 1.0
    out = np.subtract(chw, np.float32(lo), dtype=np.float32)
    out /= np.float32(scale)
    return out


def padding_for(height: int, width: int, multiple: int = MULTIPLE) -> tuple[int, int]:
    """Rows and columns to add (at the bottom and right) to reach a multiple."""
    return (-height) % multiple, (-width) % multiple


def pad_to_multiple(
    array: np.ndarray, multiple: int = MULTIPLE
) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad the last two axes up to a multiple; returns the array and the original (H, W)."""
    height, width = array.shape[-2:]
    pad_h, pad_w = padding_for(height, width, multiple)
    if pad_h or pad_w:
        pad = [(0, 0)] * (array.ndim - 2) + [(0, pad_h), (0, pad_w)]
        array = np.pad(array, pad, mode="symmetric")
    return array, (height, width)


def crop_to(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Undo `pad_to_multiple` on the last two axes."""
    return array[..., : size[0], : size[1]]


def network_input(
    image: np.ndarray, preprocessing: Preprocessing
) -> tuple[np.ndarray, tuple[int, int]]:
    """A raw HxW[xC] image -> the padded float32 [C, H', W'] input and the original (H, W):
    what training, evaluation, export and serving all feed the network (`crop_to` undoes the
    padding)."""
    return pad_to_multiple(preprocessing(image), preprocessing.multiple)


def check_size(height: int, width: int, multiple: int = MULTIPLE) -> None:
    """Raise a clear error for a network input whose size is not a multiple of 16."""
    if height % multiple or width % multiple or height == 0 or width == 0:
        pad_h, pad_w = padding_for(height, width, multiple)
        raise InvalidInput(
            f"input height and width must be positive multiples of {multiple}, got {height}x{width}; "
            f"pad it (e.g. unetpp.core.preprocess.pad_to_multiple adds {pad_h} rows and "
            f"{pad_w} columns) and crop the output back"
        )
