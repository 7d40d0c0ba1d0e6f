"""Overload on loopback: many more concurrent clients than a small `max_queue` admits. Admitted
requests are served, the rest are refused at once with 503 + Retry-After, deadlines are kept,
the admission count never passes the limit and returns to zero, and the server serves normally
afterwards. Bounds on times are deliberately generous (a shared 2-core machine); the figures
themselves belong to benchmarks/soak.py. Large images are also bounded together: the pixels of
the images admitted at once stay within `max_pixels_in_flight`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest

from tests.helpers import settings, start, stop, synthetic
from unetpp.core.imageio import encode_png
from unetpp.server.admission import Gate
from unetpp.server.engine import Engine
from unetpp.server.errors import DeadlineExceeded, QueueFull
from unetpp.server.metrics import Metrics
from unetpp.server.registry import Registry
from unetpp.server.runtime import load_model

MAX_QUEUE = 2
CLIENTS = 16
OFFER_S = 3.0
DEADLINE_MS = 20
SLACK_S = 5.0  # how late an answer may be on a loaded shared machine, and still be "at once"


@dataclass
class Outcome:
    status: int
    seconds: float
    error: str | None
    retry_after: str | None
    deadline: bool


@pytest.fixture(scope="module")
def crowded(tiny_repository):
    server = start(
        settings(
            tiny_repository, max_queue=MAX_QUEUE, max_batch=2, max_wait_ms=5.0, timeout_ms=20_000
        )
    )
    yield server
    stop(server)


def offer_load(url: str, image: bytes, hurried: bytes, stop_at: float) -> list[Outcome]:
    """CLIENTS threads, each with its own connection, sending `image` back to back until
    `stop_at`, and one more sending `hurried` with a deadline far shorter than it takes, until
    three of those were admitted (the server runs in this process: the clients share its GIL
    and cores, as a busy host's other processes would)."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def send(http: httpx.Client, data: bytes, params: dict) -> int:
        start = time.monotonic()
        r = http.post(
            "/v1/segment", content=data, params=params, headers={"content-type": "image/png"}
        )
        error = r.json()["error"] if r.status_code != 200 else None
        seconds = time.monotonic() - start
        with lock:
            outcomes.append(
                Outcome(
                    r.status_code,
                    seconds,
                    error,
                    r.headers.get("retry-after"),
                    "deadline_ms" in params,
                )
            )
        if r.status_code == 503:  # impatient, but not a busy loop on the GIL it shares
            time.sleep(0.02)
        return r.status_code

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < stop_at:
                send(http, image, {"level": 4})

    def hurried_client() -> None:
        admitted = 0
        with httpx.Client(base_url=url, timeout=60) as http:
            while admitted < 3 and time.monotonic() < stop_at + 30:
                admitted += send(http, hurried, {"level": 4, "deadline_ms": DEADLINE_MS}) != 503

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    threads.append(threading.Thread(target=hurried_client))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_overload_is_refused_quickly_and_admitted_requests_are_served(crowded):
    image = encode_png(synthetic(256, 256))
    hurried = encode_png(synthetic(1024, 1024, seed=2))  # decoding alone takes longer
    in_flight: list[int] = []
    watching = threading.Event()

    def watch() -> None:  # the admission count, seen from outside while the load runs
        with httpx.Client(base_url=crowded.url, timeout=30) as http:
            while not watching.is_set():
                in_flight.append(http.get("/v1/models").json()["queue"]["in_flight"])
                time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        outcomes = offer_load(crowded.url, image, hurried, time.monotonic() + OFFER_S)
    finally:
        watching.set()
        watcher.join()

    counts = Counter((o.status, o.error) for o in outcomes)
    assert set(counts) <= {(200, None), (503, "queue_full"), (504, "deadline_exceeded")}, counts
    assert counts[(200, None)] >= 3 and counts[(503, "queue_full")] >= 10, counts
    refused = [o for o in outcomes if o.status == 503]
    assert all(o.retry_after and int(o.retry_after) >= 1 for o in refused)
    assert max(o.seconds for o in refused) < SLACK_S  # refused at once, not after queueing
    served = [o for o in outcomes if o.status == 200]
    assert max(o.seconds for o in served) < 20.0  # nobody waited for the server's timeout
    # deadlines: every admitted request that set one was answered 504, at its deadline
    admitted = [o for o in outcomes if o.deadline and o.status != 503]
    assert len(admitted) == 3 and all(o.status == 504 for o in admitted), counts
    assert max(o.seconds for o in admitted) < DEADLINE_MS / 1000 + SLACK_S
    assert in_flight and max(in_flight) <= MAX_QUEUE

    # afterwards: nothing left admitted; windows of requests that gave up at their deadline
    # leave the batcher's queue when a worker reaches them; then a request is served as usual
    assert crowded.client.get("/v1/models").json()["queue"]["in_flight"] == 0
    give_up = time.monotonic() + 30
    while crowded.client.get("/v1/models").json()["queue"]["queued_items"]:
        assert time.monotonic() < give_up, "queued items never drained"
        time.sleep(0.1)
    assert crowded.client.get("/healthz").status_code == 200
    assert crowded.segment(image, level=1).status_code == 200


def test_the_pixel_budget_bounds_the_images_held_at_once(tiny_repository):
    """Six 35 kB PNGs of 6000x6000 zeros, each within max_pixels, took a server from 0.4 to
    2.8 GB at once; the budget refuses the ones that do not fit with 503, like a full queue."""
    budget = 300 * 300
    big, small = encode_png(synthetic(200, 300)), encode_png(synthetic(64, 64))

    async def scenario() -> None:
        config = settings(tiny_repository, max_pixels_in_flight=budget)
        registry = Registry(config, Metrics())
        gate: Gate = registry.gate
        engine = Engine(
            "tiny", load_model(tiny_repository, "cpu", 1), config, Metrics(), gate, registry.budget
        )
        async with gate.admit() as first:
            engine.prepare(big, first)
            async with gate.admit() as second:
                with pytest.raises(QueueFull, match="pixels"):
                    engine.prepare(big, second)  # 2 x 60,000 > 90,000
                engine.prepare(small, second)  # 60,000 + 4,096 fits
                assert gate.pixels_in_flight == 200 * 300 + 64 * 64
            assert gate.pixels_in_flight == 200 * 300
        assert gate.pixels_in_flight == 0
        async with gate.admit() as alone:  # alone, an image above the budget is taken
            assert engine.prepare(encode_png(synthetic(400, 400)), alone).size == (400, 400)
        # a decoding thread that outlives its request (deadline) takes nothing from the budget
        async with gate.admit() as ended:
            pass
        with pytest.raises(DeadlineExceeded):
            engine.prepare(small, ended)
        assert gate.pixels_in_flight == 0

    asyncio.run(scenario())
