"""A closed-loop HTTP load generator (asyncio + httpx), loopback only.

`concurrency` clients each send a request, wait for its answer and send the next, until
`max_requests` have been sent or `max_seconds` have passed (whichever first), so a run is
bounded in both. Latency is the client's wall time per request; throughput is the completed
requests over the run's wall time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Load:
    """What one closed-loop run observed."""

    concurrency: int
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)  # successful requests only
    statuses: Counter = field(default_factory=Counter)
    headers: Counter = field(default_factory=Counter)  # values of `count_header`


def stats(latencies_ms: list[float], wall_s: float) -> dict[str, Any]:
    """Requests, requests/s and p50/p95/p99/mean/max latency (linear-interpolated percentiles)."""
    if not latencies_ms:
        return {"requests": 0, "requests_per_s": 0.0}
    p50, p95, p99 = np.percentile(latencies_ms, [50, 95, 99])
    return {
        "requests": len(latencies_ms),
        "requests_per_s": round(len(latencies_ms) / wall_s, 2) if wall_s > 0 else None,
        "p50_ms": round(float(p50), 1),
        "p95_ms": round(float(p95), 1),
        "p99_ms": round(float(p99), 1),
        "mean_ms": round(float(np.mean(latencies_ms)), 1),
        "max_ms": round(float(np.max(latencies_ms)), 1),
    }


async def closed_loop(
    url: str,
    *,
    content: bytes,
    content_type: str,
    params: dict[str, Any] | None = None,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    count_header: str = "",
    timeout_s: float = 120.0,
) -> Load:
    """POST `content` to `url` from `concurrency` clients in a closed loop (see the module)."""
    if urlsplit(url).hostname not in LOOPBACK:
        raise ValueError(f"the load generator only targets loopback addresses, not {url}")
    load = Load(concurrency)
    sent = 0
    start = time.perf_counter()
    deadline = start + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:

        async def client_loop() -> None:
            nonlocal sent
            while sent < max_requests and time.perf_counter() < deadline:
                sent += 1
                t0 = time.perf_counter()
                r = await client.post(
                    url, params=params, content=content, headers={"content-type": content_type}
                )
                ms = 1000.0 * (time.perf_counter() - t0)
                load.statuses[r.status_code] += 1
                if r.status_code == 200:
                    load.latencies_ms.append(ms)
                    if count_header:
                        load.headers[r.headers.get(count_header, "?")] += 1

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    load.wall_s = time.perf_counter() - start
    return load


def run(url: str, **kwargs: Any) -> dict[str, Any]:
    """closed_loop in a fresh event loop; its figures as a JSON-ready dict."""
    load = asyncio.run(closed_loop(url, **kwargs))
    return {
        "concurrency": load.concurrency,
        "wall_s": round(load.wall_s, 2),
        **stats(load.latencies_ms, load.wall_s),
        "statuses": {str(k): v for k, v in sorted(load.statuses.items())},
        **({"served_by": dict(load.headers)} if load.headers else {}),
    }
