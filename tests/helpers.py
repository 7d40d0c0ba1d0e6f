"""Helpers the tests share; the fixtures stay in the conftests, which use these too. Import
them from here (`from tests.helpers import ...`), never from a conftest or another test module:
free ports and readiness, real uvicorn servers on the tiny model, synthetic images, RLE decoding,
torch on one thread."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import uvicorn
import yaml

from unetpp.server.app import create_app
from unetpp.server.settings import Settings

# The tiny UNet++ of the fixtures in tests/conftest.py, and the validation crops it is scored on.
TINY_WIDTHS = (4, 8, 16, 32, 64)
TINY_VAL_SIZE = (72, 100)  # not multiples of 16: evaluation pads and crops back


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread: on a busy shared 2-core machine, two OpenMP threads can run a tiny
    model 100x slower (each waits for the other at every barrier)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_samples(split: str, count: int = 4, classes: bool = False) -> list:
    """Synthetic samples cropped to TINY_VAL_SIZE (fast to run through a tiny model); `classes`:
    "synthetic-classes" (label maps: 1 round, 2 elongated)."""
    from unetpp.core.datasets import Sample, synthetic_split

    h, w = TINY_VAL_SIZE
    return [
        Sample(s.name, s.image[:h, :w], s.mask[:h, :w])
        for s in synthetic_split(split, count=count, classes=classes)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll `url`/readyz until 200, failing with the process's output if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not become ready in {timeout} s"
        time.sleep(0.2)


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
        tile_sides=(),  # tiles at TILE_SIZE; tests of the measured tile set their own sides
        calibration_repeats=2,
        max_wait_ms=200.0,
        body_timeout_s=1.0,  # a body that stops arriving is cut (408) after this grace
    )
    return Settings(**{**base, **overrides})


def synthetic(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A 16-bit synthetic nuclei image (what the tiny model learnt), tiled up to any size."""
    from unetpp.core.datasets import synthetic_image

    image, _ = synthetic_image(np.random.default_rng(seed), 256)
    reps = (-(-height // 256), -(-width // 256))
    return np.ascontiguousarray(np.tile(image, reps)[:height, :width])


def unrle(counts: list[int], shape: tuple[int, int]) -> np.ndarray:
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(shape)


def drain_budget_s() -> float:
    """The longest a server takes to exit after SIGTERM with the default settings: the drain
    delay, then the requests in flight (up to the request timeout)."""
    fields = Settings.model_fields
    return fields["drain_delay_s"].default + fields["timeout_ms"].default / 1000


# The Kubernetes manifests (docker/k8s/) and the Kubernetes version they are validated against.
K8S = Path(__file__).resolve().parents[1] / "docker" / "k8s"
K8S_VERSION = "1.33"


def documents(name: str) -> list[dict]:
    """The YAML documents of one manifest file of docker/k8s/."""
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
