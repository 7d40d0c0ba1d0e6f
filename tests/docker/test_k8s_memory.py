"""The Kubernetes Deployment holds under its own limits: the server runs in a memory cgroup with
the Deployment's memory limit and environment, on an eight-graph repository of the full-width
network (L1..L4, fp32 and int8), becomes ready, and serves every documented request shape, the
largest included, without being OOM-killed. (Before the memory budget, this Deployment was
killed during start-up calibration, before it was ever ready.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.common import full_width_repository
from tests.helpers import free_port, synthetic, wait_ready
from unetpp.client import Client

DEPLOYMENT = Path(__file__).resolve().parents[2] / "docker" / "k8s" / "deployment.yaml"
CGROUP = Path("/sys/fs/cgroup")
UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def quantity(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMG]i)?", text).groups()
    return int(number) * UNITS.get(unit or "", 1)


def container() -> dict:
    deployment = yaml.safe_load(DEPLOYMENT.read_text())
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    return server


@contextmanager
def memory_cgroup(limit: int) -> Iterator[tuple[Path, str, str]]:
    """A new memory cgroup of `limit` bytes (v2, else v1): its folder, the file to write a
    process id into, and the file that counts OOM kills."""
    name = f"unetpp-test-{os.getpid()}"
    if (CGROUP / "cgroup.controllers").exists():  # v2
        group, limit_file, events = CGROUP / name, "memory.max", "memory.events"
    else:
        group, limit_file, events = (
            CGROUP / "memory" / name,
            "memory.limit_in_bytes",
            "memory.oom_control",
        )
    try:
        group.mkdir()
        (group / limit_file).write_text(str(limit))
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup here ({exc}); run as root on Linux")
    try:
        yield group, "cgroup.procs", events
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def oom_kills(group: Path, events: str) -> int:
    found = re.search(r"oom_kill (\d+)", (group / events).read_text())
    return int(found.group(1)) if found else 0


@pytest.fixture(scope="module")
def eight_graphs(tmp_path_factory) -> Path:
    return full_width_repository(tmp_path_factory.mktemp("full") / "models")


def test_the_deployment_starts_and_serves_under_its_memory_limit(eight_graphs, tmp_path):
    server = container()
    limit = quantity(server["resources"]["limits"]["memory"])
    env = {e["name"]: e["value"] for e in server["env"] if "value" in e}
    env.update(
        UNETPP_MODELS=str(eight_graphs),
        UNETPP_JOBS_DIR=str(tmp_path / "jobs"),
        UNETPP_TIMEOUT_MS="900000",  # a shared CI machine may be slow: memory is the question
    )
    port = free_port()
    log = tmp_path / "server.log"
    with memory_cgroup(limit) as (group, procs, events), log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "unetpp.server", "--port", str(port)],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: (group / procs).write_text(str(os.getpid())),
        )
        url = f"http://127.0.0.1:{port}"
        try:
            started = time.monotonic()
            wait_ready(url, proc, timeout=120)
            ready_s = time.monotonic() - started
            with Client(url, timeout=600) as client:
                serve_every_shape(client)
                (model,) = client.models()["models"]
            assert proc.poll() is None, log.read_text()[-3000:]
            assert oom_kills(group, events) == 0
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert len(model["graphs"]) == 8 and ready_s < 60, (len(model["graphs"]), ready_s)


def serve_every_shape(client: Client) -> None:
    """A small image in the default mode; a 1024x1024 image on L4 (the largest run whole by
    default, where memory allows); a /v2 batch of three of them; the largest image the server
    accepts by default (40 MP), on L1. The client raises on any answer but 200."""
    client.segment(synthetic(256, 256))
    megapixel = synthetic(1024, 1024)
    assert client.segment(megapixel, level=4).graph == "L4"
    batch = np.stack([megapixel] * 3)[:, None].astype(np.uint16)
    client.infer("unetpp", batch, mode="fast", outputs=("mask",))
    largest = np.zeros((6320, 6320), np.uint8)  # 39.9 MP, within max_pixels (40 MP)
    largest[1000:1100, 2000:2300] = 200
    assert client.segment(largest, level=1).graph == "L1"
