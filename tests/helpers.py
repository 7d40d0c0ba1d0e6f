"""Helpers the tests share; the fixtures stay in the conftests, which use these too. Import
them from here (`from tests.helpers import ...`), never from a conftest or another test module:
free ports and readiness, real uvicorn servers on the tiny model, synthetic images, RLE decoding,
torch on one thread."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import uvicorn
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from unetpp.core.imageio import encode_png
from unetpp.core.inference import create_session, predict_logits
from unetpp.core.manifest import read_manifest, sha256_file
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


# Whole slides (core/slide.py through `unetpp predict` and jobs): tiled TIFFs, and their result
# against in-memory inference.
def write_slide(path: Path, *pages: np.ndarray, bigtiff: bool = True) -> Path:
    """`pages` as one tiled, zlib-compressed (Big)TIFF, one page each, as scanners write."""
    import tifffile

    tifffile.imwrite(path, np.stack(pages), bigtiff=bigtiff, tile=(128, 128), compression="zlib")
    return path


def away_from_seams(length: int, tile: int, overlap: int) -> np.ndarray:
    """Pixels of an axis at least `overlap` from every window edge inside it."""
    from unetpp.core.tiling import starts

    edges = {e for s in starts(length, tile, overlap) for e in (s, s + tile)} - {0, length}
    pixels = np.arange(length)
    return np.all([np.abs(pixels - e) >= overlap for e in edges], axis=0)


def check_slide_result(
    repository: Path, graph: str, pages: list[np.ndarray], result: Path, tile: int, overlap: int
) -> None:
    """A whole slide's result (a tiled BigTIFF, a page per page) equals in-memory tiled
    inference of each page exactly, and whole-image inference away from the window seams."""
    import tifffile

    from unetpp.core.pipeline import LocalModel
    from unetpp.core.tiling import infer_tiled_sync

    with tifffile.TiffFile(result) as tif:
        assert tif.is_bigtiff and all(p.is_tiled for p in tif.pages)
        masks = [p.asarray() for p in tif.pages]
    assert len(masks) == len(pages)
    model = LocalModel.open(repository, threads=1)
    g = model.graphs[graph]
    for image, mask in zip(pages, masks, strict=True):
        prepared = model.prepare(image)
        h, w = prepared.size
        tiled = infer_tiled_sync(prepared.x, lambda x: model.run(g, x), tile=tile, overlap=overlap)
        np.testing.assert_array_equal(mask, model.manifest.task.labels(tiled)[:h, :w])
        whole = model.manifest.task.labels(model.run(g, prepared.x))[:h, :w]
        core = away_from_seams(prepared.x.shape[1], tile, overlap)[:h, None]
        core = core & away_from_seams(prepared.x.shape[2], tile, overlap)[None, :w]
        assert mask[core].mean() > 0.05 and (mask[core] == whole[core]).mean() >= 0.995


# Model repositories edited as a re-export or a broken one would leave them, and a server of
# several models (tests/server/test_models.py, tests/cli/test_models_cli.py).
def edit_manifest(repository: Path, edit: Callable[[dict], None]) -> None:
    path = repository / "model.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def replace_graph(repository: Path, name: str, content: bytes) -> None:
    """Overwrite graph `name`'s file and record its new hash, as a re-export would."""
    (repository / f"{name}.onnx").write_bytes(content)
    digest = sha256_file(repository / f"{name}.onnx")

    def rehash(data: dict) -> None:
        for graph in data["graphs"]:
            if graph["file"] == f"{name}.onnx":
                graph["sha256"] = digest

    edit_manifest(repository, rehash)


def corrupt_graph(repository: Path) -> None:
    replace_graph(repository, "L2", b"\x08\x07 not a protobuf " * 64)


def keep_graphs(repository: Path, names: set[str]) -> None:
    edit_manifest(
        repository,
        lambda data: data.update(graphs=[g for g in data["graphs"] if g["name"] in names]),
    )


def build_models_folder(repository: Path, root: Path) -> Path:
    """Three copies of `repository` in `root`: nuclei (every graph), cells (L1 and L2 only),
    broken (a corrupt L2)."""
    for name in ("nuclei", "cells", "broken"):
        shutil.copytree(repository, root / name)
    keep_graphs(root / "cells", {"L1", "L2"})
    corrupt_graph(root / "broken")
    return root


def model_states(server: LiveServer) -> dict[str, str]:
    return {m["name"]: m["state"] for m in server.client.get("/v1/models").json()["models"]}


def wait_loaded(server: LiveServer, timeout: float = 60) -> None:
    """Until no model of the server is loading (each is ready, failed or unloaded)."""
    deadline = time.monotonic() + timeout
    while "loading" in model_states(server).values():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def post_image(server: LiveServer, path: str, **params) -> httpx.Response:
    """A small synthetic PNG posted to `path` with these query parameters."""
    image = encode_png(synthetic(64, 96))
    return server.client.post(
        path, content=image, params=params, headers={"content-type": "image/png"}
    )


# --- real servers over HTTP, shared by the server tests ---


LENGTH = "Inference-Header-Content-Length"


def model_name(repository) -> str:
    return read_manifest(repository).name


def binary_request(header: dict, *arrays: np.ndarray) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    body = head + b"".join(a.astype(a.dtype.newbyteorder("<")).tobytes() for a in arrays)
    return body, {LENGTH: str(len(head)), "content-type": "application/octet-stream"}


def decode(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def reference_logits(repository, graph_name: str, image: np.ndarray) -> np.ndarray:
    """Whole-image inference with onnxruntime alone, outside the server."""
    manifest = read_manifest(repository)
    graph = manifest.graph(graph_name)
    session = create_session(repository / graph.file)
    return predict_logits(session, image, manifest.preprocessing, graph.output)[0]


def failed_readiness(server) -> dict:
    """/readyz once loading has ended; it must have failed."""
    deadline = time.monotonic() + 30
    while server.client.get("/healthz").json()["model"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = server.client.get("/readyz")
    assert r.status_code == 503 and r.json()["error"] == "not_ready"
    assert server.client.get("/healthz").json() == {"status": "alive", "model": "failed"}
    return r.json()


def first_response(url: str, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes; the status and body of the first answer (0, b"" if the server just
    closes the connection)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        if not data:
            return 0, b""
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next(
            (
                int(v)
                for k, v in (h.split(": ", 1) for h in lines[1:])
                if k.lower() == "content-length"
            ),
            0,
        )
        while len(body) < length and (chunk := sock.recv(65536)):
            body += chunk
    return int(lines[0].split()[1]), body


@contextmanager
def serve(repository: Path, log: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    settings = {
        "UNETPP_CALIBRATION_REPEATS": "1",
        "UNETPP_TILE_SIZE": "128",
        "UNETPP_TILE_OVERLAP": "32",
        **env,
    }
    with log.open("w") as out:  # a file, not a pipe: one access-log line per request
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "unetpp.server",
                "--models",
                str(repository),
                "--port",
                str(port),
            ],
            env={**os.environ, **settings},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=120)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def scrape(client, **kwargs) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics", **kwargs)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
