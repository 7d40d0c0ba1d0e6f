"""Hot reload and graceful drain of a real `python -m unetpp.server` process: reloads (good,
broken, by SIGHUP) while clients keep sending requests, none of which fails; SIGTERM with
requests in flight: readiness goes false first, every request is answered, the process exits 0."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.helpers import scrape, serve, synthetic, value
from unetpp.core.imageio import encode_png
from unetpp.core.manifest import read_manifest

KEY = {"Authorization": "Bearer k3y"}


def set_version(repository: Path, version: str) -> None:
    path = repository / "model.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "version": version}))


def served_version(url: str) -> str:
    (model,) = httpx.get(f"{url}/v1/models", headers=KEY).json()["models"]
    return model["model"]["version"]


def test_reload_good_broken_and_sighup_under_load(tiny_repository, tmp_path):
    repository = tmp_path / "models"
    shutil.copytree(tiny_repository, repository)
    image = encode_png(synthetic(96, 96))
    statuses: list[int] = []
    stop = threading.Event()

    def client(url: str) -> None:
        with httpx.Client(base_url=url, headers={**KEY, "content-type": "image/png"}) as c:
            while not stop.is_set():
                statuses.append(c.post("/v1/segment?mode=fast", content=image).status_code)

    with serve(repository, tmp_path / "server.log", UNETPP_API_KEY="k3y") as (url, proc):
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            assert httpx.post(f"{url}/v1/admin/reload").status_code == 401

            set_version(repository, "second")
            r = httpx.post(f"{url}/v1/admin/reload", headers=KEY, timeout=60)
            assert r.status_code == 200, r.text
            assert [m["version"] for m in r.json()["models"].values()] == ["second"], r.text
            assert served_version(url) == "second"

            original = (repository / "L2.onnx").read_bytes()
            (repository / "L2.onnx").write_bytes(original + b"tampered")
            set_version(repository, "broken")
            r = httpx.post(f"{url}/v1/admin/reload", headers=KEY, timeout=60)
            assert r.status_code == 422 and r.json()["error"] == "load_failed", r.text
            assert "previous model keeps serving" in r.json()["detail"]
            assert "L2" in r.json()["detail"]
            assert served_version(url) == "second"

            (repository / "L2.onnx").write_bytes(original)
            set_version(repository, "third")
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while served_version(url) != "third":
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                time.sleep(0.1)
            time.sleep(0.3)  # a few more requests on the new model
        finally:
            stop.set()
            for t in threads:
                t.join()
        metrics = scrape(httpx.Client(base_url=url))
    model = read_manifest(repository).name
    assert value(metrics, "unetpp_reloads_total", model=model, result="ok") == 2
    assert value(metrics, "unetpp_reloads_total", model=model, result="failed") == 1
    assert len(statuses) > 10 and set(statuses) == {200}, statuses
    logged = (tmp_path / "server.log").read_text()
    assert "the previous model keeps serving" in logged
    assert logged.count(f"a retired engine of model {model} is closed (its requests finished)") == 2


def test_sigterm_answers_every_request_in_flight(tiny_repository, tmp_path):
    image = encode_png(synthetic(96, 96))
    delay = 0.5
    release = threading.Event()
    answers: list[tuple[int | str, float]] = []

    def slow_body() -> Iterator[bytes]:  # half now, the rest once the listeners are closed
        yield image[: len(image) // 2]
        release.wait(30)
        yield image[len(image) // 2 :]

    def client(url: str) -> None:
        try:
            r = httpx.post(
                f"{url}/v1/segment?level=4",
                content=slow_body(),
                headers={"content-type": "image/png"},
                timeout=60,
            )
            answers.append((r.status_code, time.monotonic()))
        except httpx.HTTPError as exc:
            answers.append((repr(exc), time.monotonic()))

    log = tmp_path / "server.log"
    with serve(tiny_repository, log, UNETPP_DRAIN_DELAY_S=str(delay)) as (url, proc):
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        uploading = 4 * (len(image) // 2)  # held while the bodies arrive, before admission
        while value(scrape(httpx.Client(base_url=url)), "unetpp_body_bytes_in_flight") < uploading:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        ready = httpx.get(f"{url}/readyz")  # not ready at once, while still answering
        assert ready.status_code == 503 and "shutting down" in ready.json()["detail"]
        assert httpx.get(f"{url}/v2/health/ready").status_code == 503
        time.sleep(max(0.0, signalled + delay + 0.5 - time.monotonic()))
        try:  # the listeners are closed: no new connection, while the old ones are served
            httpx.get(f"{url}/healthz", timeout=2)
            raise AssertionError("a new connection was accepted after the drain delay")
        except httpx.ConnectError:
            pass
        assert proc.poll() is None and not answers  # still draining, waiting for the uploads
        release.set()
        for t in threads:
            t.join()
        assert proc.wait(timeout=60) == 0, log.read_text()
    assert [status for status, _ in answers] == [200] * len(threads), answers
    assert min(at for _, at in answers) > signalled + delay
    assert "not ready any more, draining" in log.read_text()
