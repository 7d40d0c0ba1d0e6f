"""From logits to the bytes a user asked for: masks, label maps, RLE JSON, overlays,
probabilities. Torch-free; the server and `unetpp predict` both call `render`.

Per format (docs/tasks.md is the user's page):

- png: binary, the 0/255 mask; multi-class, the 8-bit label map (0 background, 1..K-1);
- json: the row-major RLE, area and bbox of the mask, or of each foreground class;
- overlay: the image with each foreground class drawn in its colour;
- probabilities: binary, a 16-bit PNG (p * 65535) or float32 NPY [H, W]; multi-class, a
  multi-page 16-bit TIFF (one page per class, background first) or float32 NPY [K, H, W];
- binary only, separate objects (core/instances.py, docs/instances.md): instances, a 16-bit
  PNG label image (0 background, 1..N); geojson, a FeatureCollection of one Polygon per object
  (QuPath detections); coco, COCO-style annotations with compressed RLE masks.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from unetpp.core import instances
from unetpp.core.errors import BadParameter
from unetpp.core.imageio import encode_png
from unetpp.core.preprocess import normalize, to_channels
from unetpp.core.task import OBJECT_FORMATS, Task

OVERLAY_ALPHA = 0.45
ENCODINGS = ("png16", "npy")
OBJECT_MEDIA_TYPES = dict(
    zip(OBJECT_FORMATS, ("image/png", "application/geo+json", "application/json"), strict=True)
)


@dataclass(frozen=True)
class Rendered:
    content: bytes | dict[str, Any]  # a dict for format=json
    media_type: str


def mask_png(mask: np.ndarray) -> bytes:
    """Boolean H x W -> 8-bit grey PNG, 0 background / 255 foreground."""
    return encode_png(mask.view(np.uint8) * np.uint8(255), labels=True)


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


def _region(mask: np.ndarray) -> dict[str, Any]:
    return {"counts": rle(mask), "area": int(np.count_nonzero(mask)), "bbox": bbox(mask)}


def mask_json(mask: np.ndarray) -> dict[str, Any]:
    return {"encoding": "rle", "order": "row-major", "size": list(mask.shape), **_region(mask)}


def labels_json(task: Task, labels: np.ndarray) -> dict[str, Any]:
    """Each foreground class's RLE, area and bbox, in label order."""
    classes = [
        {"index": index, "name": name, **_region(labels == index)}
        for index, name in enumerate(task.classes)
        if index > 0
    ]
    return {"encoding": "rle", "order": "row-major", "size": list(labels.shape), "classes": classes}


def display_rgb(image: np.ndarray) -> np.ndarray:
    """Any decoded image -> 8-bit RGB for people: 8-bit images as they are, others stretched
    between their 1st and 99.8th percentiles."""
    chw = to_channels(image, 3)
    if image.dtype == np.uint8:
        return chw.transpose(1, 2, 0).astype(np.uint8)
    scaled = np.clip(normalize(chw, 1.0, 99.8), 0.0, 1.0) * 255.0
    return scaled.transpose(1, 2, 0).astype(np.uint8)


def overlay_png(image: np.ndarray, labels: np.ndarray, task: Task) -> bytes:
    """The image with each foreground label blended in its class's colour."""
    rgb = display_rgb(image).astype(np.float32)
    colours = np.asarray(task.colours, dtype=np.float32)
    drawn = labels > 0
    rgb[drawn] = (1 - OVERLAY_ALPHA) * rgb[drawn] + OVERLAY_ALPHA * colours[labels[drawn]]
    return encode_png(rgb.round().astype(np.uint8))


def _png16(probabilities: np.ndarray) -> np.ndarray:
    return np.round(np.clip(probabilities, 0.0, 1.0) * 65535.0).astype(np.uint16)


def probabilities_png16(probabilities: np.ndarray) -> bytes:
    """H x W probabilities in [0, 1] -> 16-bit grey PNG (value / 65535 is the probability)."""
    return encode_png(_png16(probabilities))


def probabilities_tiff16(probabilities: np.ndarray) -> bytes:
    """K x H x W probabilities -> a K-page 16-bit grey TIFF (value / 65535, page k = class k)."""
    pages = [Image.fromarray(page) for page in _png16(probabilities)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    return buf.getvalue()


def probabilities_npy(probabilities: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, probabilities.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def render(
    task: Task, logits: np.ndarray, image: np.ndarray, fmt: str, *, encoding: str = "png16"
) -> Rendered:
    """Logits [K, H, W] of one image (at the image's size) -> the answer in format `fmt`."""
    if fmt not in task.formats:
        raise BadParameter(f"format {fmt!r}: a {task.kind} model answers {', '.join(task.formats)}")
    if fmt == "probabilities":
        return _probabilities(task, logits, encoding)
    if fmt in OBJECT_MEDIA_TYPES:
        return _objects(task, logits, fmt)
    labels = task.labels(logits)
    if fmt == "png":
        png = encode_png(labels, labels=True) if task.multiclass else mask_png(labels > 0)
        return Rendered(png, "image/png")
    if fmt == "json":
        body = labels_json(task, labels) if task.multiclass else mask_json(labels > 0)
        return Rendered(body, "application/json")
    return Rendered(overlay_png(image, labels, task), "image/png")


def _probabilities(task: Task, logits: np.ndarray, encoding: str) -> Rendered:
    if encoding not in ENCODINGS:
        raise BadParameter(f"encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")
    probabilities = task.probabilities(logits)
    if not task.multiclass:
        probabilities = probabilities[0]
    if encoding == "npy":
        return Rendered(probabilities_npy(probabilities), "application/x-npy")
    if task.multiclass:
        return Rendered(probabilities_tiff16(probabilities), "image/tiff")
    return Rendered(probabilities_png16(probabilities), "image/png")


def _objects(task: Task, logits: np.ndarray, fmt: str) -> Rendered:
    """A binary model's separate objects: label PNG, GeoJSON or COCO JSON (as bytes)."""
    split = instances.split(task.labels(logits) > 0)
    objects = instances.measure(split, task.probabilities(logits)[0])
    name = task.foreground[0]
    if fmt == "instances":
        content = instances.label_png(objects.labels)
    elif fmt == "geojson":
        content = _json(instances.geojson(objects, name, task.colours[1]))
    else:
        content = _json(instances.coco(objects, name))
    return Rendered(content, OBJECT_MEDIA_TYPES[fmt])


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
