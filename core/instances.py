"""Separate objects (instances) in a binary model's output, and their three encodings.

`split(mask)` cuts the foreground into objects: connected components, and a component that
holds several nuclei-like bulges is cut between them. The bulges are the maxima of the
smoothed (chessboard) distance transform of the mask (each the deepest point of the
`footprint`-wide square around it, deeper than `min_radius`); the pixels of a component with
several maxima go to the nearest one (a Voronoi cut inside the component, computed only for
such components), keeping each piece's largest 4-connected part so that every outline is one
polygon. Objects smaller than `min_area` pixels are dropped.
docs/instances.md has the measured comparison with connected components alone and with
watersheds (benchmarks/instances.py).

Encodings of a label image (0 background, 1..N objects):

- `label_png`: 16-bit grey PNG of the label image;
- `geojson`: a FeatureCollection, one Polygon per object (pixel-corner coordinates, the
  outline of its pixels, holes as interior rings), with QuPath's detection properties;
- `coco`: COCO-style image, annotations (compressed RLE, bbox, area, score) and category.

Torch-free: numpy and scipy.ndimage (scipy is in the api and export extras), imported where it
is first used: importing it takes about half a second of a server's start-up.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from unetpp.core.errors import InvalidInput
from unetpp.core.imageio import encode_png

FOOTPRINT = 21  # pixels: a seed is the deepest point of the FOOTPRINT-wide square around it
MIN_RADIUS = 2.0  # pixels: shallower maxima (thin bridges, specks) seed no object
SMOOTHING = 2.0  # sigma of the Gaussian on the distance transform, in pixels
MIN_AREA = 100  # pixels: smaller objects are specks, dropped (HeLa's smallest nucleus: 125)
MAX_OBJECTS = 65535  # the label PNG is 16-bit

_FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
_EIGHT = np.ones((3, 3), dtype=bool)


def split(
    mask: np.ndarray,
    *,
    footprint: int = FOOTPRINT,
    min_radius: float = MIN_RADIUS,
    smoothing: float = SMOOTHING,
    min_area: int = MIN_AREA,
) -> np.ndarray:
    """Boolean H x W foreground -> int32 label image, 0 background, objects 1..N."""
    from scipy import ndimage as ndi

    mask = np.asarray(mask, dtype=bool)
    components, count = ndi.label(mask, _FOUR)
    if count == 0:
        return components
    _, seeds = maxima(mask, footprint=footprint, min_radius=min_radius, smoothing=smoothing)
    n_seeds = int(seeds.max())
    seeds_per_component = np.bincount(
        np.unique(components[seeds > 0] * (n_seeds + 1) + seeds[seeds > 0]) // (n_seeds + 1),
        minlength=count + 1,
    )
    labels = components
    windows = ndi.find_objects(components)
    next_label = count + 1
    for index in np.flatnonzero(seeds_per_component > 1):
        next_label = _cut(labels, seeds, index, windows[index - 1], next_label)
    return drop_small(labels, min_area)


def drop_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """The objects of at least `min_area` pixels, renumbered 1..N in their order."""
    keep = np.bincount(labels.ravel()) >= min_area
    keep[0] = False
    if keep[1:].all():
        return labels
    return (np.cumsum(keep, dtype=np.int32) * keep)[labels]


def maxima(
    mask: np.ndarray,
    *,
    footprint: int = FOOTPRINT,
    min_radius: float = MIN_RADIUS,
    smoothing: float = SMOOTHING,
) -> tuple[np.ndarray, np.ndarray]:
    """The smoothed distance transform of the mask ("depth", float32) and its maxima as
    labelled seeds (int32): the deepest points of the `footprint`-wide squares around them,
    deeper than `min_radius`."""
    from scipy import ndimage as ndi

    depth = ndi.distance_transform_cdt(mask, "chessboard").astype(np.float32)
    depth = ndi.gaussian_filter(depth, smoothing)
    peaks = (depth >= ndi.maximum_filter(depth, size=footprint)) & mask & (depth > min_radius)
    return depth, ndi.label(peaks, _EIGHT)[0]


def _cut(
    labels: np.ndarray, seeds: np.ndarray, index: int, window: tuple[slice, ...], next_label: int
) -> int:
    """Give each pixel of component `index` to its nearest seed: the first seed's pixels keep
    `index`, the others' take labels from `next_label` on (returns the next free one); a part
    cut off from its label's largest 4-connected piece goes to the background."""
    from scipy import ndimage as ndi

    inside = labels[window] == index
    local = np.where(inside, seeds[window], 0)
    _, nearest = ndi.distance_transform_edt(local == 0, return_indices=True)
    owner = np.where(inside, local[nearest[0], nearest[1]], 0)
    crop = labels[window]
    crop[inside] = 0
    owners = np.unique(owner[inside])
    new_labels = [index, *range(next_label, next_label + len(owners) - 1)]
    for new, seed in zip(new_labels, owners, strict=True):
        parts, n_parts = ndi.label(owner == seed, _FOUR)
        largest = np.argmax(np.bincount(parts.ravel())[1:]) + 1 if n_parts > 1 else 1
        crop[parts == largest] = new
    return next_label + len(owners) - 1


@dataclass(frozen=True)
class Objects:
    """The objects of one image: the label image and, per object 1..N, area and score."""

    labels: np.ndarray  # H x W int32
    area: np.ndarray  # N pixels
    score: np.ndarray  # N mean foreground probabilities

    @property
    def count(self) -> int:
        return int(self.area.size)


def measure(labels: np.ndarray, probability: np.ndarray) -> Objects:
    n = int(labels.max()) if labels.size else 0
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    total = np.bincount(labels.ravel(), weights=probability.ravel(), minlength=n + 1)[1:]
    return Objects(labels, area, total / np.maximum(area, 1))


def label_png(labels: np.ndarray) -> bytes:
    n = int(labels.max()) if labels.size else 0
    if n > MAX_OBJECTS:
        raise InvalidInput(
            f"{n} objects: at most {MAX_OBJECTS} fit a 16-bit label image; ask for geojson or coco"
        )
    return encode_png(labels.astype(np.uint16), labels=True)


def geojson(objects: Objects, name: str, colour: tuple[int, int, int]) -> dict[str, Any]:
    """A FeatureCollection that QuPath imports as detections of class `name`."""
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring.tolist() for ring in rings]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": name, "color": list(colour)},
                "label": index,
                "area": int(area),
                "probability": round(float(score), 4),
                "measurements": {"Area px": int(area), "Mean probability": round(float(score), 4)},
            },
        }
        for index, (rings, area, score) in enumerate(
            zip(outlines(objects.labels), objects.area, objects.score, strict=True), start=1
        )
    ]
    return {"type": "FeatureCollection", "features": features}


def coco(objects: Objects, name: str) -> dict[str, Any]:
    """COCO-style `images`, `annotations` and `categories` of one image (image id 1, category
    id 1); `pycocotools.mask.decode(annotation["segmentation"])` is the object's mask."""
    from scipy import ndimage as ndi

    height, width = objects.labels.shape
    boxes = ndi.find_objects(objects.labels)
    annotations = [
        {
            "id": index,
            "image_id": 1,
            "category_id": 1,
            "segmentation": {"size": [height, width], "counts": counts},
            "area": int(area),
            "bbox": _xywh(box),
            "score": round(float(score), 4),
            "iscrowd": 0,
        }
        for index, (counts, box, area, score) in enumerate(
            zip(coco_rle(objects.labels), boxes, objects.area, objects.score, strict=True),
            start=1,
        )
    ]
    return {
        "images": [{"id": 1, "width": width, "height": height}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": name}],
    }


def _xywh(box: tuple[slice, slice]) -> list[int]:
    rows, cols = box
    return [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start]


# --------------------------------------------------------------------------- outlines

# Directions of the pixel-edge steps, clockwise on screen (y down): east, south, west, north.
_STEP_Y = np.array([0, 1, 0, -1])
_STEP_X = np.array([1, 0, -1, 0])


def outlines(labels: np.ndarray) -> list[list[np.ndarray]]:
    """Per object 1..N, its rings as K x 2 arrays of (x, y) pixel corners, first = last; the
    exterior first (clockwise on screen), then the holes. The rings follow the pixel edges, so
    the polygon's area is the object's pixel count; objects must be 4-connected (`split`'s are)."""
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return []
    padded = np.pad(labels, 1)
    rings: list[list[np.ndarray]] = [[] for _ in range(n)]
    for label, ring in _rings(*_edges(padded), shape=padded.shape):
        rings[label - 1].append(ring - 1)  # undo the padding
    for object_rings in rings:  # the exterior (positive area on screen) first
        object_rings.sort(key=lambda r: -_signed_area(r))
    return rings


def _edges(padded: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every pixel edge between an object and anything else, directed with the object on its
    right: (label, start y, start x, direction)."""
    found = []
    for direction, (dy, dx), (oy, ox) in zip(
        range(4),
        ((-1, 0), (0, 1), (1, 0), (0, -1)),  # the neighbour across the edge
        ((0, 0), (0, 1), (1, 1), (1, 0)),  # the edge's start corner, relative to the pixel
        strict=True,
    ):
        neighbour = np.roll(padded, (-dy, -dx), axis=(0, 1))
        y, x = np.nonzero((padded > 0) & (padded != neighbour))
        found.append((padded[y, x], y + oy, x + ox, np.full(y.size, direction)))
    return tuple(np.concatenate(parts) for parts in zip(*found, strict=True))


def _rings(
    label: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    direction: np.ndarray,
    shape: tuple[int, int],
) -> Iterator[tuple[int, np.ndarray]]:
    """Chain the edges into closed rings, yielding (label, corners). At a corner where an
    object touches itself diagonally the walk turns left, so the object is traced as
    8-connected and the background as 4-connected: rings never cross or touch themselves."""
    height, width = shape[0] + 1, shape[1] + 1  # corners
    corner = (label.astype(np.int64) * height + y) * width + x
    key = corner * 4 + direction
    order = np.argsort(key)
    sorted_keys = key[order]
    end = (label.astype(np.int64) * height + y + _STEP_Y[direction]) * width + x
    end = end + _STEP_X[direction]
    successor = np.full(key.size, -1)
    # left first (a choice only where the object touches itself diagonally), straight, right
    for turn in (3, 0, 1):
        wanted = end * 4 + (direction + turn) % 4
        at = np.minimum(np.searchsorted(sorted_keys, wanted), key.size - 1)
        hit = (sorted_keys[at] == wanted) & (successor < 0)
        successor[hit] = order[at[hit]]
    ring, rank = _cycles(successor)
    predecessor = np.empty_like(successor)
    predecessor[successor] = np.arange(key.size)
    turns = direction != direction[predecessor]  # the edges that start at a corner
    walk = np.lexsort((-rank, ring))  # each ring from its first edge on, rings one after another
    walk = walk[turns[walk]]
    bounds = np.flatnonzero(np.diff(ring[walk])) + 1
    for edges in np.split(walk, bounds):
        path = np.append(edges, edges[0])
        yield int(label[edges[0]]), np.stack([x[path], y[path]], axis=1)


def _cycles(successor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a permutation given as successor indices: each element's cycle (its smallest
    member) and its rank, the steps left to the cycle's last element before that smallest one
    (so sorting by descending rank walks the cycle from its smallest member). Pointer jumping:
    O(n log n) without a Python loop over the elements."""
    n = successor.size
    ring, jump = np.arange(n), successor.copy()
    for _ in range(max(1, int(np.ceil(np.log2(max(n, 2))))) + 1):
        ring = np.minimum(ring, ring[jump])
        jump = jump[jump]
    last = successor == ring  # the element before the cycle's smallest
    rank = np.where(last, 0, 1)
    jump = np.where(last, np.arange(n), successor)
    for _ in range(max(1, int(np.ceil(np.log2(max(n, 2))))) + 1):
        rank = rank + rank[jump]
        jump = jump[jump]
    return ring, rank


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


# --------------------------------------------------------------------------- COCO RLE


def coco_rle(labels: np.ndarray) -> list[str]:
    """Per object 1..N, COCO's compressed RLE string of its mask (what pycocotools' `encode`
    gives): the run lengths of the column-major mask, background first, from the fourth on
    written as the difference to the count two before, in 5-bit groups (pycocotools'
    rleToString)."""
    height, width = labels.shape
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return []
    flat = np.concatenate(([0], labels.T.ravel(), [0]))
    at = np.flatnonzero(flat[1:] != flat[:-1])  # a run of flat[at] ends, one of flat[at+1] starts
    owner = np.concatenate((flat[at], flat[at + 1]))
    position = np.concatenate((at, at))
    keep = owner > 0
    order = np.lexsort((position[keep], owner[keep]))
    owner, position = owner[keep][order], position[keep][order]
    starts = np.searchsorted(owner, np.arange(1, n + 1))
    return [_compress(_runs(bounds, height * width)) for bounds in np.split(position, starts[1:])]


def _runs(bounds: np.ndarray, size: int) -> np.ndarray:
    """Run lengths from the start, end, start, ... positions of the foreground runs."""
    counts = np.diff(bounds, prepend=0, append=size)
    return counts[:-1] if counts[-1] == 0 else counts


def _compress(counts: np.ndarray) -> str:
    values = counts.copy()
    values[3:] -= counts[1:-2]
    chars = []
    for value in values.tolist():
        more = True
        while more:
            c = value & 0x1F
            value >>= 5
            more = value != -1 if c & 0x10 else value != 0
            chars.append(chr(c + 48 + (0x20 if more else 0)))
    return "".join(chars)
