"""Separate objects over HTTP: format=instances, geojson and coco on a real server with the
tiny model, agreeing with each other, and one object across a tile seam kept whole."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from shapely import contains_xy
from shapely.geometry import shape

from tests.helpers import (
    TILE_ABOVE,
    TILE_OVERLAP,
    TILE_SIZE,
    settings,
    start,
    stop,
    synthetic,
)
from unetpp.core.imageio import decode_image, encode_png
from unetpp.core.metrics import match_objects
from unetpp.core.tiling import starts

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FIXED = {"level": 4, "precision": "fp32"}  # one graph, so the three formats see the same logits


def from_geojson(body: dict, size: tuple[int, int]) -> np.ndarray:
    labels = np.zeros(size, np.int32)
    ys, xs = np.mgrid[: size[0], : size[1]]
    for feature in body["features"]:
        polygon = shape(feature["geometry"])
        assert feature["geometry"]["type"] == "Polygon" and polygon.is_valid
        assert polygon.area == feature["properties"]["area"]
        assert feature["properties"]["objectType"] == "detection"
        inside = contains_xy(polygon, xs + 0.5, ys + 0.5)
        assert not labels[inside].any()  # objects do not overlap
        labels[inside] = feature["properties"]["label"]
    return labels


def from_coco(body: dict, size: tuple[int, int]) -> np.ndarray:
    assert body["images"] == [{"id": 1, "width": size[1], "height": size[0]}]
    labels = np.zeros(size, np.int32)
    for ann in body["annotations"]:
        mask = coco_mask.decode(ann["segmentation"]).astype(bool)
        assert ann["area"] == mask.sum() and 0 < ann["score"] <= 1
        labels[mask] = ann["id"]
    return labels


def test_the_three_object_formats_agree(live) -> None:
    image = synthetic(100, 130, seed=3)
    answers = {
        fmt: live.segment(encode_png(image), format=fmt, **FIXED)
        for fmt in ("instances", "geojson", "coco", "png")
    }
    for fmt, r in answers.items():
        assert r.status_code == 200, (fmt, r.text)
    assert answers["geojson"].headers["content-type"] == "application/geo+json"
    assert answers["coco"].headers["content-type"] == "application/json"
    labels = decode_image(answers["instances"].content)
    assert labels.dtype == np.uint16 and labels.shape == image.shape
    n = int(labels.max())
    assert n >= 3 and set(np.unique(labels)) == set(range(n + 1))  # objects 1..N
    assert ((labels > 0) <= (decode_image(answers["png"].content) > 0)).all()  # within the mask
    assert (from_geojson(answers["geojson"].json(), image.shape) == labels).all()
    assert (from_coco(answers["coco"].json(), image.shape) == labels).all()


def seam_image() -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A tiled-size image of dim nuclei-like discs and one at a corner where four windows meet."""
    size = 256
    assert size * size > TILE_ABOVE
    origins = starts(size, TILE_SIZE, TILE_OVERLAP)
    seam = origins[1] + TILE_OVERLAP // 2  # the middle of the first overlap
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:size, :size]
    disc = np.hypot(y - seam, x - seam) <= 16
    image = rng.normal(1000, 30, (size, size))
    image[disc] += 6000
    return np.clip(image, 0, 65535).astype(np.uint16), disc, (seam, seam)


def test_an_object_across_tile_seams_is_one_object(live) -> None:
    image, disc, centre = seam_image()
    timings = live.segment(encode_png(image), format="json", **FIXED).json()["timings"]
    assert timings["tiles"] == len(starts(image.shape[0], TILE_SIZE, TILE_OVERLAP)) ** 2
    r = live.segment(encode_png(image), format="instances", **FIXED)
    assert r.status_code == 200, r.text
    labels = decode_image(r.content)
    owner = labels[centre]
    assert owner > 0
    assert set(np.unique(labels[disc])) <= {0, owner}  # nothing else inside the disc
    assert match_objects(np.where(labels == owner, 1, 0), disc.astype(int)) == (1, 0, 0)


def test_openapi_documents_the_object_formats(live) -> None:
    spec = live.client.get("/openapi.json").json()
    params = spec["paths"]["/v1/segment"]["post"]["parameters"]
    fmt = next(p for p in params if p["name"] == "format")
    assert {"instances", "geojson", "coco"} <= set(fmt["schema"]["enum"])
    assert "QuPath" in fmt["description"]


def test_a_multiclass_model_refuses_the_object_formats(tiny_classes_repository, image_png):
    server = start(settings(tiny_classes_repository))
    try:
        r = server.segment(image_png, format="geojson")
    finally:
        stop(server)
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "invalid_parameter"
    assert "geojson" in body["detail"] and "png" in body["detail"]
