"""Security properties: the API key guards every route but health (and is never logged), no
request reaches the filesystem, dependency versions are bounded. (Limits on body, pixels and
sides: test_http.py, test_hostile_input.py, test_v2_hostile.py; the non-root image: tests/docker.)"""

from __future__ import annotations

import logging
import re
import sys
import tomllib
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.routing import iter_route_contexts
from packaging.requirements import Requirement

from tests.helpers import failed_readiness, first_response, settings, start, stop
from unetpp.core.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]

# ---- no path from a request reaches the filesystem ---------------------------------------------

MARKER = "zz-probe-7f3a"
ATTEMPTS = [
    f"../../../{MARKER}/etc/passwd",
    f"/{MARKER}/etc/passwd",
    f"..\\..\\{MARKER}",
    f"{MARKER}\x00.png",
    f"~/{MARKER}",
    f"{MARKER}/../../model.json",
]
WATCHED = ("open", "os.", "shutil.", "subprocess.", "tempfile.")
_touched: list[tuple[str, tuple]] = []
_hooked: list[bool] = []


def _audit(event: str, args: tuple) -> None:
    if event.startswith(WATCHED) and any(MARKER in repr(a) for a in args):
        _touched.append((event, args))


@pytest.fixture
def file_events():
    """What the process (the in-thread server included) did to the filesystem with a name
    containing MARKER: Python's audit events, the real calls, not a mock. A hook cannot be
    removed, so it is added once and only looks for the marker."""
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked.append(True)
    _touched.clear()
    yield _touched


def routes(server) -> list[tuple[str, str]]:
    """(method, path template) of every route the application serves, in the OpenAPI schema
    or not (the v2 protocol, the admin endpoint)."""
    contexts = iter_route_contexts(server.server.config.app.routes)
    return [(m, c.path) for c in contexts for m in c.methods or () if m != "HEAD"]


def fill(path: str, default: str, **values: str) -> str:
    """The path with each {parameter} replaced by its value, or `default`."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), default), path)


def test_no_request_reaches_the_filesystem(live, image_png, file_events):
    templated = [(m, p) for m, p in routes(live) if "{" in p]
    assert {p for _, p in templated} >= {"/v1/samples/{name}", "/v2/models/{model_name}/infer"}
    for method, path in templated:
        for attempt in ATTEMPTS:
            url = fill(path, quote(attempt, safe=""))
            r = live.client.request(method, url, content=image_png)
            assert 400 <= r.status_code < 500, (url, r.status_code, r.text)
            assert "error" in r.json()
    # dot segments as sent, not normalised by a client
    for raw in (f"/v1/samples/../../{MARKER}", f"/v1/samples/..%2F..%2F{MARKER}", f"//{MARKER}"):
        status, _ = first_response(live.url, f"GET {raw} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status in (400, 404), raw
    # names a client chooses: query values and the multipart file name
    r = live.segment(image_png, precision=f"../{MARKER}")
    assert r.status_code == 422
    r = live.client.post(
        "/v1/segment", files={"image": (f"../../{MARKER}/x.png", image_png, "image/png")}
    )
    assert r.status_code == 200
    assert file_events == []


# ---- the API key ------------------------------------------------------------------------------

SECRET = "k3y-7b1e-never-logged"
# answered without the key, by design: health for probes, the web page and its sample images,
# the API's own description, and /metrics (unless UNETPP_METRICS_AUTH)
PUBLIC = {
    "/healthz",
    "/readyz",
    "/v2/health/live",
    "/v2/health/ready",
    "/",
    "/v1/samples",
    "/v1/samples/{name}",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/metrics",
}


@pytest.fixture(scope="module")
def keyed(tiny_repository):
    server = start(settings(tiny_repository, api_key=SECRET))
    yield server
    stop(server)


def test_every_route_but_health_needs_the_key(keyed, tiny_repository):
    protected = [(m, p) for m, p in routes(keyed) if p not in PUBLIC]
    assert {p for _, p in protected} >= {"/v1/segment", "/v1/models", "/v1/admin/reload"}
    for method, path in protected:
        url = fill(path, "x", model_name=read_manifest(tiny_repository).name, model_version="L1")
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Bearer {SECRET}x"},
            {"Authorization": f"Basic {SECRET}"},
        ):
            r = keyed.client.request(method, url, headers=headers)
            assert r.status_code == 401, (method, url, headers, r.text)
            assert r.json()["error"].startswith("unauthorized")
        r = keyed.client.request(method, url, headers={"Authorization": f"Bearer {SECRET}"})
        assert r.status_code != 401, (method, url, r.text)
    # the loop unloaded the model (the repository extension's unload): load it again
    name = read_manifest(tiny_repository).name
    key = {"Authorization": f"Bearer {SECRET}"}
    assert keyed.client.post(f"/v2/repository/models/{name}/load", headers=key).status_code == 200
    for method, path in routes(keyed):
        if path in PUBLIC and "{" not in path:
            assert keyed.client.request(method, path).status_code == 200, path


def test_why_loading_failed_is_told_only_to_a_caller_with_the_key(tmp_path):
    missing = tmp_path / "private-model-store"
    server = start(settings(missing, api_key=SECRET), ready=False)
    try:
        anonymous = failed_readiness(server)["detail"]
        assert "private-model-store" not in anonymous and "server log" in anonymous
        keyed = server.client.get("/readyz", headers={"Authorization": f"Bearer {SECRET}"})
        assert keyed.status_code == 503 and "private-model-store" in keyed.json()["detail"]
        wrong = server.client.get("/readyz", headers={"Authorization": "Bearer nope"})
        assert wrong.json()["detail"] == anonymous
    finally:
        stop(server)


def test_the_key_is_never_logged_or_shown(keyed, image_png, caplog):
    answers = []
    with caplog.at_level(logging.DEBUG):
        key = {"Authorization": f"Bearer {SECRET}"}
        for headers in (key, {"Authorization": f"Bearer {SECRET}-wrong"}, {}):
            answers.append(keyed.client.get("/v1/models", headers=headers))
            answers.append(
                keyed.client.post(
                    "/v1/segment",
                    content=image_png,
                    headers={**headers, "content-type": "image/png"},
                )
            )
        answers.append(keyed.client.get(f"/v1/models?api_key={SECRET}"))
        answers.append(keyed.client.post("/v1/admin/reload", headers=key))
        for path in ("/metrics", "/readyz", "/openapi.json"):
            answers.append(keyed.client.get(path, headers=key))
    assert keyed.client.get("/v1/models", headers=key).status_code == 200  # the key was used
    for r in answers:
        assert SECRET not in r.text and SECRET not in str(r.headers), r.request.url
    # everything the process logged but this test's own HTTP client (httpx logs its URLs)
    logged = [
        (r.getMessage(), repr(r.args), repr(r.__dict__))
        for r in caplog.records
        if not r.name.startswith(("httpx", "httpcore"))
    ]
    assert any("unetpp.access" in entry[2] for entry in logged)
    assert not [entry for entry in logged if SECRET in "".join(entry)]
    assert SECRET not in repr(keyed.server.config.app.state.registry.settings)


# ---- dependency versions are bounded ---------------------------------------------------------


def test_every_dependency_has_an_upper_bound():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    unbounded = []
    for line in requirements:
        req = Requirement(line)
        if req.name == project["name"]:  # the project's own extras
            continue
        if not any(spec.operator in ("<", "<=", "==", "~=", "===") for spec in req.specifier):
            unbounded.append(line)
    assert not unbounded, f"add an upper bound to: {unbounded}"
