"""UNETPP_BACKEND over HTTP: a real server on OpenVINO serves the fp32 and the bf16 graphs of
the tiny repository, and runs mode=adaptive's stage graphs too; on onnxruntime the bf16 entries
are skipped; a missing openvino keeps the server not ready with the reason."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.helpers import (
    TILE_ABOVE,
    TILE_OVERLAP,
    TILE_SIZE,
    decode,
    failed_readiness,
    reference_logits,
    settings,
    start,
    stop,
    synthetic,
)
from unetpp.core.backends import OvSession, bf16_runs
from unetpp.core.cascade import Cascade
from unetpp.core.imageio import encode_png
from unetpp.core.manifest import load_repository
from unetpp.core.preprocess import crop_to, pad_to_multiple

IMAGE = synthetic(100, 130, seed=3)


def graphs(live) -> list[str]:
    return [g["name"] for g in live.client.get("/v1/models").json()["models"][0]["graphs"]]


def mask(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return decode(response.content) == 255


@pytest.mark.skipif(not bf16_runs(), reason="OpenVINO does not compute in bf16 here")
def test_openvino_backend_serves_fp32_and_bf16_graphs(tiny_bf16_repository, monkeypatch):
    monkeypatch.setenv("UNETPP_BACKEND", "openvino")
    live = start(settings(tiny_bf16_repository))
    try:
        served = graphs(live)
        assert {"L1", "L4", "L1.bf16", "L4.bf16"} <= set(served)
        assert live.client.get("/v1/models").json()["models"][0]["backend"] == "openvino"
        reference = reference_logits(tiny_bf16_repository, "L4", IMAGE) > 0.0
        assert 0 < reference.mean() < 1
        fp32 = live.segment(encode_png(IMAGE), level=4, precision="fp32")
        assert (fp32.headers["x-unetpp-graph"], fp32.headers["x-unetpp-precision"]) == (
            "L4",
            "fp32",
        )
        assert (mask(fp32) == reference).mean() >= 0.999  # OpenVINO f32: onnxruntime's logits
        bf16 = live.segment(encode_png(IMAGE), level=4, precision="bf16")
        assert (bf16.headers["x-unetpp-graph"], bf16.headers["x-unetpp-precision"]) == (
            "L4.bf16",
            "bf16",
        )
        assert (mask(bf16) == reference).mean() >= 0.99
        routed = live.segment(encode_png(IMAGE), mode="fast")
        assert mask(routed).shape == IMAGE.shape and routed.headers["x-unetpp-graph"] in served
    finally:
        stop(live)


def test_openvino_backend_runs_the_adaptive_cascade(tiny_repository):
    pytest.importorskip("openvino")
    manifest = load_repository(tiny_repository)
    tiles = dict(tile_above_pixels=TILE_ABOVE, tile=TILE_SIZE, overlap=TILE_OVERLAP)
    local = Cascade.open(tiny_repository, manifest, **tiles)  # on onnxruntime
    live = start(settings(tiny_repository, backend="openvino"))
    try:
        engine = live.server.config.app.state.registry.engine(None)
        assert all(isinstance(s, OvSession) for s in engine.cascade.sessions)
        for shape in [(100, 130), (300, 260)]:  # whole; tiled (above TILE_ABOVE)
            image = synthetic(*shape, seed=5)
            x, size = pad_to_multiple(
                manifest.preprocessing(image), manifest.preprocessing.multiple
            )
            want = local.infer(x, local.target(0.01).thresholds).logits
            reference = crop_to(want, size)[0] > 0.0
            assert 0 < reference.mean() < 1
            r = live.segment(encode_png(image), mode="adaptive", target=0.01)
            assert r.headers["x-unetpp-graph"] == "adaptive@0.01"
            assert (mask(r) == reference).mean() >= 0.99
    finally:
        stop(live)


def test_onnxruntime_backend_skips_bf16_graphs(tiny_bf16_repository, caplog):
    with caplog.at_level("INFO", logger="unetpp.core.backends"):
        live = start(settings(tiny_bf16_repository, backend="onnxruntime"))
    try:
        assert graphs(live) == ["L1", "L2", "L3", "L4"]
        assert "graph L4.bf16: bf16 runs on the openvino backend only" in caplog.text
        refused = live.segment(encode_png(IMAGE), level=4, precision="bf16")
        assert refused.status_code == 422 and "no bf16 graph" in refused.json()["detail"]
    finally:
        stop(live)


def test_openvino_missing_is_not_ready_with_the_reason(tiny_repository, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    server = start(settings(tiny_repository, backend="openvino"), ready=False)
    try:
        detail = failed_readiness(server)["detail"]
        assert "UNETPP_BACKEND=openvino: the openvino package is not installed" in detail
        refused = server.segment(encode_png(IMAGE))
        assert refused.status_code == 503 and "openvino" in refused.json()["detail"]
    finally:
        stop(server)
