"""unetpp.client against a real server on the tiny model: every output format, v2 tensors,
errors, the API key, and retries (a real server made busy, a port nobody listens on)."""

from __future__ import annotations

import asyncio
import io
import itertools
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import LiveServer, free_port, settings, start, stop, synthetic
from unetpp.client import APIError, AsyncClient, Client, Retry
from unetpp.core.imageio import encode_png
from unetpp.core.manifest import read_manifest

LEVEL = 2  # an explicit graph: every format below comes from the same logits


@pytest.fixture(scope="module")
def server(tiny_repository: Path) -> Iterator[LiveServer]:
    live = start(settings(tiny_repository, max_wait_ms=5.0))
    yield live
    stop(live)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[Client]:
    with Client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return synthetic(100, 130, seed=3)


def rle_decode(body: dict) -> np.ndarray:
    counts, (h, w) = body["counts"], body["size"]
    values = np.arange(len(counts)) % 2 == 1  # background first
    return np.repeat(values, counts).reshape(h, w)


def test_every_format_round_trips_from_the_same_logits(client: Client, image: np.ndarray):
    png = client.segment(encode_png(image), level=LEVEL)
    assert png.media_type == "image/png" and png.graph == f"L{LEVEL}" and png.level == LEVEL
    assert png.precision == "fp32" and f"level={LEVEL}" in png.route_reason
    assert png.target_missed is None and png.inference_ms > 0 and png.request_id
    mask = png.array
    assert mask.shape == image.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert 0 < np.count_nonzero(mask) < mask.size  # the tiny model finds nuclei, not all pixels

    body = client.segment(image, level=LEVEL, format="json").json
    assert body["graph"]["name"] == f"L{LEVEL}" and (body["height"], body["width"]) == image.shape
    np.testing.assert_array_equal(rle_decode(body["mask"]), mask > 0)

    overlay = client.segment(image, level=LEVEL, format="overlay").array
    assert overlay.shape == (*image.shape, 3) and overlay.dtype == np.uint8
    assert (overlay[mask > 0, 0] >= overlay[mask > 0, 2]).all()  # drawn in red

    p16 = client.segment(image, level=LEVEL, format="probabilities").array
    npy = client.segment(image, level=LEVEL, format="probabilities", encoding="npy")
    assert npy.media_type == "application/x-npy" and npy.json is None
    assert p16.dtype == np.uint16 and npy.array.dtype == np.float32
    np.testing.assert_allclose(p16 / 65535.0, npy.array, atol=1 / 65535.0)
    threshold = read_manifest(client_repository(client)).threshold
    np.testing.assert_array_equal(npy.array > threshold, mask > 0)


def client_repository(client: Client) -> Path:
    return Path(default_model(client)["model"]["directory"])


def default_model(client: Client) -> dict:
    listing = client.models()
    return next(m for m in listing["models"] if m["name"] == listing["default"])


def test_arrays_are_sent_without_loss(client: Client, image: np.ndarray):
    """A uint16 array is the same request as its 16-bit PNG; an int32 array of 16-bit values
    too; a float array cannot be sent losslessly and is refused before sending."""
    as_png = client.segment(encode_png(image), level=LEVEL).array
    np.testing.assert_array_equal(client.segment(image, level=LEVEL).array, as_png)
    np.testing.assert_array_equal(client.segment(image.astype(np.int32), level=LEVEL).array, as_png)
    rgb = np.stack([(image >> 8).astype(np.uint8)] * 3, axis=-1)
    assert client.segment(rgb, level=LEVEL).array.shape == image.shape
    with pytest.raises(ValueError, match="lossless"):
        client.segment(image.astype(np.float32) / 7, level=LEVEL)


def test_v2_infer_numpy_in_numpy_out(client: Client, image: np.ndarray):
    name = client.models()["default"]
    result = client.infer(name, image[None, None], version=f"L{LEVEL}")
    assert result.model_version == f"L{LEVEL}" and result.parameters["level"] == LEVEL
    assert set(result.outputs) == {"logits", "probabilities", "mask"}
    mask = result.outputs["mask"]
    assert mask.shape == (1, 1, *image.shape) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask[0, 0] * 255, client.segment(image, level=LEVEL).array)
    routed = client.infer(name, image, outputs=("probabilities",), mode="fast")
    assert set(routed.outputs) == {"probabilities"}
    assert routed.outputs["probabilities"].dtype == np.float32


def test_models_ready_and_errors(client: Client):
    assert client.ready() is True
    assert {g["name"] for g in default_model(client)["graphs"]} >= {"L1", "L2", "L3", "L4"}
    with pytest.raises(APIError) as bad:
        client.segment(b"\x89PNG but not really")
    assert bad.value.status == 400 and bad.value.error == "undecodable_image"
    assert bad.value.detail and bad.value.request_id
    with pytest.raises(APIError) as conflict:
        client.segment(synthetic(32, 32), level=1, mode="fast")
    assert conflict.value.status == 422 and conflict.value.error == "invalid_parameter"
    with pytest.raises(APIError) as v2:  # v2's {"error": "code: detail"}
        client.infer("no-such-model", np.zeros((16, 16), np.uint8))
    assert v2.value.status == 404 and v2.value.error == "model_not_found"
    assert "no-such-model" in v2.value.detail


def test_the_named_model_path(client: Client, image: np.ndarray):
    name = client.models()["default"]
    named = client.segment(image, model=name, level=LEVEL)
    np.testing.assert_array_equal(named.array, client.segment(image, level=LEVEL).array)
    with pytest.raises(APIError) as missing:
        client.segment(image, model="no-such-model")
    assert missing.value.status == 404


def test_the_api_key(tiny_repository: Path, image: np.ndarray):
    live = start(settings(tiny_repository, api_key="s3cret"), ready=False)
    try:
        with Client(live.url, api_key="s3cret") as keyed, Client(live.url) as anonymous:
            deadline = time.monotonic() + 60
            while not keyed.ready():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert keyed.segment(image, level=LEVEL).graph == f"L{LEVEL}"
            with pytest.raises(APIError) as refused:
                anonymous.segment(image)
            assert refused.value.status == 401 and refused.value.error == "unauthorized"
    finally:
        stop(live)


def busy(live: LiveServer) -> bool:
    """Whether the slow request holds its place (an admission, or its body's bytes)."""
    queue = live.client.get("/v1/models").json()["queue"]
    return queue["in_flight"] + queue.get("body_bytes_in_flight", 0) > 0


def slow_upload(url: str, body: bytes, hold_s: float) -> threading.Thread:
    """A request that holds the server's room for others (its only queue slot, or all the
    bytes of bodies in flight it allows) for `hold_s` seconds, without using the CPU."""

    def chunks() -> Iterator[bytes]:
        yield body[:100]
        time.sleep(hold_s)
        yield body[100:]

    def send() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            answer = http.post(
                "/v1/segment", content=chunks(), headers={"content-type": "image/png"}
            )
            assert answer.status_code == 200

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_503_is_retried_after_retry_after(tiny_repository: Path, image: np.ndarray):
    tight = {"max_queue": 1, "max_body_bytes_in_flight": 1000, "max_wait_ms": 5.0}
    patient = {"body_timeout_s": 60.0, "min_body_rate": 1.0}  # the slow upload is no attack
    live = start(settings(tiny_repository, **tight, **patient))
    seen: list[tuple[float, int, str | None]] = []

    def record(response: httpx.Response) -> None:
        seen.append((time.monotonic(), response.status_code, response.headers.get("Retry-After")))

    try:
        holder = slow_upload(live.url, encode_png(image), hold_s=1.5)
        deadline = time.monotonic() + 10
        while not busy(live):
            assert time.monotonic() < deadline, "the slow request was not taken in"
            time.sleep(0.02)
        hooks = {"event_hooks": {"response": [record]}}
        with Client(live.url, retry=Retry(attempts=10, total_s=30), http=hooks) as client:
            result = client.segment(image, level=LEVEL)
        holder.join()
        with Client(live.url, retry=Retry(attempts=10, total_s=0.5), http=hooks) as impatient:
            holder = slow_upload(live.url, encode_png(image), hold_s=1.0)
            while not busy(live):
                time.sleep(0.02)
            calls = len(seen)
            with pytest.raises(APIError) as gave_up:
                impatient.segment(image, level=LEVEL)
            holder.join()
    finally:
        stop(live)
    assert result.graph == f"L{LEVEL}"
    statuses = [status for _, status, _ in seen[:calls]]
    assert statuses[0] == 503 and statuses[-1] == 200 and set(statuses[:-1]) == {503}
    for (t0, status, after), (t1, _, _) in itertools.pairwise(seen[:calls]):
        assert status == 503 and after is not None and t1 - t0 >= float(after) * 0.95
    # a Retry-After beyond the total budget: no second try
    assert gave_up.value.status == 503 and gave_up.value.error == "queue_full"
    assert gave_up.value.retry_after is not None and len(seen) == calls + 1


def test_connection_errors_are_retried_a_bounded_number_of_times():
    tries: list[httpx.Request] = []
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens
    hooks = {"event_hooks": {"request": [tries.append]}}
    with Client(url, retry=Retry(attempts=3, backoff_s=0.01), http=hooks) as client:
        with pytest.raises(APIError) as failed:
            client.models()
        assert client.ready() is False
    assert failed.value.status == 0 and failed.value.error == "connection_error"
    assert len(tries) == 3 + 1  # three tries of models(), one of ready() (never retried)


def test_the_async_client_answers_like_the_blocking_one(server: LiveServer, image: np.ndarray):
    images = [synthetic(80, 96, seed=s) for s in range(4)]

    async def main() -> list:
        async with AsyncClient(server.url) as client:
            assert await client.ready()
            name = (await client.models())["default"]
            v2 = await client.infer(name, images[0], version=f"L{LEVEL}", outputs=("mask",))
            masks = await asyncio.gather(*(client.segment(i, level=LEVEL) for i in images))
            return [v2, *masks]

    v2, *results = asyncio.run(main())
    with Client(server.url) as blocking:
        for array, result in zip(images, results, strict=True):
            np.testing.assert_array_equal(result.array, blocking.segment(array, level=LEVEL).array)
    np.testing.assert_array_equal(v2.outputs["mask"][0, 0] * 255, results[0].array)


def test_a_multi_page_answer_decodes_to_a_stack():
    """A TIFF body (multi-class probabilities: one page per class) decodes as K x H x W."""
    from unetpp.client import decode_body

    pages = [Image.fromarray(np.full((4, 5), k * 1000, np.uint16)) for k in range(3)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    stack = decode_body(buf.getvalue(), "image/tiff")
    assert stack.shape == (3, 4, 5) and stack[2, 0, 0] == 2000


def test_model_control_of_a_repository_of_two(tiny_repository: Path, tmp_path: Path):
    root = tmp_path / "models"
    for name in ("nuclei", "cells"):
        shutil.copytree(tiny_repository, root / name)
    image = synthetic(64, 80, seed=5)
    live = start(settings(root, api_key="k"), ready=False)
    try:
        with Client(live.url, api_key="k") as client, Client(live.url) as anonymous:
            deadline = time.monotonic() + 60
            while {m["state"] for m in client.index()} != {"READY"}:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert sorted(m["name"] for m in client.index()) == ["cells", "nuclei"]
            before = client.segment(image, model="cells", level=LEVEL).array
            assert client.unload("cells")["state"] == "UNAVAILABLE"
            once = Client(live.url, api_key="k", retry=Retry(attempts=1))
            with once, pytest.raises(APIError) as gone:
                once.segment(image, model="cells", level=LEVEL)
            assert gone.value.status in (404, 503), gone.value
            states = {m["name"]: m["state"] for m in client.index()}
            assert states == {"cells": "UNAVAILABLE", "nuclei": "READY"}
            assert (client.ready("cells"), client.ready("nuclei"), client.ready()) == (
                False,
                True,
                True,
            )
            np.testing.assert_array_equal(
                client.segment(image, model="nuclei", level=LEVEL).array, before
            )
            assert client.load("cells")["state"] == "READY"
            assert client.ready("cells")
            np.testing.assert_array_equal(
                client.segment(image, model="cells", level=LEVEL).array, before
            )
            with pytest.raises(APIError) as refused:
                anonymous.unload("nuclei")
            assert refused.value.status in (401, 403)
    finally:
        stop(live)


def test_a_broken_models_load_fails_at_once_and_the_other_serves(
    tiny_repository: Path, tmp_path: Path
):
    root = tmp_path / "models"
    for name in ("good", "broken"):
        shutil.copytree(tiny_repository, root / name)
    (root / "broken" / "L1.onnx").write_bytes(b"tampered")
    tries: list[httpx.Request] = []
    hooks = {"event_hooks": {"request": [tries.append]}}
    live = start(settings(root, admin_open=True), ready=False)
    try:
        with Client(live.url, http=hooks) as client:
            deadline = time.monotonic() + 60
            while {m["name"]: m["state"] for m in client.index()}.get("good") != "READY":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            tries.clear()
            with pytest.raises(APIError) as broken:
                client.load("broken")
            assert client.segment(synthetic(32, 32), model="good", level=LEVEL).graph
    finally:
        stop(live)
    assert broken.value.status == 422 and broken.value.error == "load_failed"
    assert "L1.onnx has sha256" in broken.value.detail
    assert len(tries) == 2  # the broken model's load once, then the good one's request
