"""Memory bounded by design, against a real server process: eight concurrent 1024x1024 PNGs on
L4 and a /v2 batch of three 1 MP images, each valid by every documented limit, keep the process
under its memory ceiling (`UNETPP_MEMORY_LIMIT`): batches take only what the activation budget
has room for and large images are tiled to fit it. Without the budget these requests need
several times the ceiling (the check at the end says by how much)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import httpx
import numpy as np

from tests.helpers import serve, synthetic
from unetpp.client import Client

CEILING = 900 << 20


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return 1024 * int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1))


def test_large_requests_stay_under_the_memory_ceiling(tiny_repository, tmp_path):
    megapixel = synthetic(1024, 1024)
    batch = np.stack([megapixel] * 3)[:, None].astype(np.uint16)
    statuses: list[int] = []
    env = {
        "UNETPP_MEMORY_LIMIT": str(CEILING),
        "UNETPP_TILE_SIZE": "512",
        "UNETPP_TIMEOUT_MS": "600000",  # work waits for room: a loaded CI machine is slow
    }
    with serve(tiny_repository, tmp_path / "server.log", **env) as (url, proc):
        with httpx.Client(base_url=url, timeout=300) as http:
            (model,) = http.get("/v1/models").json()["models"]
            per_pixel = {g["name"]: g["bytes_per_pixel"] for g in model["graphs"]}
            budget = http.get("/v1/models").json()["queue"]["memory_budget_bytes"]

        def one(send) -> None:
            with Client(url, timeout=300) as client:
                send(client)
                statuses.append(200)  # the client raises APIError on any other answer

        requests = [lambda c: c.segment(megapixel, level=4)] * 8
        requests.append(lambda c: c.infer(model["name"], batch, level=4, outputs=("mask",)))
        threads = [threading.Thread(target=one, args=(r,)) for r in requests]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = peak_rss(proc.pid)
    assert statuses == [200] * 9, statuses
    assert peak < CEILING, (peak >> 20, CEILING >> 20)
    # what the same work would hold at once without the budget: 11 images of 1 MP on L4
    unbounded = 11 * 1024 * 1024 * per_pixel["L4"]
    assert unbounded > 2 * budget, (unbounded >> 20, budget >> 20)
