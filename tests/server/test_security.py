"""Security properties: no request reaches the filesystem, dependency versions are bounded.
(Limits on body, pixels and sides: test_http.py and test_hostile_input.py; the non-root image:
tests/docker.)"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from urllib.parse import quote

import pytest
from packaging.requirements import Requirement

from .test_hostile_input import first_response

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


def test_no_request_reaches_the_filesystem(live, image_png, file_events):
    spec = live.client.get("/openapi.json").json()
    templated = [(p, m) for p, ops in spec["paths"].items() if "{" in p for m in ops]
    assert templated  # e.g. /v1/samples/{name}; the v2 model routes
    for path, method in templated:
        for attempt in ATTEMPTS:
            url = "/".join(
                quote(attempt, safe="") if part.startswith("{") else part
                for part in path.split("/")
            )
            r = live.client.request(method, url, content=image_png)
            assert 400 <= r.status_code < 500, (url, r.status_code, r.text)
            assert set(r.json()) == {"error", "detail"}
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
