"""Build docker/Dockerfile for real and run the image's own command (podman/buildah: these
machines have no Docker engine; see docs/containers.md in the shared folder)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import free_port, wait_ready
from unetpp.core.datasets import synthetic_image
from unetpp.core.imageio import decode_image, encode_png

ROOT = Path(__file__).resolve().parents[2]
BASE = "localhost/base-python:bookworm"
IMAGE = "localhost/unetpp:test"
ARTIFACTS = Path(os.environ.get("UNETPP_TEST_ARTIFACTS", "test-artifacts"))


def _run(*args: str, timeout: float = 900) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def _has_image(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name]).returncode == 0


def debian_mirror() -> str:
    """This machine's own Debian mirror, as its apt sources name it (no host name is written
    here: the machines that run this reach only their configured mirror)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    for line in Path("/etc/apt/sources.list").read_text().splitlines():
        fields = line.split()
        if fields[:1] == ["deb"]:
            return next(f for f in fields[1:] if "://" in f)
    raise RuntimeError("no Debian mirror in this machine's apt sources")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    tools = [t for t in ("podman", "buildah", "debootstrap") if not shutil.which(t)]
    if tools:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(tools)} missing (.ci/run installs them)")
        pytest.skip(f"{', '.join(tools)} not installed")
    if not _has_image(BASE):  # no registry here: a Debian base built from Debian's packages
        rootfs = tmp_path_factory.mktemp("rootfs")
        _run(
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "bookworm",
            str(rootfs),
            debian_mirror(),
        )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["podman", "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True
        )
        tar.wait()
    _run(
        "podman", "build", "--isolation", "chroot", "--network", "host", "--format", "docker",
        "-v", "/etc/ssl/certs:/etc/ssl/certs:ro", "--build-arg", f"BASE_IMAGE={BASE}",
        "-f", str(ROOT / "docker" / "Dockerfile"), "-t", IMAGE, str(ROOT),
    )  # fmt: skip
    return IMAGE


def _inspect(name: str, field: str):
    return json.loads(_run("podman", "image", "inspect", name, "--format", f"{{{{json {field}}}}}"))


@pytest.fixture
def container(image: str, tiny_repository: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    name = _run("buildah", "from", image).strip()
    cmd = _inspect(image, ".Config.Cmd")
    proc = subprocess.Popen(
        ["buildah", "run", "--isolation", "chroot", "--network", "host",
         "--env", f"UNETPP_PORT={port}", "--env", "UNETPP_HOST=127.0.0.1",
         "-v", f"{tiny_repository}:/models:ro", name, "--", *cmd],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        subprocess.run(["buildah", "rm", name], capture_output=True)


def _server_uids() -> set[int]:
    """Real uids of this machine's processes running the image's server (/opt/unetpp)."""
    uids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"/opt/unetpp/bin/" in (proc / "cmdline").read_bytes():
                status = (proc / "status").read_text()
                uids.add(int(status.split("Uid:")[1].split()[0]))
        except (OSError, IndexError):
            continue
    return uids


def test_image_serves_as_non_root(container) -> None:
    url, proc = container
    image_png = encode_png(synthetic_image(np.random.default_rng(0), 256)[0][:100, :130])
    wait_ready(url, proc, timeout=180)
    resp = httpx.post(
        f"{url}/v1/segment", params={"level": 2}, content=image_png,
        headers={"content-type": "image/png"}, timeout=60,
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-unetpp-level"] == "2"
    assert decode_image(resp.content).shape == (100, 130)
    assert httpx.get(f"{url}/v2/health/ready", timeout=10).json() == {"ready": True}
    assert _server_uids() == {10001}

    assert _inspect(IMAGE, ".Config.User") == "10001"
    assert "/readyz" in " ".join(_inspect(IMAGE, ".Config.Healthcheck")["Test"])
    size, base = (_inspect(n, ".Size") for n in (IMAGE, BASE))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    report = {
        "image_bytes": size,
        "base_bytes": base,
        "over_base_mb": round((size - base) / 1e6, 1),
    }
    (ARTIFACTS / "docker_image.json").write_text(json.dumps(report, indent=2) + "\n")
