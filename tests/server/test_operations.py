"""Operations on a real uvicorn server: Prometheus metrics, request ids and logs, bearer auth."""

from __future__ import annotations

import logging
import time

import pytest

from tests.helpers import scrape, settings, start, stop, value


def test_metrics_move_when_requests_are_served(live, image_png):
    before = scrape(live.client)
    assert value(before, "unetpp_ready") == 1.0
    assert live.segment(image_png, level=2).status_code == 200
    assert live.segment(b"x", content_type="text/plain").status_code == 415
    after = scrape(live.client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"handler": "/v1/segment", "method": "POST"}
    model = live.client.get("/v1/models").json()["default"]
    assert delta("unetpp_requests_total", **ok, status="200", model=model, graph="L2") == 1
    assert delta("unetpp_requests_total", **ok, status="415", model="", graph="") == 1
    assert (
        delta(
            "unetpp_request_errors_total",
            handler="/v1/segment",
            status="415",
            error="unsupported_media_type",
        )
        == 1
    )
    assert delta("unetpp_request_duration_seconds_count", **ok) == 2
    l2 = {"model": model, "graph": "L2"}
    assert delta("unetpp_routes_total", policy="level", missed="false", **l2) == 1
    assert delta("unetpp_batch_size_count", **l2) == 1
    assert delta("unetpp_batch_size_sum", **l2) == 1
    assert delta("unetpp_inference_seconds_count", **l2) == 1
    assert delta("unetpp_queue_wait_seconds_count", **l2) == 1
    assert value(after, "unetpp_requests_in_flight") == 0
    assert value(after, "unetpp_queue_items", model=model) == 0
    ready = [v for (name, labels), v in after.items() if name == "unetpp_model_ready"]
    assert ready == [1.0] and ("model", model) in next(
        labels for (name, labels) in after if name == "unetpp_model_ready"
    )


def test_request_ids_and_access_log(live, caplog):
    with caplog.at_level(logging.INFO, logger="unetpp.access"):
        given = live.client.get("/v1/models", headers={"X-Request-ID": "job-42.a:b"})
        insane = live.client.get("/v1/nothing", headers={"X-Request-ID": "no spaces/please"})
        new = insane.headers["x-request-id"]
        deadline = time.monotonic() + 5  # the line is logged just after the answer is sent
        while not {new, "job-42.a:b"} <= set(
            records := {getattr(r, "request_id", None): r for r in caplog.records}
        ):
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.01)
    assert given.headers["x-request-id"] == "job-42.a:b"
    assert len(new) == 32 and int(new, 16) >= 0
    assert records["job-42.a:b"].status == 200 and records["job-42.a:b"].path == "/v1/models"
    assert records[new].status == 404 and records[new].error == "not_found"
    assert f"id={new} method=GET path=/v1/nothing status=404" in records[new].getMessage()


@pytest.fixture(scope="module")
def guarded(tiny_repository):
    server = start(settings(tiny_repository, api_key="s3cret", metrics_auth=True))
    yield server
    stop(server)


def test_bearer_auth(guarded, image_png):
    c = guarded.client
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/"):
        assert c.get(path).status_code == 200, path
    for token in (None, "wrong", "s3cret-but-longer"):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = c.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = c.post("/v2/models/x/infer", json={})
    assert r.status_code == 401 and r.json()["error"].startswith("unauthorized: ")
    assert c.get("/metrics").status_code == 401  # metrics_auth=True
    key = {"Authorization": "Bearer s3cret"}
    assert c.get("/v1/models", headers=key).status_code == 200
    r = c.post(
        "/v1/segment?level=1", content=image_png, headers={**key, "content-type": "image/png"}
    )
    assert r.status_code == 200
    assert (
        value(
            scrape(c, headers=key),
            "unetpp_request_errors_total",
            handler="/v1/models",
            status="401",
            error="unauthorized",
        )
        == 3
    )


def test_no_key_needed_without_api_key(live):
    assert live.client.get("/v1/models").status_code == 200
    assert live.client.get("/metrics").status_code == 200
