"""Whole-slide images: segment a BigTIFF / OME-TIFF band by band, never holding it whole.

The input is read through tifffile's zarr view (`aszarr`) of its full-resolution level: a
pyramid's level 0, and every page of a multi-page file (the leading axes of its first series;
a planar channel axis C of at most 4 counts as the pixel's channels). The file should be tiled
or stripped: a region is read by decoding only the tiles or strips it touches.

Per page:

1. statistics: the preprocessing normalises by the image's own percentiles (core/preprocess.py),
   so a first streaming pass finds them exactly (`percentiles`, the same values np.percentile
   gives on the whole image, in three or four reads of the file);
2. windows: the padded page is cut into the windows of core/tiling.py (origins on the 16-pixel
   grid, linear ramps over the overlap); one row of windows is read, normalised and run as a
   band of tile height, `batch` windows per call of `run`;
3. blending: only the rows in flight are held (K x tile x width logits); the rows no later
   window touches are normalised, decided (`decide`: logits -> uint8 labels) and written at once
   as tiles of a tiled, zlib-compressed BigTIFF (one page per input page; labels 0..K-1, a mask
   is 0/1).

Peak memory: a band of input, its logits and one output strip (about (4 C + 4 K) x tile x width
bytes plus 256 x width), the statistics pass's 4096-bin histogram, and what `run` holds for a
batch; independent of the image's height.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import zarr

from unetpp.core.errors import Cancelled, ImageDecodeError, UnsupportedImage
from unetpp.core.pipeline import Plan
from unetpp.core.preprocess import Preprocessing, padding_for, to_channels
from unetpp.core.tiling import Blend, count

Run = Callable[[np.ndarray], np.ndarray]  # [N, C, h, w] float32 -> logits [N, K, h, w]
Decide = Callable[[np.ndarray], np.ndarray]  # logits [K, h, w] -> uint8 labels [h, w]
Progress = Callable[[int, int], None]  # (windows done, windows in all)

OUTPUT_TILE = 256  # the output TIFF's tile side
READ_ROWS = 256  # rows per read in the statistics pass (a common TIFF tile height)
BINS = 4096  # histogram bins per refinement of the statistics pass
GATHER = 1 << 22  # values few enough to collect and sort (16 MB of float32)


@dataclass(frozen=True)
class Page:
    """One H x W[x C] image of a slide, read by rows."""

    array: zarr.Array
    index: tuple[int, ...]  # the leading (page) indices into `array`
    planar: bool  # channels are the axis before Y (C), not after X (S)
    height: int
    width: int

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows [y0, y1) as H x W or H x W x C in the file's dtype."""
        if self.planar:
            return np.moveaxis(self.array[(*self.index, slice(None), slice(y0, y1))], 0, -1)
        return self.array[(*self.index, slice(y0, y1))]


@dataclass(frozen=True)
class SlideResult:
    pages: int
    height: int
    width: int
    windows: int


@contextmanager
def open_slide(path: str | Path) -> Iterator[list[Page]]:
    """The pages of a TIFF's first series at full resolution (not read yet)."""
    try:
        tif = tifffile.TiffFile(path)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise ImageDecodeError(f"{Path(path).name}: not a readable TIFF ({exc})") from exc
    with tif:
        if not tif.series:
            raise ImageDecodeError(f"{Path(path).name}: a TIFF without images")
        series = tif.series[0]
        array = zarr.open_array(series.aszarr(level=0), mode="r")
        yield _pages(array, series.levels[0].axes, Path(path).name)


def plan(height: int, width: int, preprocessing: Preprocessing, tile: int, overlap: int) -> Plan:
    """A page's plan for routing: its padded size in `tile` x `tile` windows."""
    pad_h, pad_w = padding_for(height, width, preprocessing.multiple)
    h, w = height + pad_h, width + pad_w
    return Plan(h, w, count(h, w, tile, overlap), tile, min(tile, h) * min(tile, w))


def _pages(array: zarr.Array, axes: str, name: str) -> list[Page]:
    planar = len(axes) >= 3 and axes[-3] == "C" and array.shape[-3] <= 4
    if axes.endswith("YXS") and array.shape[-1] <= 4:
        height, width = array.shape[-3:-1]
        leading = array.shape[:-3]
    elif axes.endswith("YX"):
        height, width = array.shape[-2:]
        leading = array.shape[:-3] if planar else array.shape[:-2]
    else:
        raise UnsupportedImage(f"{name}: axes {axes!r} are not pages of Y, X (and up to 4 samples)")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise UnsupportedImage(f"{name}: pixel type {array.dtype} is not supported")
    return [Page(array, index, planar, height, width) for index in np.ndindex(*leading)]


def _values(page: Page, channels: int) -> Iterator[np.ndarray]:
    """The page's preprocessed-but-not-normalised values, a block of rows at a time, flat."""
    for y0 in range(0, page.height, READ_ROWS):
        yield to_channels(page.rows(y0, min(y0 + READ_ROWS, page.height)), channels).ravel()


def percentiles(page: Page, channels: int, qs: tuple[float, float]) -> tuple[float, float]:
    """np.percentile(to_channels(image), qs) of the whole page, in a few streaming passes.

    Exact: the order statistics around each percentile are narrowed down by histograms over
    float32 values until few enough remain to sort, then interpolated as numpy does."""
    n, low, high = 0, np.inf, -np.inf
    for v in _values(page, channels):
        n, low, high = n + v.size, min(low, float(v.min())), max(high, float(v.max()))
    if n == 0:
        raise UnsupportedImage("an image without pixels")
    wanted: dict[int, float] = {}
    ranks = set()
    for q in qs:
        index = (q / 100) * (n - 1)
        ranks |= {math.floor(index), min(math.floor(index) + 1, n - 1)}
    start = float(np.nextafter(np.float32(low), np.float32(-np.inf)))
    # per unresolved rank: values in (lo, hi], `below` of them <= lo, `inside` in the interval
    open_ranks = {r: (start, float(np.float32(high)), 0, n) for r in ranks}
    while open_ranks:
        open_ranks = _refine(page, channels, open_ranks, wanted)
    out = []
    for q in qs:
        index = (q / 100) * (n - 1)
        k = math.floor(index)
        pair = np.array([wanted[k], wanted[min(k + 1, n - 1)]], dtype=np.float32)
        out.append(float(np.quantile(pair, np.array([index - k]))[0]))  # as numpy interpolates
    return out[0], out[1]


def _refine(
    page: Page,
    channels: int,
    open_ranks: dict[int, tuple[float, float, int, int]],
    wanted: dict[int, float],
) -> dict[int, tuple[float, float, int, int]]:
    """One pass: sort the intervals small enough, histogram the others into BINS bins."""
    intervals = sorted(set(open_ranks.values()))
    gathered: dict[tuple, list[np.ndarray]] = {iv: [] for iv in intervals if iv[3] <= GATHER}
    edges = {iv: _edges(iv[0], iv[1]) for iv in intervals if iv not in gathered}
    counts = {iv: np.zeros(len(e), np.int64) for iv, e in edges.items()}
    for v in _values(page, channels):
        for iv in intervals:
            inside = v[(v > np.float32(iv[0])) & (v <= np.float32(iv[1]))]
            if iv in gathered:
                gathered[iv].append(inside)
            else:
                where = np.searchsorted(edges[iv], inside, side="left")
                counts[iv] += np.bincount(where, minlength=len(edges[iv]))
    still: dict[int, tuple[float, float, int, int]] = {}
    for rank, iv in open_ranks.items():
        lo, _, below, _ = iv
        if iv in gathered:
            wanted[rank] = float(np.sort(np.concatenate(gathered[iv]))[rank - below])
            continue
        cumulative = below + np.cumsum(counts[iv])
        j = int(np.searchsorted(cumulative, rank + 1, side="left"))
        lower = lo if j == 0 else float(edges[iv][j - 1])
        upper = float(edges[iv][j])
        if np.nextafter(np.float32(lower), np.float32(np.inf)) == np.float32(upper):
            wanted[rank] = upper  # one float32 value fits in the interval
        else:
            before = below if j == 0 else int(cumulative[j - 1])
            still[rank] = (lower, upper, before, int(counts[iv][j]))
    return still


def _edges(lo: float, hi: float) -> np.ndarray:
    """Upper bin edges splitting the float32 interval (lo, hi] into at most BINS bins."""
    edges = np.unique(np.linspace(lo, hi, BINS + 1).astype(np.float32))
    return edges[edges > np.float32(lo)]


def segment_slide(
    source: str | Path,
    target: str | Path,
    run: Run,
    *,
    preprocessing: Preprocessing,
    decide: Decide,
    tile: int = 512,
    overlap: int = 64,
    batch: int = 4,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> SlideResult:
    """Segment every page of the TIFF `source` into the tiled BigTIFF `target` (written to a
    temporary file beside it and renamed when complete). Raises Cancelled when `cancelled()`
    turns true (checked before every batch)."""
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    with open_slide(source) as pages:
        geometry = [_geometry(p, preprocessing, tile, overlap) for p in pages]
        total = sum(len(b.windows) for b in geometry)
        done = [0]

        def step(n: int) -> None:
            if cancelled is not None and cancelled():
                raise Cancelled("the segmentation was cancelled")
            done[0] += n
            if progress is not None:
                progress(done[0], total)

        step(0)
        try:
            with tifffile.TiffWriter(partial, bigtiff=True) as writer:
                for page, blend in zip(pages, geometry, strict=True):
                    rows = _label_rows(page, blend, preprocessing, run, decide, batch, step)
                    writer.write(
                        _tiles(rows, page.width),
                        shape=(page.height, page.width),
                        dtype=np.uint8,
                        tile=(OUTPUT_TILE, OUTPUT_TILE),
                        compression="zlib",
                        metadata=None,
                    )
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return SlideResult(len(pages), pages[0].height, pages[0].width, total)


def _geometry(page: Page, preprocessing: Preprocessing, tile: int, overlap: int) -> Blend:
    pad_h, pad_w = padding_for(page.height, page.width, preprocessing.multiple)
    return Blend(page.height + pad_h, page.width + pad_w, tile, overlap)


def _band(
    page: Page, y0: int, rows: int, preprocessing: Preprocessing, scale: tuple[float, float]
) -> np.ndarray:
    """Padded rows [y0, y0 + rows) of the network input, C x rows x W' (reflect padding at the
    bottom and right, as pad_to_multiple does for the whole image)."""
    lo, hi = scale
    chw = to_channels(page.rows(y0, min(y0 + rows, page.height)), preprocessing.channels)
    chw = (chw - np.float32(lo)) / np.float32(hi - lo if hi > lo else 1.0)
    pad_h = y0 + rows - min(y0 + rows, page.height)
    pad_w = padding_for(page.height, page.width, preprocessing.multiple)[1]
    if pad_h or pad_w:
        chw = np.pad(chw, [(0, 0), (0, pad_h), (0, pad_w)], mode="symmetric")
    return chw


def _label_rows(
    page: Page,
    blend: Blend,
    preprocessing: Preprocessing,
    run: Run,
    decide: Decide,
    batch: int,
    step: Callable[[int], None],
) -> Iterator[np.ndarray]:
    """The page's uint8 labels, a few finished rows at a time (cropped to the page)."""
    scale = percentiles(page, preprocessing.channels, (preprocessing.p_low, preprocessing.p_high))
    carry: np.ndarray | None = None  # blended rows [ys[i], end of the previous window row)
    for i, y0 in enumerate(blend.ys):
        band = _band(page, y0, blend.th, preprocessing, scale)
        logits: np.ndarray | None = None
        row = [w for w in blend.windows if w[0] == i]
        for first in range(0, len(row), batch):
            chunk = row[first : first + batch]
            step(0)  # cancelled?
            out = run(
                np.stack([band[:, :, blend.xs[j] : blend.xs[j] + blend.tw] for _, j in chunk])
            )
            if logits is None:
                logits = np.zeros((out.shape[1], blend.th, len(blend.norm_x)), np.float32)
                if carry is not None:
                    logits[:, : carry.shape[1]] = carry
            for (_, j), window in zip(chunk, out, strict=True):
                weight = blend.wy[i][:, None] * blend.wx[j][None, :]
                logits[:, :, blend.xs[j] : blend.xs[j] + blend.tw] += window * weight
            step(len(chunk))
        assert logits is not None
        end = blend.ys[i + 1] - y0 if i + 1 < len(blend.ys) else blend.th
        finished, carry = logits[:, :end], logits[:, end:]
        finished /= blend.norm_y[None, y0 : y0 + end, None]
        finished /= blend.norm_x[None, None, :]
        labels = decide(finished)[: max(0, min(end, page.height - y0)), : page.width]
        if labels.shape[0]:
            yield labels


def _tiles(rows: Iterator[np.ndarray], width: int) -> Iterator[np.ndarray]:
    """Regroup label rows into OUTPUT_TILE-row strips and yield their tiles in TIFF order."""
    pending: list[np.ndarray] = []
    held = 0
    for block in rows:
        pending.append(block)
        held += block.shape[0]
        while held >= OUTPUT_TILE:
            strip = np.concatenate(pending)
            yield from _strip_tiles(strip[:OUTPUT_TILE], width)
            rest = strip[OUTPUT_TILE:]
            pending, held = [rest], rest.shape[0]
    if held:
        yield from _strip_tiles(np.concatenate(pending), width)


def _strip_tiles(strip: np.ndarray, width: int) -> Iterator[np.ndarray]:
    for x0 in range(0, width, OUTPUT_TILE):
        yield np.ascontiguousarray(strip[:, x0 : x0 + OUTPUT_TILE])
