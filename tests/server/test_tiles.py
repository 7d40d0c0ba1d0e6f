"""A real server measures each graph's tile in the background and tiles large images with it."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np

from tests.helpers import TILE_OVERLAP, away_from_seams, settings, start, stop, synthetic
from unetpp.core.imageio import encode_png
from unetpp.core.inference import create_session, predict_logits
from unetpp.core.manifest import read_manifest
from unetpp.core.tiling import count

SIDE = 160  # the one candidate side (not tile_size, 128): 160 px, at batch 1 or the batch that fits


def test_a_large_image_is_tiled_at_the_graphs_measured_tile_and_equals_whole_inference(
    tiny_repository: Path,
):
    live = start(settings(tiny_repository, tile_sides=(SIDE,), max_batch=4))
    try:
        deadline = time.monotonic() + 120
        while True:  # the background calibration, after ready
            (model,) = live.client.get("/v1/models").json()["models"]
            tiles = {g["name"]: g["tile"] for g in model["graphs"]}
            if all(tiles.values()):
                break
            assert time.monotonic() < deadline, tiles
            time.sleep(0.2)
        assert {t["side"] for t in tiles.values()} == {SIDE}
        assert {t["batch"] for t in tiles.values()} <= {1, 4}

        height, width = 272, 300  # padded to 288 x 304; above tile_above_pixels: tiled
        image = synthetic(height, width, seed=3)
        png = encode_png(image)
        r = live.segment(png, level=4, format="json")
        assert r.status_code == 200, r.text
        assert r.json()["timings"]["tiles"] == count(288, 304, SIDE, TILE_OVERLAP)
        assert r.json()["timings"]["largest_batch"] <= tiles["L4"]["batch"]
        r = live.segment(png, level=4, format="probabilities", encoding="npy")
        tiled = np.load(io.BytesIO(r.content))
    finally:
        stop(live)
    manifest = read_manifest(tiny_repository)
    graph = manifest.graph("L4")
    session = create_session(tiny_repository / graph.file)
    logits = predict_logits(session, image, manifest.preprocessing, graph.output)[0]
    whole = 1 / (1 + np.exp(-logits))
    keep = away_from_seams(288, SIDE, TILE_OVERLAP)[:height, None]
    keep = keep & away_from_seams(304, SIDE, TILE_OVERLAP)[None, :width]
    assert keep.mean() > 0.1
    # L4 sees a little past the overlap: a pixel here may still differ in the third decimal
    np.testing.assert_allclose(tiled[keep], whole[keep], atol=2e-3)
    assert ((tiled > 0.5) == (whole > 0.5)).mean() > 0.99  # everywhere, seams included
