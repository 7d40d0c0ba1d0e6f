"""The service over HTTP: a real uvicorn server, the real tiny repository, real images."""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.helpers import (
    TILE_ABOVE,
    TILE_OVERLAP,
    TILE_SIZE,
    LiveServer,
    decode,
    failed_readiness,
    reference_logits,
    settings,
    start,
    stop,
    synthetic,
    unrle,
)
from unetpp.core.imageio import encode_png
from unetpp.core.manifest import read_manifest
from unetpp.core.tiling import starts

ROUTE_HEADERS = (
    "x-unetpp-graph",
    "x-unetpp-level",
    "x-unetpp-precision",
    "x-unetpp-route-reason",
    "x-unetpp-inference-ms",
    "x-unetpp-queue-ms",
)


def route_of(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()["route"]


def graph_info(live: LiveServer, name: str) -> dict:
    """One graph of the (only) model in GET /v1/models."""
    (model,) = live.client.get("/v1/models").json()["models"]
    return next(g for g in model["graphs"] if g["name"] == name)


# ---- start-up, health, models ---------------------------------------------------------------


def test_health_ready_and_models(live, tiny_repository):
    assert live.client.get("/healthz").json()["status"] == "alive"
    ready = live.client.get("/readyz").json()
    manifest = read_manifest(tiny_repository)
    assert ready["default"] == manifest.name and ready["models"] == {manifest.name: "ready"}
    listing = live.client.get("/v1/models").json()
    assert listing["default"] == manifest.name and len(listing["models"]) == 1
    models = listing["models"][0]
    assert models == live.client.get(f"/v1/models/{manifest.name}").json() | {
        "graphs": models["graphs"]  # served counters may move between the two calls
    }
    assert models["state"] == "ready" and models["device"] == "cpu"
    assert models["backend"] == "onnxruntime"
    assert models["providers"] == ["CPUExecutionProvider"]
    by_name = {g["name"]: g for g in models["graphs"]}
    assert list(by_name) == [g.name for g in manifest.graphs]
    for graph in manifest.graphs:
        shown = by_name[graph.name]
        assert shown["accuracy"]["iou"] == graph.accuracy.iou
        assert shown["parameters"] == graph.parameters and shown["level"] == graph.level
        sources = shown["latency_ms"]["sources"]
        # ready after one probe run per graph at the reference size: one graph timed, the
        # others estimated from it; the tile size is measured in the background
        assert sources[str(manifest.reference_size)] in {"probe", "estimate"}
        assert all(v > 0 for v in shown["latency_ms"]["known"].values())
        assert shown["bytes_per_pixel"] > 0 and shown["memory_source"] == "measured"
    assert set(models["modes_at_reference"]) == {"fast", "balanced", "accurate"}


def test_openapi_describes_the_segment_endpoint(live):
    spec = live.client.get("/openapi.json").json()
    op = spec["paths"]["/v1/segment"]["post"]
    params = {p["name"] for p in op["parameters"]}
    assert {"level", "mode", "max_latency_ms", "min_iou", "precision", "format"} <= params
    assert {"multipart/form-data", "image/png"} <= set(op["requestBody"]["content"])
    assert {"413", "415", "422", "503"} <= set(op["responses"])
    assert live.client.get("/docs").status_code == 200


def test_cuda_demanded_but_unusable_is_not_ready_and_says_why(tiny_repository):
    server = start(settings(tiny_repository, device="cuda"), ready=False)
    try:
        assert "CUDA" in failed_readiness(server)["detail"]
        refused = server.segment(encode_png(synthetic(32, 32)))
        assert refused.status_code == 503 and "CUDA" in refused.json()["detail"]
    finally:
        stop(server)


def test_a_tampered_graph_is_refused(tiny_repository, tmp_path):
    repository = tmp_path / "models"
    shutil.copytree(tiny_repository, repository)
    graph = repository / "L2.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    server = start(settings(repository), ready=False)
    try:
        detail = failed_readiness(server)["detail"]
        assert "L2" in detail and "sha256" in detail
    finally:
        stop(server)


# ---- output formats ---------------------------------------------------------------------------


def test_png_mask_is_the_whole_image_inference(live, tiny_repository, image, image_png):
    r = live.segment(image_png, level=2)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert all(h in r.headers for h in ROUTE_HEADERS)
    assert (r.headers["x-unetpp-graph"], r.headers["x-unetpp-level"]) == ("L2", "2")
    mask = decode(r.content)
    assert mask.shape == image.shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    expected = reference_logits(tiny_repository, "L2", image) > 0.0
    np.testing.assert_array_equal(mask == 255, expected)
    assert 0 < expected.mean() < 1  # a real segmentation, not all one value


def test_json_format(live, image_png):
    png = decode(live.segment(image_png, level=3).content) == 255
    body = live.segment(image_png, level=3, format="json").json()
    assert (body["width"], body["height"]) == (130, 100)
    assert body["graph"]["name"] == "L3" and body["graph"]["level"] == 3
    mask = body["mask"]
    decoded = unrle(mask["counts"], tuple(mask["size"]))
    np.testing.assert_array_equal(decoded, png)
    assert mask["area"] == int(png.sum())
    ys, xs = np.nonzero(png)
    assert mask["bbox"] == {
        "x": int(xs.min()),
        "y": int(ys.min()),
        "width": int(xs.max() - xs.min() + 1),
        "height": int(ys.max() - ys.min() + 1),
    }
    timings = body["timings"]
    assert timings["inference_ms"] > 0 and timings["total_ms"] >= timings["inference_ms"]
    assert timings["tiles"] == 0 and timings["batches"] == 1


def test_overlay_and_probabilities(live, image, image_png):
    mask = decode(live.segment(image_png, level=1).content) == 255
    overlay = decode(live.segment(image_png, level=1, format="overlay").content)
    assert overlay.shape == (*image.shape, 3)
    grey = overlay[~mask]
    assert (grey[:, 0] == grey[:, 1]).all()  # untouched pixels stay grey
    assert (overlay[mask][:, 0] > overlay[mask][:, 1]).all()  # the mask is drawn in red
    p16 = decode(live.segment(image_png, level=1, format="probabilities").content)
    assert p16.dtype == np.uint16 and p16.shape == image.shape
    r = live.segment(image_png, level=1, format="probabilities", encoding="npy")
    assert r.headers["content-type"] == "application/x-npy"
    probs = np.load(io.BytesIO(r.content))
    assert probs.dtype == np.float32 and probs.shape == image.shape
    np.testing.assert_array_equal(probs > 0.5, mask)
    assert np.abs(p16 / 65535.0 - probs).max() <= 1 / 65535


def test_multipart_and_image_kinds(live):
    grey16 = synthetic(64, 80)
    rgb = np.repeat((grey16 >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    palette = Image.fromarray(rgb).convert("P")
    files = {
        "png16": encode_png(grey16),
        "rgba": encode_png(np.dstack([rgb, np.full(grey16.shape, 255, np.uint8)])),
    }
    for fmt, img in (
        ("JPEG", Image.fromarray(rgb)),
        ("TIFF", Image.fromarray(grey16)),
        ("PNG", palette),
    ):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        files[fmt] = buf.getvalue()
    for name, data in files.items():
        r = live.client.post(
            "/v1/segment", files={"image": (name, data, "application/octet-stream")}
        )
        assert r.status_code == 200, (name, r.text)
        assert decode(r.content).shape == (64, 80), name
    tiny = live.segment(encode_png(np.zeros((1, 1), np.uint8)))
    assert tiny.status_code == 200 and decode(tiny.content).shape == (1, 1)


# ---- routing ----------------------------------------------------------------------------------


def test_explicit_levels_and_precision(live, image_png):
    for level in (1, 2, 3, 4):
        r = live.segment(image_png, level=level)
        assert r.headers["x-unetpp-level"] == str(level)
        assert r.headers["x-unetpp-graph"] == f"L{level}"
        assert r.headers["x-unetpp-precision"] == "fp32"
        assert r.headers["x-unetpp-route-reason"].startswith(f"level={level}")
    assert live.segment(image_png, precision="fp32").status_code == 200
    r = live.segment(image_png, precision="int8")
    assert r.status_code == 422 and "int8" in r.json()["detail"]


def test_modes(live, image_png):
    accurate = route_of(live.segment(image_png, mode="accurate", format="json"))
    best = max(c["iou"] for c in accurate["candidates"])
    chosen = {c["name"]: c for c in accurate["candidates"]}
    r = live.segment(image_png, mode="accurate", format="json")
    assert chosen[r.json()["graph"]["name"]]["iou"] == best

    balanced = live.segment(image_png, mode="balanced", format="json").json()
    fast = live.segment(image_png, mode="fast", format="json").json()
    cands = {c["name"]: c for c in fast["route"]["candidates"]}
    me, knee = cands[fast["graph"]["name"]], cands[balanced["graph"]["name"]]
    # fast: no slower and no more accurate than balanced's pick, within 0.02 IoU of it
    assert me["predicted_ms"] <= knee["predicted_ms"] and knee["iou"] - 0.02 - 1e-9 <= me["iou"]
    assert me["iou"] <= knee["iou"]
    default = live.segment(image_png, format="json").json()
    assert default["route"]["reason"].startswith("mode=balanced")
    for body in (balanced, default):
        cands = {c["name"]: c for c in body["route"]["candidates"]}
        me = cands[body["graph"]["name"]]
        dominated_by = [
            c
            for c in cands.values()
            if c["predicted_ms"] < me["predicted_ms"] and c["iou"] > me["iou"]
        ]
        assert not dominated_by  # the knee lies on the accuracy/latency front


def test_latency_budget(live, image_png):
    r = live.segment(image_png, max_latency_ms=1e6, format="json")
    route = route_of(r)
    iou = {c["name"]: c["iou"] for c in route["candidates"]}
    assert iou[r.json()["graph"]["name"]] == max(iou.values())  # the most accurate (ties: any)
    assert "x-unetpp-target-missed" not in r.headers

    # a budget between the fastest and the slowest prediction: the best graph that fits
    cands = route["candidates"]
    times = sorted(c["predicted_ms"] for c in cands)
    r = live.segment(image_png, max_latency_ms=(times[0] + times[-1]) / 2, format="json")
    route = route_of(r)
    fits = [
        c
        for c in route["candidates"]
        if route["queue_ms"] + c["predicted_ms"] <= (times[0] + times[-1]) / 2
    ]
    if fits:
        assert r.json()["graph"]["name"] in {
            c["name"] for c in fits if c["iou"] == max(f["iou"] for f in fits)
        }

    # a budget no graph meets: the fastest, and the response says the budget was missed
    r = live.segment(image_png, max_latency_ms=0.001, format="json")
    route = route_of(r)
    fastest = min(route["candidates"], key=lambda c: c["predicted_ms"])
    assert r.json()["graph"]["name"] == fastest["name"]
    assert route["missed"] and r.headers["x-unetpp-target-missed"] == "max_latency_ms"
    assert "budget missed" in r.headers["x-unetpp-route-reason"]


def test_min_iou(live, image_png):
    cands = route_of(live.segment(image_png, level=1, format="json"))["candidates"]
    floor = sorted(c["iou"] for c in cands)[len(cands) // 2]
    r = live.segment(image_png, min_iou=floor, format="json")
    route = route_of(r)
    reach = [c for c in route["candidates"] if c["iou"] >= floor]
    assert r.json()["graph"]["name"] == min(reach, key=lambda c: c["predicted_ms"])["name"]
    top = max(c["iou"] for c in cands)
    if top < 1.0:
        r = live.segment(image_png, min_iou=min(1.0, top + 0.001), format="json")
        assert route_of(r)["missed"] and r.headers["x-unetpp-target-missed"] == "min_iou"


def test_the_predictor_learns_from_traffic(live):
    image = encode_png(synthetic(48, 208))  # 48 x 208: a pixel count nothing calibrated
    for _ in range(3):
        assert live.segment(image, level=1).status_code == 200
    l1 = graph_info(live, "L1")
    assert str(48 * 208) in l1["latency_ms"]["known"]
    assert l1["latency_ms"]["observations"] >= 3 and l1["served"]["requests"] >= 3


# ---- batching, tiling -------------------------------------------------------------------------


def test_concurrent_requests_are_batched(live, image_png):
    single = decode(live.segment(image_png, level=1).content)
    n = 6
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def call(i: int) -> None:
        barrier.wait()
        results[i] = live.segment(image_png, level=1, format="json")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results)
    assert max(r.json()["timings"]["largest_batch"] for r in results) > 1
    for r in results:  # batching does not change a result
        mask = r.json()["mask"]
        np.testing.assert_array_equal(unrle(mask["counts"], tuple(mask["size"])), single == 255)
    l1 = graph_info(live, "L1")
    assert l1["served"]["max_batch"] > 1
    assert l1["served"]["images"] > l1["served"]["batches"]


def test_tiled_equals_whole_image_away_from_seams(live, tiny_repository):
    height, width = 272, 300  # above TILE_ABOVE: tiled
    assert height * width > TILE_ABOVE
    image = synthetic(height, width, seed=3)
    r = live.segment(encode_png(image), level=4, format="probabilities", encoding="npy")
    tiled = np.load(io.BytesIO(r.content))
    whole = 1 / (1 + np.exp(-reference_logits(tiny_repository, "L4", image)))
    assert tiled.shape == whole.shape == (height, width)
    # away from seams: pixels at least one overlap inside every window edge that is not an
    # image edge, i.e. covered by one window only and far from its cut
    keep = np.ones((height, width), bool)
    for axis, length in ((0, 288), (1, 304)):  # padded to multiples of 16
        origins = starts(length, TILE_SIZE, TILE_OVERLAP)
        for o in origins[1:]:
            sl = [slice(None)] * 2
            sl[axis] = slice(max(o - TILE_OVERLAP, 0), o + 2 * TILE_OVERLAP)
            keep[tuple(sl)] = False
    assert keep.mean() > 0.1
    np.testing.assert_allclose(tiled[keep], whole[keep], atol=1e-3)
    assert ((tiled > 0.5) == (whole > 0.5)).mean() > 0.99  # everywhere, seams included


def test_4096_square_is_tiled_in_bounded_memory(live):
    image = synthetic(4096, 4096, seed=1)
    r = live.segment(encode_png(image), level=1, format="json")
    body = r.json()
    assert r.status_code == 200, r.text
    assert (body["width"], body["height"]) == (4096, 4096)
    assert body["timings"]["tiles"] > 100 and body["timings"]["largest_batch"] > 1
    assert 0 < body["mask"]["area"] < 4096 * 4096


# ---- errors -----------------------------------------------------------------------------------


def test_client_errors_are_json_4xx(live, image_png):
    cases = [
        (live.client.get("/nope"), 404, "not_found"),
        (live.client.delete("/v1/segment"), 405, "method_not_allowed"),
        (live.segment(image_png, level=7), 422, "invalid_parameter"),
        (live.segment(image_png, mode="fastest"), 422, "invalid_parameter"),
        (live.segment(image_png, level=2, mode="fast"), 422, "invalid_parameter"),
        (live.segment(image_png, colour="red"), 422, "invalid_parameter"),
        (live.segment(image_png, "text/plain"), 415, "unsupported_media_type"),
        (live.client.post("/v1/segment", content=image_png), 415, "unsupported_media_type"),
        (live.segment(b"GIF89a" + bytes(64), "image/gif"), 400, "undecodable_image"),
        (live.segment(b"not an image"), 400, "undecodable_image"),
        (live.segment(image_png[: len(image_png) // 2]), 400, "undecodable_image"),
        (live.segment(b""), 400, "undecodable_image"),
        (
            live.client.post("/v1/segment", files={"picture": ("a.png", image_png, "image/png")}),
            422,
            "invalid_parameter",
        ),
    ]
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, format="GIF")
    cases.append((live.segment(gif.getvalue(), "image/gif"), 415, "unsupported_media_type"))
    for response, status, error in cases:
        assert (response.status_code, response.json()["error"]) == (status, error), response.text
        assert set(response.json()) == {"error", "detail"}
    assert live.client.get("/healthz").status_code == 200  # still up


@pytest.fixture(scope="module")
def strict(tiny_repository):
    """A second server with small limits and a queue of one request (and without onnxruntime's
    memory arena, so that setting serves requests too)."""
    server = start(
        settings(
            tiny_repository,
            max_queue=1,
            max_body_bytes=200_000,
            max_body_bytes_in_flight=6_000,
            max_pixels=300 * 300,
            max_side=400,
            memory_arena=False,
        )
    )
    yield server
    stop(server)


def slow_upload(url: str, query: str, declared: int, sent: bytes) -> socket.socket:
    """A request whose body arrives late: the server has admitted it and waits for the rest."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST /v1/segment?{query} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + sent)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    sock.close()
    return int(lines[0].split()[1]), headers, body


def test_limits_give_413(strict):
    big = encode_png(synthetic(310, 310))
    r = strict.segment(big)
    assert (r.status_code, r.json()["error"]) == (413, "image_too_large")
    r = strict.segment(encode_png(synthetic(8, 401)))
    assert (r.status_code, r.json()["error"]) == (413, "image_too_large")
    noise = np.random.default_rng(0).integers(0, 65535, (400, 300), dtype=np.uint16)
    r = strict.segment(encode_png(noise))  # > 200 kB, declared by Content-Length
    assert (r.status_code, r.json()["error"]) == (413, "body_too_large")

    def chunks():  # no Content-Length: counted while it streams
        data = encode_png(noise)
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    r = strict.client.post("/v1/segment", content=chunks(), headers={"content-type": "image/png"})
    assert (r.status_code, r.json()["error"]) == (413, "body_too_large")
    assert strict.segment(encode_png(synthetic(64, 64))).status_code == 200


def test_bodies_in_flight_are_bounded_503_with_retry_after(strict, image_png):
    """A slow upload holds the bytes it sent (not a queue slot); another body that would pass
    `max_body_bytes_in_flight` is refused at once, and served again once the first is done."""
    assert len(image_png) > 6_000
    sock = slow_upload(strict.url, "format=json", len(image_png), image_png[:4_000])
    deadline = time.monotonic() + 10
    while strict.client.get("/v1/models").json()["queue"]["body_bytes_in_flight"] < 4_000:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert strict.client.get("/v1/models").json()["queue"]["in_flight"] == 0
    r = strict.segment(image_png)
    assert (r.status_code, r.json()["error"]) == (503, "queue_full")
    assert int(r.headers["retry-after"]) >= 1
    sock.sendall(image_png[4_000:])
    status, _, body = read_response(sock)
    assert status == 200 and json.loads(body)["width"] == 130  # the slow one is served
    assert strict.segment(image_png).status_code == 200  # and the budget has room again
    assert strict.client.get("/v1/models").json()["queue"]["body_bytes_in_flight"] == 0


def test_deadline_gives_504(strict):
    large = encode_png(synthetic(300, 300))  # tiled: several runs, far more than 1 ms
    r = strict.segment(large, deadline_ms=1)
    assert (r.status_code, r.json()["error"]) == (504, "deadline_exceeded")
    assert strict.segment(large, deadline_ms=60_000).status_code == 200


# ---- no torch ---------------------------------------------------------------------------------

NO_TORCH_SERVE = """
import json, os, signal, sys, threading, time
import httpx, numpy as np
from unetpp.cli import main
from unetpp.core.imageio import encode_png

repo, port = sys.argv[1], sys.argv[2]
out = {}

def client():
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    image = encode_png(np.arange(48 * 64, dtype=np.uint16).reshape(48, 64))
    r = httpx.post(url + "/v1/segment?mode=fast", content=image, headers={"content-type": "image/png"})
    out["status"], out["level"] = r.status_code, r.headers.get("x-unetpp-level")
    out["torch"] = any(m == "torch" or m.startswith("torch.") for m in sys.modules)
    out["model"] = any(m.startswith(("unetpp.model", "unetpp.export")) for m in sys.modules)
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=client, daemon=True).start()
code = main(["serve", "--models", repo, "--port", port])
print(json.dumps({**out, "exit": code}))
"""


def test_serve_runs_without_torch(run_without_torch, tiny_repository):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_without_torch(NO_TORCH_SERVE, str(tiny_repository), str(port), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"status": 200, "level": out["level"], "torch": False, "model": False, "exit": 0}
    assert out["level"] in {"1", "2", "3", "4"}


def test_python_m_form_without_torch(run_without_torch, tmp_path):
    run_module = "import runpy, sys; sys.argv = ['x', *sys.argv[1:]]; runpy.run_module('unetpp.server', run_name='__main__')"
    result = run_without_torch(run_module, "--help")
    assert result.returncode == 0, result.stderr
    assert "--models" in result.stdout
    result = run_without_torch(run_module, "--models", str(tmp_path), "--port", "-1")
    assert result.returncode == 2 and "UNETPP_PORT" in result.stderr
