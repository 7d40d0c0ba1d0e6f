"""What the service adds to a request: the Server-Timing spans it reports, and no thread hop
for the request's dependencies (benchmarks/overhead.py measures the milliseconds)."""

from __future__ import annotations

import anyio.to_thread
import pytest

from tests.helpers import settings, start, stop
from unetpp.core.manifest import read_manifest

SPANS = ["decode", "queue", "infer", "render", "total"]


def spans(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        out[name] = float(duration)
    return out


@pytest.mark.parametrize("fmt", ["png", "json"])
def test_server_timing_says_where_the_time_went(live, image_png, fmt):
    r = live.segment(image_png, level=2, format=fmt)
    assert r.status_code == 200, r.text
    timing = spans(r.headers["server-timing"])
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
    assert list(spans(r.headers["server-timing"])) == SPANS


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
