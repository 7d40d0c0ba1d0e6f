"""Several models in one server: a folder of repositories served by name, side by side, loaded
and unloaded at run time under traffic, one broken model beside healthy ones, per-model
metrics; and a retired model's sessions and threads freed (a real server process)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.helpers import (
    model_states,
    post_image,
    scrape,
    serve,
    settings,
    start,
    stop,
    synthetic,
    value,
)
from unetpp.core.imageio import encode_png


def test_models_are_served_by_name_side_by_side(several_models):
    listing = several_models.client.get("/v1/models").json()
    assert listing["default"] is None
    assert model_states(several_models) == {"broken": "failed", "cells": "ready", "nuclei": "ready"}
    graphs = {m["name"]: [g["name"] for g in m["graphs"]] for m in listing["models"]}
    assert graphs["cells"] == ["L1", "L2"] and "L4" in graphs["nuclei"]
    broken = next(m for m in listing["models"] if m["name"] == "broken")
    assert "L2.onnx" in broken["error"]

    r = post_image(several_models, "/v1/models/nuclei/segment", level=4)
    assert r.status_code == 200 and r.headers["x-unetpp-model"] == "nuclei"
    assert r.headers["x-unetpp-graph"] == "L4"
    r = post_image(several_models, "/v1/models/cells/segment", mode="accurate")
    assert r.status_code == 200 and r.headers["x-unetpp-graph"] in {"L1", "L2"}
    r = post_image(several_models, "/v1/models/cells/segment", level=4)
    assert (r.status_code, r.json()["error"]) == (422, "invalid_parameter")
    # several_models models and no default: plain /v1/segment says to name one
    r = post_image(several_models, "/v1/segment")
    assert (r.status_code, r.json()["error"]) == (404, "model_not_found")
    assert "nuclei" in r.json()["detail"]
    r = post_image(
        several_models, "/v1/models/broken/segment"
    )  # no Retry-After: retrying will not help
    assert (r.status_code, r.json()["error"]) == (503, "model_unavailable")
    assert "retry-after" not in r.headers
    assert post_image(several_models, "/v1/models/nope/segment").status_code == 404
    # the v2 protocol: models and their versions by name, readiness per model
    assert several_models.client.get("/v2/models/cells/ready").status_code == 200
    assert several_models.client.get("/v2/models/broken/ready").status_code == 503
    assert several_models.client.get("/v2/models/cells/versions/L4").status_code == 404
    assert several_models.client.get("/v2/models/nuclei").json()["versions"][-1] == "ensemble"
    index = {m["name"]: m for m in several_models.client.post("/v2/repository/index").json()}
    assert index["cells"]["state"] == "READY" and index["broken"]["state"] == "UNAVAILABLE"
    assert "L2.onnx" in index["broken"]["reason"]
    # readiness: no default model, and some model is ready
    assert several_models.client.get("/readyz").status_code == 200


def test_metrics_carry_the_model(several_models):
    before = scrape(several_models.client)
    for model in ("nuclei", "cells"):
        assert post_image(several_models, f"/v1/models/{model}/segment", level=1).status_code == 200
    after = scrape(several_models.client)
    for model in ("nuclei", "cells"):
        labels = {"model": model, "graph": "L1"}
        assert (
            value(after, "unetpp_batch_size_count", **labels)
            - value(before, "unetpp_batch_size_count", **labels)
            == 1
        )
    ready = {
        dict(labels)["model"]: v
        for (name, labels), v in after.items()
        if name == "unetpp_model_ready"
    }
    assert ready == {"nuclei": 1.0, "cells": 1.0, "broken": 0.0}


def test_unload_and_load_under_traffic_never_fail_the_other_model(several_models):
    failures: list[int] = []
    served = 0
    stop_at = threading.Event()

    def traffic() -> None:
        nonlocal served
        with httpx.Client(base_url=several_models.url, timeout=60) as http:
            while not stop_at.is_set():
                r = http.post(
                    "/v1/models/nuclei/segment",
                    content=encode_png(synthetic(64, 96)),
                    params={"mode": "fast"},
                    headers={"content-type": "image/png"},
                )
                served += r.status_code == 200
                if r.status_code != 200:
                    failures.append(r.status_code)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            r = several_models.client.post("/v2/repository/models/cells/unload")
            assert r.status_code == 200 and model_states(several_models)["cells"] == "unloaded"
            r = post_image(several_models, "/v1/models/cells/segment")
            assert (r.status_code, r.json()["error"]) == (503, "model_unavailable")
            assert several_models.client.get("/v2/models/cells/ready").status_code == 503
            r = several_models.client.post("/v2/repository/models/cells/load")
            assert r.status_code == 200 and r.json()["state"] == "READY"
            assert post_image(several_models, "/v1/models/cells/segment").status_code == 200
        # a model that fails to load stays failed and says why; nothing else moves
        r = several_models.client.post("/v2/repository/models/broken/load")
        assert r.status_code == 422 and r.json()["error"].startswith("load_failed: model broken")
        assert "L2.onnx" in r.json()["error"]
    finally:
        stop_at.set()
        for t in threads:
            t.join()
    assert not failures and served > 3, (failures, served)
    assert model_states(several_models) == {"broken": "failed", "cells": "ready", "nuclei": "ready"}


def test_model_control_needs_the_key_or_an_open_admin(models_folder):
    server = start(settings(models_folder))  # no API key, admin not opened
    try:
        r = server.client.post("/v2/repository/models/cells/unload")
        assert r.status_code == 403 and model_states(server)["cells"] == "ready"
    finally:
        stop(server)


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1))


def test_reloads_free_the_retired_model_and_signal_storms_coalesce(tiny_repository, tmp_path):
    """Each engine has sessions (onnxruntime's own threads) and a batcher thread (4 threads in
    all here): after four reloads, then ten SIGHUPs at once, the process has the threads of one
    model, and the storm loaded the model at most twice (one running, one pending)."""
    log = tmp_path / "server.log"
    with (
        serve(tiny_repository, log, UNETPP_ADMIN_OPEN="true") as (url, proc),
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        if True:
            image = encode_png(synthetic(64, 96))
            headers = {"content-type": "image/png"}
            assert http.post("/v1/segment", content=image, headers=headers).status_code == 200
            assert http.post("/v1/admin/reload").status_code == 200  # the thread pools grown
            assert http.post("/v1/segment", content=image, headers=headers).status_code == 200
            time.sleep(1)
            # asyncio's own pool may still grow by a thread or two (up to CPUs + 4); a retired
            # engine that lived on would add its 4 for each reload (16 here)
            baseline = threads_of(proc.pid) + 3
            for _ in range(4):
                assert http.post("/v1/admin/reload").status_code == 200
                assert http.post("/v1/segment", content=image, headers=headers).status_code == 200
            deadline = time.monotonic() + 30
            while threads_of(proc.pid) > baseline:  # the retired engines close once idle
                assert time.monotonic() < deadline, (threads_of(proc.pid), baseline)
                time.sleep(0.1)
            loads = log.read_text().count("loading model")
            for _ in range(10):
                os.kill(proc.pid, signal.SIGHUP)
            time.sleep(3)
            deadline = time.monotonic() + 30
            while threads_of(proc.pid) > baseline:
                assert time.monotonic() < deadline, (threads_of(proc.pid), baseline)
                time.sleep(0.1)
            assert http.post("/v1/segment", content=image, headers=headers).status_code == 200
    assert 1 <= log.read_text().count("loading model") - loads <= 2
