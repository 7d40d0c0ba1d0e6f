"""Separate objects: splitting touching objects, outlines as valid polygons, COCO RLE, and the
object-matching scores (pure arrays; the served formats are tested in tests/server)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from shapely import contains_xy
from shapely.geometry import Polygon, shape

from unetpp.core import instances
from unetpp.core.errors import BadParameter
from unetpp.core.imageio import decode_image
from unetpp.core.metrics import ObjectAccumulator, match_objects
from unetpp.core.render import OBJECT_MEDIA_TYPES, render
from unetpp.core.task import OBJECT_FORMATS, Task

# pycocotools' decode passes copy=False to numpy 2's __array__
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def disc(shape_: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[: shape_[0], : shape_[1]]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r**2


def touching_discs() -> np.ndarray:
    """Three discs of radius 14: two overlapping (one blob with a neck), one apart."""
    labels = np.zeros((80, 120), np.int32)
    labels[disc(labels.shape, 30, 30, 14)] = 1
    labels[disc(labels.shape, 30, 54, 14) & (labels == 0)] = 2
    labels[disc(labels.shape, 60, 95, 14)] = 3
    return labels


def test_touching_objects_are_split_and_separate_ones_kept() -> None:
    true = touching_discs()
    assert np.unique(instances.split(true > 0)).size - 1 == 3
    labels = instances.split(true > 0)
    assert match_objects(labels, true) == (3, 0, 0)
    assert set(np.unique(labels)) == {0, 1, 2, 3}  # numbered 1..N
    assert ((labels > 0) == (true > 0)).all()  # no pixel lost: nothing was cut off


def test_specks_are_dropped_and_the_rest_renumbered() -> None:
    true = touching_discs()
    mask = true > 0
    mask[2:8, 2:8] = True  # 36 px, above and before every disc in scan order
    labels = instances.split(mask)
    assert labels[2:8, 2:8].max() == 0
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert instances.split(mask, min_area=36)[2, 2] == 1  # kept when allowed, numbered first


def test_one_convex_object_is_not_split() -> None:
    mask = np.zeros((64, 64), bool)
    mask[10:50, 12:40] = True  # an elongated box: one distance maximum ridge
    mask |= disc(mask.shape, 30, 26, 16)
    assert instances.split(mask).max() == 1


def test_empty_mask_has_no_objects() -> None:
    labels = instances.split(np.zeros((32, 48), bool))
    assert labels.shape == (32, 48) and labels.max() == 0
    objects = instances.measure(labels, np.zeros((32, 48), np.float32))
    assert objects.count == 0
    assert instances.geojson(objects, "nucleus", (255, 0, 0))["features"] == []
    assert instances.coco(objects, "nucleus")["annotations"] == []


def awkward_labels() -> np.ndarray:
    """Objects with a hole, a hole touching the outside at a corner, one pixel, image edges."""
    labels = np.zeros((12, 14), np.int32)
    labels[0:5, 0:5] = 1
    labels[2, 2] = 0  # a hole
    labels[6:9, 6:9] = 2
    labels[7, 7] = 0
    labels[6, 6] = 0  # the hole touches the outside diagonally at a corner
    labels[11, 13] = 3  # one pixel in the corner of the image
    labels[0:12, 11] = 4  # a thin line along the height
    return labels


@pytest.mark.parametrize("labels", [awkward_labels(), touching_discs()], ids=["awkward", "discs"])
def test_outlines_are_valid_polygons_covering_exactly_the_objects(labels: np.ndarray) -> None:
    rings_per_object = instances.outlines(labels)
    assert len(rings_per_object) == labels.max()
    ys, xs = np.mgrid[: labels.shape[0], : labels.shape[1]]
    for index, rings in enumerate(rings_per_object, start=1):
        polygon = Polygon(rings[0], rings[1:])
        assert polygon.is_valid, index
        assert polygon.area == np.count_nonzero(labels == index)
        inside = contains_xy(polygon, xs + 0.5, ys + 0.5)  # pixel centres
        assert (inside == (labels == index)).all(), index


def test_geojson_features_are_qupath_detections() -> None:
    labels = touching_discs()
    probability = np.where(labels > 0, 0.9, 0.1).astype(np.float32)
    objects = instances.measure(labels, probability)
    collection = instances.geojson(objects, "nucleus", (255, 40, 40))
    assert collection["type"] == "FeatureCollection"
    for index, feature in enumerate(collection["features"], start=1):
        geometry = shape(feature["geometry"])
        assert feature["geometry"]["type"] == "Polygon" and geometry.is_valid
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "nucleus"
        assert props["label"] == index
        assert props["area"] == np.count_nonzero(labels == index) == geometry.area
        assert props["probability"] == pytest.approx(0.9, abs=1e-4)


def test_coco_rle_is_what_pycocotools_encodes_and_decodes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        raw = rng.integers(0, 4, (height, width))
        labels = np.unique(raw, return_inverse=True)[1].reshape(raw.shape)
        labels = labels + (raw.min() > 0)  # 1..N with 0 as background
        for index, counts in enumerate(instances.coco_rle(labels), start=1):
            mask = np.asfortranarray((labels == index).astype(np.uint8))
            assert counts == coco_mask.encode(mask)["counts"].decode()
            rle = {"size": [height, width], "counts": counts}
            assert (coco_mask.decode(rle) == mask).all()


def test_coco_annotations_load_in_pycocotools() -> None:
    labels = touching_discs()
    objects = instances.measure(labels, np.full(labels.shape, 0.75, np.float32))
    api = COCO()
    api.dataset = instances.coco(objects, "nucleus")
    api.createIndex()
    assert api.loadImgs(1)[0] == {"id": 1, "width": 120, "height": 80}
    for ann in api.loadAnns(api.getAnnIds(imgIds=1)):
        assert (api.annToMask(ann) == (labels == ann["id"])).all()
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(labels == ann["id"])
        assert [x, y, w, h] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
        assert ann["area"] == coco_mask.area(ann["segmentation"])
        assert ann["score"] == 0.75 and ann["category_id"] == 1


def test_label_png_is_16_bit_with_the_labels() -> None:
    labels = np.zeros((5, 300), np.int32)
    labels[0, :] = np.arange(300)
    decoded = decode_image(instances.label_png(labels))
    assert decoded.dtype == np.uint16 and (decoded == labels).all()


# --------------------------------------------------------------------------- scores


def test_object_scores_on_known_cases() -> None:
    true = touching_discs()
    perfect = ObjectAccumulator()
    perfect.update(true, true)
    assert perfect.as_dict() == {
        "ap50": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0,
        "tp": 3, "fp": 0, "fn": 0, "images": 1,
    }  # fmt: skip

    missed = ObjectAccumulator()
    missed.update(np.where(true == 3, 0, true), true)
    assert (missed.tp, missed.fp, missed.fn) == (2, 0, 1)
    assert missed.ap50 == pytest.approx(2 / 3)
    assert missed.precision == 1.0 and missed.recall == pytest.approx(2 / 3)
    assert missed.f1 == pytest.approx(0.8)

    # object 3 cut in two: the larger part still overlaps it with IoU >= 0.5, the other is an FP
    split = true.copy()
    split[(true == 3) & (np.arange(true.shape[1]) > 99)] = 9
    one_split = ObjectAccumulator()
    one_split.update(split, true)
    assert (one_split.tp, one_split.fp, one_split.fn) == (3, 1, 0)
    assert one_split.ap50 == pytest.approx(3 / 4)
    # objects 1 and 2 merged: the union holds all of 1, which is larger than 2 (the discs
    # overlap and the overlap is 1's), so it matches 1 with IoU > 0.5 and 2 is missed
    merged = np.where(true == 2, 1, true)
    assert match_objects(merged, true) == (2, 0, 1)


def test_object_scores_ignore_label_values_and_count_over_images() -> None:
    true = touching_discs()
    relabelled = np.select([true == 1, true == 2, true == 3], [500, 7, 65000], 0)
    assert match_objects(relabelled, true) == (3, 0, 0)
    acc = ObjectAccumulator()
    acc.update(true, true)
    acc.update(np.zeros_like(true), true)  # all missed
    assert (acc.tp, acc.fp, acc.fn, acc.images) == (3, 0, 3, 2)
    assert acc.ap50 == 0.5


# --------------------------------------------------------------------------- rendered


@pytest.mark.parametrize("fmt", OBJECT_FORMATS)
def test_a_binary_task_renders_its_objects(fmt: str) -> None:
    true = touching_discs()
    logits = np.where(true > 0, 4.0, -4.0).astype(np.float32)[None]
    task = Task.binary(name="nucleus")
    assert fmt in task.formats
    rendered = render(task, logits, np.zeros(true.shape, np.uint8), fmt)
    assert rendered.media_type == OBJECT_MEDIA_TYPES[fmt]
    if fmt == "instances":
        labels = decode_image(rendered.content)
    elif fmt == "geojson":
        features = json.loads(rendered.content)["features"]
        assert all(f["properties"]["classification"]["name"] == "nucleus" for f in features)
        labels = np.zeros(true.shape, np.int32)
        ys, xs = np.mgrid[: true.shape[0], : true.shape[1]]
        for index, feature in enumerate(features, start=1):
            labels[contains_xy(shape(feature["geometry"]), xs + 0.5, ys + 0.5)] = index
    else:
        annotations = json.loads(rendered.content)["annotations"]
        labels = np.zeros(true.shape, np.int32)
        for ann in annotations:
            labels[coco_mask.decode(ann["segmentation"]) > 0] = ann["id"]
    assert match_objects(labels, true) == (3, 0, 0)
    assert ((labels > 0) == (true > 0)).all()


def test_a_multiclass_task_has_no_object_formats() -> None:
    task = Task.from_names(["a", "b"])
    assert not set(OBJECT_FORMATS) & set(task.formats)
    with pytest.raises(BadParameter, match="coco"):
        render(task, np.zeros((3, 8, 8), np.float32), np.zeros((8, 8), np.uint8), "coco")


def test_synthetic_nuclei_carry_their_instance_labels() -> None:
    from unetpp.core.datasets import load_split

    for sample in load_split("synthetic", "val"):
        assert ((sample.objects > 0) == sample.mask).all()
        ids = np.unique(sample.objects[sample.objects > 0])
        assert ids.size >= 5  # the generator draws 12-45 nuclei, some off the edge
        assert match_objects(sample.objects, sample.objects) == (ids.size, 0, 0)
    assert all(s.objects is None for s in load_split("synthetic-classes", "val"))
