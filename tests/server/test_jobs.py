"""/v1/jobs on real `python -m unetpp.server` processes sharing a jobs directory: whole-slide
BigTIFFs above the in-memory limit, lifecycle, cancel, expiry, limits, auth, kill -9 and
restart, two replicas that answer for each other's jobs and never run one twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import check_slide_result, synthetic, write_slide
from tests.helpers import serve as serve_model

TILE, OVERLAP = 128, 32
KEY = {"Authorization": "Bearer k3y"}


@contextmanager
def serve(repository: Path, jobs: Path, log: Path, **env: str | None) -> Iterator[Server]:
    """A real server process on `jobs`, with the API key KEY; its log appended to `log`
    (`env`: more settings; None leaves one of these defaults unset)."""
    defaults = {
        "UNETPP_JOBS_DIR": str(jobs),
        "UNETPP_JOBS_TILE_SIZE": str(TILE),
        "UNETPP_JOBS_TILE_OVERLAP": str(OVERLAP),
        "UNETPP_JOBS_POLL_S": "0.2",
        "UNETPP_API_KEY": "k3y",
    }
    settings = {k: v for k, v in {**defaults, **env}.items() if v is not None}
    own = log.with_name(f"{log.name}.{time.monotonic_ns()}")
    try:
        with (
            serve_model(repository, own, **settings) as (url, proc),
            httpx.Client(base_url=url, headers=KEY, timeout=60) as client,
        ):
            yield Server(client, proc)
    finally:
        with log.open("a") as out:
            out.write(own.read_text())


class Server:
    def __init__(self, client: httpx.Client, proc: subprocess.Popen) -> None:
        self.client = client
        self.proc = proc

    def submit(self, data: bytes, **params) -> str:
        response = self.client.post(
            "/v1/jobs", content=data, params=params, headers={"content-type": "image/tiff"}
        )
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        response = self.client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, job_id: str, until=("done", "failed", "cancelled"), timeout=300.0) -> dict:
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["state"] not in until:
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        return job


def tiff(*pages: np.ndarray) -> bytes:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"job-{os.getpid()}-{time.monotonic_ns()}.tif"
    data = write_slide(path, *pages).read_bytes()
    path.unlink()
    return data


@pytest.fixture(scope="module")
def slide_pages() -> list[np.ndarray]:
    return [synthetic(600, 520, seed) for seed in (0, 1)]


def test_a_slide_above_the_image_limit_runs_as_a_job(tiny_repository, tmp_path, slide_pages):
    """The image is refused by /v1/segment (above max_pixels) and segmented by a job; the result
    equals in-memory tiled inference, and whole-image inference away from the seams."""
    data = tiff(*slide_pages)
    env = {"UNETPP_MAX_PIXELS": str(600 * 520 - 1), "UNETPP_JOBS_WORKERS": "1"}
    with serve(tiny_repository, tmp_path / "jobs", tmp_path / "log", **env) as server:
        refused = server.client.post(
            "/v1/segment", content=data, headers={"content-type": "image/tiff"}
        )
        assert refused.status_code == 413, refused.text
        first = server.submit(data, level=3)
        multipart = server.client.post(
            "/v1/jobs", files={"image": ("slide.tif", data, "image/tiff")}, params={"mode": "fast"}
        )
        assert multipart.status_code == 202, multipart.text
        second = multipart.json()["id"]
        assert server.job(second)["state"] == "queued"  # one worker: behind the first
        early = server.client.get(f"/v1/jobs/{second}/result")
        assert early.status_code == 409 and early.json()["error"] == "job_not_done"
        job = server.wait(first)
        assert job["state"] == "done", job
        assert job["progress"]["done"] == job["progress"]["total"] > 0
        assert job["info"]["graph"] == "L3" and job["attempts"] == 1
        result = server.client.get(f"/v1/jobs/{first}/result")
        assert result.status_code == 200 and result.headers["content-type"] == "image/tiff"
        assert server.wait(second)["state"] == "done"
    (tmp_path / "out.tif").write_bytes(result.content)
    check_slide_result(tiny_repository, "L3", slide_pages, tmp_path / "out.tif", TILE, OVERLAP)


def test_cancel_expiry_limits_and_auth(tiny_repository, tmp_path, slide_pages):
    small = tiff(slide_pages[0][:200, :200])
    big = tiff(synthetic(1536, 1536))
    env = {
        "UNETPP_JOBS_MAX_JOBS": "2",
        "UNETPP_JOBS_MAX_UPLOAD_BYTES": str(len(big) + 10),
        "UNETPP_JOBS_TTL_S": "2",
    }
    with serve(tiny_repository, tmp_path / "jobs", tmp_path / "log", **env) as server:
        c = server.client
        anonymous = httpx.post(f"{c.base_url}/v1/jobs", content=small)
        assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthorized"
        assert httpx.get(f"{c.base_url}/v1/jobs/{'0' * 32}").status_code == 401
        assert c.get(f"/v1/jobs/{'0' * 32}").json()["error"] == "job_not_found"
        assert c.get("/v1/jobs/not-an-id").status_code == 404

        def post(body: bytes, content_type: str = "image/tiff", **params) -> httpx.Response:
            return c.post(
                "/v1/jobs", content=body, params=params, headers={"content-type": content_type}
            )

        assert post(small, level=1, mode="fast").status_code == 422
        assert post(small, deadline_ms=10).status_code == 422
        assert post(small, format="png").status_code == 422
        assert post(small, "text/plain").status_code == 415
        assert post(b"PNG? no, nothing").json()["error"] == "undecodable_image"
        assert post(big + b"x" * 20).json()["error"] == "upload_too_large"
        assert not list((tmp_path / "jobs" / ".incoming").iterdir())  # refused: nothing kept

        running = server.submit(big, level=4)
        queued = server.submit(small)
        server.wait(running, until=("running",))
        full = post(small)
        assert full.status_code == 429 and full.json()["error"] == "jobs_full", full.text

        cancelled = c.delete(f"/v1/jobs/{queued}")
        assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
        stopping = c.delete(f"/v1/jobs/{running}")
        assert stopping.status_code == 202
        job = server.wait(running)
        assert job["state"] == "cancelled" and job["progress"]["done"] < job["progress"]["total"]
        assert c.get(f"/v1/jobs/{running}/result").status_code == 409
        assert not (tmp_path / "jobs" / running / "result.tif").exists()

        assert c.delete(f"/v1/jobs/{queued}").status_code == 204  # a finished job: deleted
        assert c.get(f"/v1/jobs/{queued}").status_code == 404
        done = server.submit(small)
        assert server.wait(done)["state"] == "done"
        time.sleep(2.5)  # the TTL
        assert c.get(f"/v1/jobs/{done}").status_code == 404
        deadline = time.monotonic() + 10
        while (tmp_path / "jobs" / done).exists():  # the worker's sweep deletes it
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_a_job_survives_kill_9_and_restart(tiny_repository, tmp_path):
    """Killed mid-job: the next process resumes it (attempt 2); stopped with SIGTERM: the job
    goes back to the queue; killed again with max_attempts=1: marked failed, saying why.
    Nothing accepted is lost."""
    big = tiff(synthetic(3072, 3072))  # 1,024 windows: still running when the signal comes
    jobs, log = tmp_path / "jobs", tmp_path / "log"
    with serve(tiny_repository, jobs, log) as server:
        resumed = server.submit(big, level=4)
        server.wait(resumed, until=("running",))
        given_up = server.submit(big, level=4)  # queued behind it
        deadline = time.monotonic() + 120
        while server.job(resumed)["progress"]["done"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        server.proc.kill()  # SIGKILL: no shutdown code runs
        server.proc.wait()
    state = json.loads((jobs / resumed / "state.json").read_text())
    assert state["state"] == "running"  # as the dead process left it
    with serve(tiny_repository, jobs, log, UNETPP_DRAIN_DELAY_S="0") as server:
        job = server.wait(resumed)
        assert job["state"] == "done" and job["attempts"] == 2, job
        assert server.client.get(f"/v1/jobs/{resumed}/result").status_code == 200
        server.wait(given_up, until=("running",))
        server.proc.send_signal(signal.SIGTERM)  # a graceful stop hands the job back
        assert server.proc.wait(timeout=60) == 0
    state = json.loads((jobs / given_up / "state.json").read_text())
    assert state["state"] == "queued" and state["attempts"] == 0, state
    with serve(tiny_repository, jobs, log) as server:
        server.wait(given_up, until=("running",))
        while server.job(given_up)["progress"]["done"] == 0:
            time.sleep(0.1)
        server.proc.kill()
        server.proc.wait()
    with serve(tiny_repository, jobs, log, UNETPP_JOBS_MAX_ATTEMPTS="1") as server:
        job = server.wait(given_up)
        assert job["state"] == "failed" and "stopped while running" in job["error"], job
        assert server.client.get(f"/v1/jobs/{given_up}/result").json()["error"] == "job_not_done"


def test_two_replicas_share_the_jobs_and_run_each_once(tiny_repository, tmp_path, slide_pages):
    small = tiff(slide_pages[0][:256, :320], slide_pages[1][:256, :320])
    jobs, log = tmp_path / "jobs", tmp_path / "log"
    with serve(tiny_repository, jobs, log) as a, serve(tiny_repository, jobs, log) as b:
        ids = [(a if i % 2 else b).submit(small, level=1 + i % 4) for i in range(8)]
        for i, job_id in enumerate(ids):
            other = b if i % 2 else a  # not the replica that took it
            job = other.wait(job_id)
            assert job["state"] == "done" and job["attempts"] == 1, job
            assert other.client.get(f"/v1/jobs/{job_id}/result").status_code == 200
        runners = {a.job(job_id)["runner"] for job_id in ids}
    pids = {f"{host}:{pid}" for host, pid in (r.rsplit(":", 1) for r in runners)}
    assert len(pids) == 2, runners  # both replicas ran jobs
    accepted = log.read_text().count(" running (attempt 1)")
    assert accepted == len(ids)  # each job started exactly once, in one of the two


def in_use_bytes(client: httpx.Client) -> float:
    metrics = client.get("/metrics").text
    return float(
        next(
            m for m in metrics.splitlines() if m.startswith("unetpp_memory_in_use_bytes ")
        ).split()[1]
    )


def test_a_job_runs_on_the_served_engine_through_a_reload_and_an_unload(tiny_repository, tmp_path):
    """A job runs on the sessions that serve its model, leased: reloading and then unloading
    the model while it runs leaves it running on the engine it took, to the end; its batches
    hold the server's memory budget while they run; with the model unloaded a job is refused
    (503) until it is loaded again."""
    big = tiff(synthetic(1536, 1536))
    calibrate = {"UNETPP_TILE_SIDES": "[]"}  # one size: the calibration is over in seconds
    with serve(tiny_repository, tmp_path / "jobs", tmp_path / "log", **calibrate) as server:
        c = server.client
        (model,) = [m["name"] for m in c.get("/v1/models").json()["models"]]
        job_id = server.submit(big, level=4)
        server.wait(job_id, until=("running",))
        held = 0.0
        while not held and server.job(job_id)["state"] == "running":
            held = in_use_bytes(c)
        assert held > 0, "no batch of the job was seen holding the memory budget"
        assert c.post("/v1/admin/reload").status_code == 200
        unloaded = c.post(f"/v2/repository/models/{model}/unload")
        assert unloaded.status_code == 200, unloaded.text
        job = server.wait(job_id)
        assert job["state"] == "done" and job["attempts"] == 1, job
        assert job["progress"]["done"] == job["progress"]["total"] and job["info"]["graph"] == "L4"
        deadline = time.monotonic() + 60
        while in_use_bytes(c):  # the job gave back what it took (the engines' calibration too)
            assert time.monotonic() < deadline
            time.sleep(0.1)
        refused = c.post("/v1/jobs", content=big, headers={"content-type": "image/tiff"})
        assert refused.status_code == 503 and refused.json()["error"] == "model_unavailable"
        assert c.post(f"/v2/repository/models/{model}/load").status_code == 200
        assert server.wait(server.submit(big, level=1, model=model))["state"] == "done"


def test_a_job_runs_in_its_graphs_measured_tile(tiny_repository, tmp_path, slide_pages):
    """Without UNETPP_JOBS_TILE_SIZE a job's windows are the side measured for its graph (as
    large requests' tiles are), and its result equals in-memory inference in that tile."""
    side = 160  # the one candidate side: not tile_size (128)
    env = {"UNETPP_JOBS_TILE_SIZE": None, "UNETPP_TILE_SIDES": f"[{side}]"}
    with serve(tiny_repository, tmp_path / "jobs", tmp_path / "log", **env) as server:
        deadline = time.monotonic() + 120
        while True:  # the background calibration, after ready
            (model,) = server.client.get("/v1/models").json()["models"]
            tiles = {g["name"]: g["tile"] for g in model["graphs"]}
            if tiles["L2"]:
                break
            assert time.monotonic() < deadline, tiles
            time.sleep(0.2)
        assert tiles["L2"]["side"] == side
        job = server.wait(server.submit(tiff(*slide_pages), level=2))
        assert job["state"] == "done" and job["info"]["tile"] == side, job
        result = server.client.get(f"/v1/jobs/{job['id']}/result")
    (tmp_path / "out.tif").write_bytes(result.content)
    check_slide_result(tiny_repository, "L2", slide_pages, tmp_path / "out.tif", side, OVERLAP)
