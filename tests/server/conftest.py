"""Real uvicorn servers on free local ports, serving the real tiny model repository."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from unetpp.core.imageio import encode_png
from unetpp.server.app import create_app
from unetpp.server.settings import Settings

# Small tiles keep the tests fast; images above TILE_ABOVE pixels are tiled.
TILE_SIZE, TILE_OVERLAP, TILE_ABOVE = 128, 32, 192 * 192


@dataclass
class LiveServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    client: httpx.Client

    def segment(self, image: bytes, content_type: str = "image/png", **params) -> httpx.Response:
        return self.client.post(
            "/v1/segment", content=image, params=params, headers={"content-type": content_type}
        )


def start(settings: Settings, *, ready: bool = True) -> LiveServer:
    """Run uvicorn on port 0 in a thread; wait until it listens (and, if `ready`, is ready)."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=60)
    while ready and client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").text
        time.sleep(0.05)
    return LiveServer(url, server, thread, client)


def stop(live: LiveServer) -> None:
    live.client.close()
    live.server.should_exit = True
    live.thread.join(timeout=30)


def settings(repository: Path, **overrides) -> Settings:
    base = dict(
        models=repository,
        tile_size=TILE_SIZE,
        tile_overlap=TILE_OVERLAP,
        tile_above_pixels=TILE_ABOVE,
        calibration_repeats=2,
        max_wait_ms=200.0,
        body_timeout_s=1.0,  # a body that stops arriving is cut (408) after this grace
    )
    return Settings(**{**base, **overrides})


@pytest.fixture(scope="session")
def live(tiny_repository: Path) -> Iterator[LiveServer]:
    """The main server: generous batching wait so that concurrent requests batch reliably."""
    server = start(settings(tiny_repository))
    yield server
    stop(server)


def synthetic(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A 16-bit synthetic nuclei image (what the tiny model learnt), tiled up to any size."""
    from unetpp.core.datasets import synthetic_image

    image, _ = synthetic_image(np.random.default_rng(seed), 256)
    reps = (-(-height // 256), -(-width // 256))
    return np.ascontiguousarray(np.tile(image, reps)[:height, :width])


@pytest.fixture(scope="session")
def image() -> np.ndarray:
    return synthetic(100, 130)


@pytest.fixture(scope="session")
def image_png(image: np.ndarray) -> bytes:
    return encode_png(image)
