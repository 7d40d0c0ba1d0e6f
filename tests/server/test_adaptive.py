"""mode=adaptive, format=uncertainty and format=levels over HTTP: a real server on the real tiny
repository (with its stage graphs and calibrated cascade), checked against the cascade run
locally and against the single graphs."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import (
    TILE_ABOVE,
    TILE_OVERLAP,
    TILE_SIZE,
    settings,
    start,
    stop,
    synthetic,
    unrle,
)
from unetpp.core.cascade import Cascade, agreement, disagreement_u16
from unetpp.core.imageio import encode_png
from unetpp.core.manifest import load_repository
from unetpp.core.preprocess import crop_to, pad_to_multiple


@pytest.fixture(scope="module")
def local(tiny_repository: Path) -> Cascade:
    manifest = load_repository(tiny_repository)
    return Cascade.open(
        tiny_repository, manifest, tile_above_pixels=TILE_ABOVE, tile=TILE_SIZE,
        overlap=TILE_OVERLAP,
    )  # fmt: skip


def padded(repo: Path, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    prep = load_repository(repo).preprocessing
    return pad_to_multiple(prep(image), prep.multiple)


def png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


@pytest.mark.parametrize("shape", [(100, 130), (300, 260)])  # whole; tiled (above TILE_ABOVE)
def test_adaptive_answers_as_the_cascade_does_and_says_how_deep(
    live, local: Cascade, tiny_repository: Path, shape: tuple[int, int]
) -> None:
    image = synthetic(*shape, seed=3)
    r = live.segment(encode_png(image), mode="adaptive", target=0.01, format="json")
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-unetpp-graph"] == "adaptive@0.01"
    assert body["route"]["reason"].startswith("mode=adaptive")
    x, size = padded(tiny_repository, image)
    expected = local.infer(x, local.target(0.01).thresholds)
    windows = [(w["y"], w["x"], w["level"]) for w in body["cascade"]]
    assert windows == [(w.y, w.x, w.level) for w in expected.windows]
    assert len(windows) == (1 if shape == (100, 130) else 9)
    shares = dict(kv.split("=") for kv in r.headers["x-unetpp-escalated"].split(","))
    assert {k: float(v) for k, v in shares.items()} == pytest.approx(
        {f"L{k}": s for k, s in enumerate(expected.reached()[1:], 2)}, abs=1e-3
    )
    mask = unrle(body["mask"]["counts"], shape)
    want = crop_to(expected.logits, size)[0] > 0.0
    assert np.mean(mask == want) >= 0.9999


def test_adaptive_is_a_candidate_and_bad_targets_are_422(live, image_png: bytes) -> None:
    r = live.segment(image_png, min_iou=0.0, format="json")
    names = {c["name"] for c in r.json()["route"]["candidates"]}
    assert {"adaptive@0.002", "adaptive@0.005", "adaptive@0.01"} <= names
    for params, message in (
        ({"mode": "adaptive", "target": 0.003}, "not calibrated"),
        ({"mode": "fast", "target": 0.01}, "mode=adaptive only"),
        ({"mode": "adaptive", "target": 2}, "target"),
    ):
        r = live.segment(image_png, **params)
        assert r.status_code == 422, r.text
        assert message in r.json()["detail"] or message in r.text


def test_uncertainty_is_the_heads_disagreement(
    live, local: Cascade, tiny_repository: Path, image: np.ndarray, image_png: bytes
) -> None:
    r = live.segment(image_png, format="uncertainty")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    got = png(r.content)
    assert got.dtype == np.uint16 and got.shape == image.shape
    x, size = padded(tiny_repository, image)
    want = disagreement_u16([crop_to(h, size) for h in local.infer_heads(x)])
    assert np.abs(got.astype(int) - want).max() <= 2
    assert r.headers["x-unetpp-graph"] == "heads"
    # the tiny model's export measured that its quality score does not rank images: not shipped
    assert "x-unetpp-quality" not in r.headers


def test_levels_gives_four_masks_in_one_request(live, image: np.ndarray, image_png: bytes) -> None:
    r = live.segment(image_png, format="levels")
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(body["levels"]) == ["L1", "L2", "L3", "L4"] and body["quality"] is None
    for k in range(1, 5):
        single = live.segment(image_png, level=k, format="json").json()["mask"]
        one = unrle(single["counts"], image.shape)
        all_at_once = unrle(body["levels"][f"L{k}"]["counts"], image.shape)
        assert np.mean(one == all_at_once) >= 0.9999


def test_the_quality_score_ships_where_the_export_measured_it_predicts(
    tiny_repository: Path, tmp_path: Path, local: Cascade, image: np.ndarray, image_png: bytes
) -> None:
    repo = shutil.copytree(tiny_repository, tmp_path / "models")
    data = json.loads((repo / "model.json").read_text())
    data["cascade"]["quality"]["spearman"] = {"synthetic:val": 0.8}
    (repo / "model.json").write_text(json.dumps(data))
    server = start(settings(repo))
    try:
        r = server.segment(image_png, format="levels")
        x, size = padded(repo, image)
        heads = [crop_to(h, size) for h in local.infer_heads(x)]
        want = agreement(heads[2], heads[3], 0.5)
        assert r.json()["quality"] == pytest.approx(want, abs=1e-4)
        assert float(r.headers["x-unetpp-quality"]) == pytest.approx(want, abs=1e-4)
    finally:
        stop(server)
