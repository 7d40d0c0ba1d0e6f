"""Faults at start, at hot reload, at shutdown and at run time, on copies of the real tiny
repository. A repository that cannot be served leaves the server up and not ready, with the
reason in /readyz, in every refused request and in the log (a tampered graph and an unusable
CUDA are in test_http.py); the same faults at a reload leave the previous model serving; SIGTERM
while the model loads ends the process promptly. A graph that fails while serving one request
fails that request alone."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.helpers import (
    corrupt_graph,
    edit_manifest,
    failed_readiness,
    free_port,
    replace_graph,
    settings,
    start,
    stop,
    synthetic,
)
from unetpp.core.imageio import encode_png


def missing_graph(repository: Path) -> None:
    (repository / "L3.onnx").unlink()


def newer_schema(repository: Path) -> None:
    edit_manifest(repository, lambda data: data.update(schema_version=data["schema_version"] + 1))


def truncated_manifest(repository: Path) -> None:
    (repository / "model.json").write_text('{"schema_version": 1, "graphs": [')


def unreadable_manifest(repository: Path) -> None:
    # permissions do not stop root (CI), so the manifest is made something open() cannot read
    (repository / "model.json").unlink()
    (repository / "model.json").mkdir()


def no_repository(repository: Path) -> None:
    shutil.rmtree(repository)


FAULTS = {
    "missing graph": (missing_graph, ["L3", "missing"]),
    "corrupt graph": (corrupt_graph, ["L2.onnx", "onnxruntime cannot load it"]),
    "manifest of a newer schema": (newer_schema, ["newer than"]),
    "truncated manifest": (truncated_manifest, ["unreadable manifest"]),
    "unreadable manifest": (unreadable_manifest, ["unreadable manifest"]),
    "no repository": (no_repository, ["no manifest"]),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_broken_repository_is_refused_with_the_reason(fault, tiny_repository, tmp_path, caplog):
    damage, words = FAULTS[fault]
    repository = tmp_path / "models"
    shutil.copytree(tiny_repository, repository)
    damage(repository)
    with caplog.at_level(logging.ERROR, logger="unetpp.server"):
        server = start(settings(repository), ready=False)
        try:
            detail = failed_readiness(server)["detail"]
            for word in words:
                assert word in detail, detail
            refused = server.segment(encode_png(synthetic(32, 32)))
            assert refused.status_code == 503 and refused.json()["detail"] == detail
            listed = server.client.get("/v1/models").json()["models"]  # says why, per model
            assert all(m["state"] == "failed" and m["error"] in detail for m in listed)
        finally:
            stop(server)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(word in logged for word in words), logged


def test_a_broken_repository_at_reload_keeps_the_old_one_serving(tiny_repository, tmp_path):
    repository = tmp_path / "models"
    shutil.copytree(tiny_repository, repository)
    server = start(settings(repository, admin_open=True))
    image = encode_png(synthetic(32, 32))
    try:
        (served,) = (m["model"] for m in server.client.get("/v1/models").json()["models"])
        for fault, (damage, words) in FAULTS.items():
            damage(repository)
            r = server.client.post("/v1/admin/reload")
            assert (r.status_code, r.json()["error"]) == (422, "load_failed"), (fault, r.text)
            assert "previous model keeps serving" in r.json()["detail"], fault
            assert all(word in r.json()["detail"] for word in words), (fault, r.text)
            assert server.client.get("/readyz").status_code == 200, fault
            assert server.segment(image).status_code == 200, fault
            (now,) = (m["model"] for m in server.client.get("/v1/models").json()["models"])
            assert now == served, fault
            shutil.rmtree(repository, ignore_errors=True)
            shutil.copytree(tiny_repository, repository)
        edit_manifest(repository, lambda data: data.update(version="repaired"))
        r = server.client.post("/v1/admin/reload")
        assert r.status_code == 200, r.text
        assert [m["version"] for m in r.json()["models"].values()] == ["repaired"], r.text
        assert server.segment(image).status_code == 200
    finally:
        stop(server)


def square_only_graph() -> bytes:
    """A valid graph with the served interface (image -> logits, any N, H, W) that onnxruntime
    can only run on square inputs: image + its transpose. Start-up calibration (square sizes)
    passes; a request for a non-square image fails inside the session."""
    dims = ["N", 1, "H", "W"]
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["image"], ["t"], perm=[0, 1, 3, 2]),
            helper.make_node("Add", ["image", "t"], ["logits"]),
        ],
        "square_only",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_a_session_error_fails_only_its_own_request(tiny_repository, tmp_path):
    repository = tmp_path / "models"
    shutil.copytree(tiny_repository, repository)
    replace_graph(repository, "L2", square_only_graph())
    server = start(settings(repository))
    oblong, square = encode_png(synthetic(48, 80)), encode_png(synthetic(64, 64))
    try:
        results: dict[str, list[tuple[int, str | None]]] = {"L1": [], "L2": []}
        barrier = threading.Barrier(4)

        def call(level: int) -> None:
            barrier.wait()
            for _ in range(3):
                r = server.segment(oblong, level=level)
                error = None if r.status_code == 200 else r.json()["error"]
                results[f"L{level}"].append((r.status_code, error))

        threads = [threading.Thread(target=call, args=(level,)) for level in (1, 1, 2, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # the failing graph's requests fail (a server fault: 500, as JSON); the others, at the
        # same time, are served
        assert results["L2"] == [(500, "internal_error")] * 6
        assert results["L1"] == [(200, None)] * 6
        assert server.client.get("/readyz").status_code == 200
        # the failed session is not poisoned: inputs it can run still work
        r = server.segment(square, level=2, format="probabilities", encoding="npy")
        assert r.status_code == 200 and r.headers["x-unetpp-graph"] == "L2"
        assert server.segment(oblong, level=1).status_code == 200
    finally:
        stop(server)
    assert np.isfinite(np.load(io.BytesIO(r.content))).all()


def test_sigterm_while_loading_exits_without_waiting_for_calibration(tiny_repository, tmp_path):
    """Calibration runs in a thread that cancelling the loading task cannot stop; the process
    used to wait for all of it (minutes for a large model) after SIGTERM."""
    port = free_port()
    env = {
        **os.environ,
        "UNETPP_CALIBRATION_REPEATS": "1000",  # loading takes a minute or more
        "UNETPP_TILE_SIZE": "128",
        "UNETPP_TILE_OVERLAP": "32",
        "UNETPP_DRAIN_DELAY_S": "0.5",
    }
    log = tmp_path / "server.log"
    argv = [sys.executable, "-m", "unetpp.server", "--models", str(tiny_repository)]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*argv, "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz").json()
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert health["model"] == "loading"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "calibrated ensemble" not in text, text  # abandoned, not waited for
    assert "Traceback" not in text, text
