"""`unetpp demo` reuses a cached repository and serves it (the build itself is `slow`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port, wait_ready
from unetpp.demo import repository_for


def _demo(*args: str) -> list[str]:
    return [sys.executable, "-m", "unetpp", "demo", *args]


def test_demo_serves_the_cached_repository(tiny_repository: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_repository, repository_for("synthetic", str(tmp_path)))
    port = free_port()
    proc = subprocess.Popen(
        _demo("--cache-dir", str(tmp_path), "--port", str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=90)
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "Compare all levels" in page.text
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "using the cached model repository" in out
    assert f"serving on http://127.0.0.1:{port}/" in out
    assert "training" not in out


@pytest.mark.slow
def test_demo_builds_a_repository_when_the_cache_is_empty_or_broken(tmp_path: Path) -> None:
    repo = repository_for("synthetic", str(tmp_path))
    repo.mkdir(parents=True)
    (repo / "model.json").write_text("{}")  # a broken cache is rebuilt, not served
    args = _demo("--cache-dir", str(tmp_path), "--time-budget", "0.2", "--build-only")
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "[1/2] training" in result.stdout and "model repository ready" in result.stdout
    assert sorted(p.name for p in repo.glob("L?.onnx")) == [
        "L1.onnx",
        "L2.onnx",
        "L3.onnx",
        "L4.onnx",
    ]
    assert not (repo.parent / "build").exists()
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert "using the cached model repository" in again.stdout
