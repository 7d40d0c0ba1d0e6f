"""What the service adds to a request: the Server-Timing spans it reports, and no thread hop
for the request's dependencies (benchmarks/overhead.py measures the milliseconds)."""

from __future__ import annotations

import asyncio
import io
import threading

import anyio.to_thread
import pytest
from PIL import Image, PngImagePlugin

from benchmarks.overhead import TARGETS, Connection, post, server_timing
from tests.helpers import serve, settings, start, stop, synthetic
from unetpp.core.imageio import encode_png
from unetpp.core.manifest import read_manifest
from unetpp.server.connections import CoalescedWrites
from unetpp.server.facade import EncodedImage
from unetpp.server.routers import segment

SPANS = ["decode", "queue", "infer", "render", "total"]


@pytest.mark.parametrize("fmt", ["png", "json"])
def test_server_timing_says_where_the_time_went(live, image_png, fmt):
    r = live.segment(image_png, level=2, format=fmt)
    assert r.status_code == 200, r.text
    timing = server_timing(r.headers["server-timing"])
    assert list(timing) == SPANS
    assert timing["decode"] > 0 and timing["infer"] > 0 and timing["render"] > 0
    assert timing["infer"] == pytest.approx(float(r.headers["x-unetpp-inference-ms"]), abs=0.01)
    assert timing["queue"] == pytest.approx(float(r.headers["x-unetpp-queue-ms"]), abs=0.01)
    parts = timing["decode"] + timing["queue"] + timing["infer"] + timing["render"]
    assert parts <= timing["total"] + 0.05  # each rounded to 0.01 ms


def test_v2_answers_carry_server_timing_too(live, tiny_repository):
    name = read_manifest(tiny_repository).name
    tensor = {"name": "image", "datatype": "UINT8", "shape": [32, 48], "data": [7] * 32 * 48}
    r = live.client.post(f"/v2/models/{name}/infer", json={"inputs": [tensor]})
    assert r.status_code == 200, r.text
    assert list(server_timing(r.headers["server-timing"])) == SPANS


def test_a_request_takes_no_thread_hop_for_its_dependencies(
    tiny_repository, image_png, monkeypatch
):
    """FastAPI runs a plain `def` dependency in a worker thread (anyio's): a hop each, a few
    tenths of a millisecond, more on a busy CPU, on every request. With an API key (the most
    dependencies), /v1 and /v2 inference take none: their own threads are asyncio's."""
    server = start(settings(tiny_repository, api_key="secret"))
    hops = []
    run_sync = anyio.to_thread.run_sync

    async def counted(function, *args, **kwargs):
        hops.append(getattr(function, "__name__", repr(function)))
        return await run_sync(function, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    try:
        auth = {"authorization": "Bearer secret"}
        name = read_manifest(tiny_repository).name
        r = server.client.post(
            "/v1/segment", content=image_png, headers={"content-type": "image/png", **auth}
        )
        assert r.status_code == 200, r.text
        tensor = {"name": "image", "datatype": "UINT8", "shape": [32, 48], "data": [7] * 32 * 48}
        r = server.client.post(f"/v2/models/{name}/infer", json={"inputs": [tensor]}, headers=auth)
        assert r.status_code == 200, r.text
    finally:
        stop(server)
    assert hops == []


def threads_of(live, monkeypatch, body: bytes, **params) -> dict[str, str]:
    """The threads that decoded the image of one request and rendered its answer."""
    threads: dict[str, str] = {}

    def recorded(name: str, function):
        def call(*args, **kwargs):
            threads[name] = threading.current_thread().name
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(EncodedImage, "prepare", recorded("decode", EncodedImage.prepare))
    monkeypatch.setattr(segment, "_answer", recorded("render", segment._answer))
    r = live.segment(body, level=1, **params)
    assert r.status_code == 200, r.text
    return threads


@pytest.mark.parametrize(
    ("side", "fmt", "decoded_on_loop", "rendered_on_loop"),
    [
        (256, "png", True, True),  # 65,536 pixels: INLINE_PIXELS
        (256, "json", True, True),
        (256, "overlay", True, False),  # not a cheap answer
        (257, "png", False, False),
    ],
)
def test_small_images_are_decoded_and_answered_on_the_event_loop(
    live, monkeypatch, side, fmt, decoded_on_loop, rendered_on_loop
):
    """A hop to a thread and back costs as much as decoding a 256x256 image, several times
    more on a busy CPU: up to INLINE_PIXELS, decoding and a mask or RLE answer stay on the
    event loop; larger images, and answers that take longer, go to threads."""
    image = encode_png(synthetic(side, side))
    threads = threads_of(live, monkeypatch, image, format=fmt)
    assert (threads["decode"] == live.thread.name) == decoded_on_loop
    assert (threads["render"] == live.thread.name) == rendered_on_loop


def test_small_images_with_more_to_parse_than_pixels_are_decoded_in_a_thread(live, monkeypatch):
    """Parsing text chunks or a JPEG's or TIFF's headers takes time the pixel count does not
    bound (a few hundred kB of them: 100 ms or more): only plain PNGs are decoded on the loop."""
    pixels = Image.fromarray(synthetic(64, 64))
    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "x" * 1000)
    for fmt, options in (("PNG", {"pnginfo": text}), ("TIFF", {})):
        body = io.BytesIO()
        pixels.save(body, format=fmt, **options)
        threads = threads_of(live, monkeypatch, body.getvalue())
        assert threads["decode"] != live.thread.name


class Recorder:
    """A transport that records each write (one write is one send)."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.sends.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> str:
        return f"extra {name}"


def test_a_response_written_in_parts_leaves_in_one_send():
    """At the end of the loop's pass, or at once when flushed (the protocol does, when a
    response is complete); a close sends what was written first, an abort drops it."""
    head_and_body = (b"HTTP/1.1 200 OK\r\n\r\n", b"body", b"")

    async def scenario() -> dict[str, Recorder]:
        loop = asyncio.get_running_loop()
        transports = {end: Recorder() for end in ("pass", "flush", "close", "abort")}
        for end, transport in transports.items():
            writes = CoalescedWrites(transport, loop)
            for part in head_and_body:
                writes.write(part)
            assert transport.sends == []  # not before the end of this pass of the loop
            if end == "flush":
                writes.flush()
                assert transport.sends == [b"".join(head_and_body)]
            elif end != "pass":
                getattr(writes, end)()
        await asyncio.sleep(0)
        assert writes.get_extra_info("peername") == "extra peername"
        return transports

    transports = asyncio.run(scenario())
    for end in ("pass", "flush", "close"):
        assert transports[end].sends == [b"HTTP/1.1 200 OK\r\n\r\nbody"], end
    assert transports["close"].closed
    assert transports["abort"].sends == [] and transports["abort"].aborted


def test_the_overhead_benchmarks_bare_client_reads_the_real_server(tiny_repository, tmp_path):
    """`unetpp serve` (its coalesced writes) to benchmarks/overhead.py's client, raw body and
    multipart, several requests on one keep-alive connection."""
    png = encode_png(synthetic(64, 64))
    with serve(tiny_repository, tmp_path / "server.log") as (url, _):
        connection = Connection(url)
        try:
            for target in TARGETS.values():
                for _ in range(2):
                    answer = post(connection, png, target)
                    assert answer["graph"] == f"L{target['params']['level']}"
                    assert list(answer["spans"]) == SPANS
                    assert 0 < answer["inference_ms"] < answer["e2e_ms"]
        finally:
            connection.close()
