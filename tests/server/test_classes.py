"""A multi-class model served by a real server: the label map in the classes' order, per-class
JSON, the classes' colours, per-class probabilities, [N, K, H, W] on v2, the classes on
/v1/models."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

from tests.helpers import LiveServer, settings, start, stop, tiny_samples, unrle
from unetpp.core.imageio import encode_png
from unetpp.core.inference import create_session, predict_logits
from unetpp.core.manifest import read_manifest

CLASSES = ["background", "round", "elongated"]


@pytest.fixture(scope="module")
def cells(tiny_classes_repository: Path) -> Iterator[LiveServer]:
    server = start(settings(tiny_classes_repository))
    yield server
    stop(server)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return tiny_samples("val", classes=True)[0].image  # 72 x 100, uint16


def reference(repository: Path, graph_name: str, image: np.ndarray) -> np.ndarray:
    """The graph's logits [K, H, W] on the whole image with onnxruntime alone."""
    manifest = read_manifest(repository)
    graph = manifest.graph(graph_name)
    session = create_session(repository / graph.file)
    return predict_logits(session, image, manifest.preprocessing, graph.output)


def decode(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def test_png_is_the_label_map(cells, tiny_classes_repository, image):
    r = cells.segment(encode_png(image), level=2)
    assert r.status_code == 200, r.text
    labels = decode(r.content)
    assert labels.dtype == np.uint8 and labels.shape == image.shape
    expected = reference(tiny_classes_repository, "L2", image).argmax(axis=0)
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) == {0, 1, 2}  # the tiny model finds both kinds


def test_json_has_each_class(cells, image):
    png = encode_png(image)
    labels = decode(cells.segment(png, level=2).content)
    body = cells.segment(png, level=2, format="json").json()
    mask = body["mask"]
    assert [(c["index"], c["name"]) for c in mask["classes"]] == [(1, "round"), (2, "elongated")]
    for c in mask["classes"]:
        np.testing.assert_array_equal(unrle(c["counts"], tuple(mask["size"])), labels == c["index"])
        assert c["area"] == np.count_nonzero(labels == c["index"])


def test_overlay_draws_each_class_in_its_colour(cells, tiny_classes_repository, image):
    png = encode_png(image)
    labels = decode(cells.segment(png, level=2).content)
    colours = read_manifest(tiny_classes_repository).task.colours
    over = decode(cells.segment(png, level=2, format="overlay").content).astype(int)
    for index in (1, 2):
        strongest = int(np.argmax(colours[index]))
        pixels = over[labels == index]
        # pulled toward the class's colour: that colour's strongest channel leads
        assert (pixels[:, strongest] == pixels.max(axis=1)).all()
    grey = over[labels == 0]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()


def test_probabilities_per_class(cells, tiny_classes_repository, image):
    png = encode_png(image)
    r = cells.segment(png, level=2, format="probabilities", encoding="npy")
    assert r.headers["content-type"] == "application/x-npy"
    probs = np.load(io.BytesIO(r.content))
    assert probs.shape == (3, *image.shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, rtol=1e-5)
    logits = reference(tiny_classes_repository, "L2", image)
    np.testing.assert_array_equal(probs.argmax(axis=0), logits.argmax(axis=0))
    r = cells.segment(png, level=2, format="probabilities")
    assert r.headers["content-type"] == "image/tiff"
    pages = [np.asarray(p) for p in ImageSequence.Iterator(Image.open(io.BytesIO(r.content)))]
    assert len(pages) == 3 and pages[0].dtype == np.uint16
    np.testing.assert_allclose(np.stack(pages) / 65535.0, probs, atol=1 / 65535)


def test_object_formats_are_for_binary_models(cells, image):
    r = cells.segment(encode_png(image), format="instances")
    assert r.status_code == 422, r.text
    assert "multiclass" in r.json()["detail"]


def test_models_lists_the_classes(cells):
    model = cells.client.get("/v1/models").json()["models"][0]
    assert model["model"]["task"]["kind"] == "multiclass"
    assert model["model"]["task"]["classes"] == CLASSES
    assert model["model"]["num_classes"] == 3
    for graph in model["graphs"]:
        classes = graph["accuracy"]["classes"]
        assert set(classes) == {"round", "elongated"}
        mean = (classes["round"]["iou"] + classes["elongated"]["iou"]) / 2
        assert graph["accuracy"]["iou"] == pytest.approx(mean, abs=2e-6)


def test_v2_returns_n_k_h_w(cells, image):
    h, w = image.shape
    batch = np.stack([image, image[::-1]])[:, None]  # [2, 1, H, W]
    request = {
        "inputs": [
            {"name": "image", "datatype": "UINT16", "shape": list(batch.shape),
             "data": batch.ravel().tolist()}
        ],
        "parameters": {"level": 2},
    }  # fmt: skip
    meta = cells.client.get("/v2/models/cells").json()
    assert all(o["shape"] == [-1, 3, -1, -1] for o in meta["outputs"])
    r = cells.client.post("/v2/models/cells/infer", json=request)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert all(o["shape"] == [2, 3, h, w] for o in out.values())
    mask = np.array(out["mask"]["data"], np.uint8).reshape(2, 3, h, w)
    probs = np.array(out["probabilities"]["data"], np.float32).reshape(2, 3, h, w)
    assert (mask.sum(axis=1) == 1).all()  # one-hot
    np.testing.assert_array_equal(mask.argmax(axis=1), probs.argmax(axis=1))
    labels = decode(cells.segment(encode_png(image), level=2).content)
    np.testing.assert_array_equal(mask[0].argmax(axis=0), labels)


def test_a_schema_1_repository_still_serves(tiny_repository, tmp_path):
    """A repository exported before the task existed (schema 1: num_classes and threshold)
    serves the same masks as today's export of the same model."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_repository, old)
    data = json.loads((old / "model.json").read_text())
    task = data.pop("task")
    data.update(schema_version=1, num_classes=1, threshold=task["threshold"])
    (old / "model.json").write_text(json.dumps(data))
    png = encode_png(tiny_samples("val")[0].image)
    masks = []
    for repository in (old, tiny_repository):
        server = start(settings(repository))
        try:
            r = server.segment(png, level=2)
            assert r.status_code == 200, r.text
            masks.append(decode(r.content))
            model = server.client.get("/v1/models").json()["models"][0]["model"]
            assert model["task"]["kind"] == "binary" and model["threshold"] == 0.5
        finally:
            stop(server)
    np.testing.assert_array_equal(masks[0], masks[1])
    assert set(np.unique(masks[0])) == {0, 255}
