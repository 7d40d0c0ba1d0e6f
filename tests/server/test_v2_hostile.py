"""Hostile KServe v2 requests: malformed tensors (wrong shapes, datatypes, values), byte counts
that lie, bodies that are not the protocol, property-based JSON bodies. Every case is a 4xx
with the protocol's error body {"error": "<code>: <detail>"}; never a 5xx, never unbounded work,
and the server serves normally afterwards."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import LENGTH, binary_request, model_name

BOUNDED = settings(max_examples=60)  # the rest: the "unetpp" profile (tests/conftest.py)
GOOD = {"name": "image", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}


@pytest.fixture(scope="module")
def infer_url(live, tiny_repository) -> str:
    return f"{live.url}/v2/models/{model_name(tiny_repository)}/infer"


def post(url: str, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    """One request on its own connection: a failure cannot hide behind a reused one."""
    return httpx.post(url, content=content, headers=headers or {}, timeout=60)


def assert_v2_error(r: httpx.Response, status: int, error: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and body["error"].startswith(f"{error}: "), body


def with_input(**changes) -> bytes:
    return json.dumps({"inputs": [{**GOOD, **changes}]}).encode()


# (body, extra headers, status, error)
CASES = {
    # shapes
    "3-D image": (with_input(shape=[1, 2, 2], data=[1, 2, 3, 4]), {}, 400, "invalid_tensor"),
    "5 channels": (with_input(shape=[1, 5, 1, 1], data=[1] * 5), {}, 400, "invalid_tensor"),
    "no pixels": (with_input(shape=[0, 2], data=[]), {}, 400, "invalid_tensor"),
    "negative dimension": (with_input(shape=[-2, -2]), {}, 400, "invalid_tensor"),
    "shape not a list": (with_input(shape="2x2"), {}, 400, "invalid_tensor"),
    "boolean dimension": (with_input(shape=[True, 4]), {}, 400, "invalid_tensor"),
    "shape and data disagree": (with_input(shape=[3, 3]), {}, 400, "invalid_tensor"),
    "astronomical shape": (with_input(shape=[10**30, 2]), {}, 400, "invalid_tensor"),
    "a side above max_side": (
        with_input(shape=[1, 20000], data=[0] * 20000),
        {},
        413,
        "image_too_large",
    ),
    # datatypes and values
    "BYTES": (with_input(datatype="BYTES"), {}, 400, "invalid_tensor"),
    "unknown datatype": (with_input(datatype="FP8"), {}, 400, "invalid_tensor"),
    "no datatype": (
        json.dumps({"inputs": [{"name": "image", "shape": [1]}]}).encode(),
        {},
        400,
        "invalid_tensor",
    ),
    "BOOL pixels": (
        with_input(datatype="BOOL", data=[True, False, True, False]),
        {},
        400,
        "invalid_tensor",
    ),
    "strings as data": (with_input(data=["a", "b", "c", "d"]), {}, 400, "invalid_tensor"),
    "ragged data": (with_input(data=[[1, 2], [3]]), {}, 400, "invalid_tensor"),
    "an object as data": (with_input(data={"a": 1}), {}, 400, "invalid_tensor"),
    "UINT8 out of range": (
        with_input(datatype="UINT8", data=[1, 2, 3, 999]),
        {},
        400,
        "invalid_tensor",
    ),
    "NaN pixels": (
        b'{"inputs":[{"name":"image","datatype":"FP32","shape":[2,2],"data":[NaN,1,2,3]}]}',
        {},
        400,
        "invalid_tensor",
    ),
    "infinite pixels": (
        b'{"inputs":[{"name":"image","datatype":"FP32","shape":[2,2],"data":[1e400,1,2,3]}]}',
        {},
        400,
        "invalid_tensor",
    ),
    "FP64 beyond float32": (
        with_input(datatype="FP64", data=[1e300, 0, 1, 2]),
        {},
        400,
        "invalid_tensor",
    ),
    # the protocol's structure
    "parameters of an input not an object": (with_input(parameters="x"), {}, 400, "invalid_tensor"),
    "parameters of an output not an object": (
        json.dumps({"inputs": [GOOD], "outputs": [{"name": "mask", "parameters": 5}]}).encode(),
        {},
        400,
        "invalid_tensor",
    ),
    "outputs an object": (
        json.dumps({"inputs": [GOOD], "outputs": {"name": "mask"}}).encode(),
        {},
        400,
        "invalid_tensor",
    ),
    "an unknown output": (
        json.dumps({"inputs": [GOOD], "outputs": [{"name": "x"}]}).encode(),
        {},
        400,
        "invalid_tensor",
    ),
    "inputs an object": (json.dumps({"inputs": GOOD}).encode(), {}, 400, "invalid_tensor"),
    "a JSON array": (json.dumps([GOOD]).encode(), {}, 400, "invalid_tensor"),
    "not JSON": (b"\x89PNG\r\n\x1a\n", {}, 400, "invalid_tensor"),
    "empty body": (b"", {}, 400, "invalid_tensor"),
    "two inputs": (json.dumps({"inputs": [GOOD, GOOD]}).encode(), {}, 400, "invalid_tensor"),
    "parameters a list": (
        json.dumps({"inputs": [GOOD], "parameters": [1]}).encode(),
        {},
        422,
        "invalid_parameter",
    ),
    "two routing rules": (
        json.dumps({"inputs": [GOOD], "parameters": {"level": 1, "mode": "fast"}}).encode(),
        {},
        422,
        "invalid_parameter",
    ),
    # byte counts that lie: the JSON header's length
    "header length beyond the body": (with_input(), {LENGTH: "100000"}, 400, "invalid_tensor"),
    "header length zero": (with_input(), {LENGTH: "0"}, 400, "invalid_tensor"),
    "header length negative": (with_input(), {LENGTH: "-5"}, 400, "invalid_tensor"),
    "header length not a number": (with_input(), {LENGTH: "ten"}, 400, "invalid_tensor"),
    "header length cutting the JSON": (with_input(), {LENGTH: "20"}, 400, "invalid_tensor"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_requests(infer_url, case):
    body, headers, status, error = CASES[case]
    assert_v2_error(
        post(infer_url, body, {"content-type": "application/json", **headers}), status, error
    )


def binary_input(shape: list[int], size: int, datatype: str = "FP32") -> dict:
    spec = {"name": "image", "datatype": datatype, "shape": shape}
    return {"inputs": [{**spec, "parameters": {"binary_data_size": size}}]}


def test_binary_byte_counts_that_lie(infer_url, live, image_png):
    pixels = np.arange(16, dtype=np.float32)
    cases = [
        # binary_data_size larger than the shape, smaller than the shape
        (binary_request(binary_input([4, 4], 128), pixels, pixels), "does not match"),
        (binary_request(binary_input([4, 4], 32), pixels[:8]), "does not match"),
        # the size matches the shape, but fewer bytes follow the JSON
        (binary_request(binary_input([4, 4], 64), pixels[:10]), "left"),
        # more bytes than announced: they belong to no input
        (binary_request(binary_input([4, 4], 64), pixels, pixels), "belong to no input"),
        # the size is not a number
        (binary_request(binary_input([4, 4], "64"), pixels), "does not match"),  # type: ignore[arg-type]
    ]
    for (body, headers), words in cases:
        r = post(infer_url, body, headers)
        assert_v2_error(r, 400, "invalid_tensor")
        assert words in r.json()["error"], r.text
    body, headers = binary_request(binary_input([4, 4], 64), pixels)
    assert post(infer_url, body, headers).status_code == 200  # the honest one is served


def test_a_batch_is_bounded(infer_url, live):
    """Many tiny images in one request would be unbounded work behind one admission: a batch
    holds at most max_queue images."""
    n = live.client.get("/v1/models").json()["queue"]["max_queue"] + 1
    body, headers = binary_request(binary_input([n, 1, 1, 1], n, "UINT8"), np.zeros(n, np.uint8))
    assert_v2_error(post(infer_url, body, headers), 413, "image_too_large")
    body, headers = binary_request(binary_input([2, 1, 1, 1], 2, "UINT8"), np.zeros(2, np.uint8))
    assert post(infer_url, body, headers).status_code == 200


def test_names_in_urls_are_looked_up(live, tiny_repository):
    name = model_name(tiny_repository)
    body = json.dumps({"inputs": [GOOD]}).encode()
    for path in (
        "/v2/models/nope/infer",
        f"/v2/models/{name}/versions/L9/infer",
        f"/v2/models/{name}/versions/..%2Fmodel.json/infer",
        "/v2/models/..%2F..%2Fetc%2Fpasswd/ready",
    ):
        r = post(live.url + path, body, {"content-type": "application/json"})
        assert r.status_code == 404 and r.json()["error"].startswith(
            ("model_not_found", "not_found")
        )


# ---- property-based bodies ----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
input_specs = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["image", "x"]) | st.text(max_size=4),
        "datatype": st.sampled_from(
            ["FP32", "UINT8", "UINT16", "INT64", "FP16", "BOOL", "BYTES", "x"]
        ),
        "shape": st.lists(st.integers(-2, 40), max_size=5) | json_values,
        "data": st.lists(st.integers(0, 255) | st.floats(allow_nan=True), max_size=40)
        | json_values,
        "parameters": st.dictionaries(
            st.sampled_from(["binary_data_size", "x"]), json_values, max_size=2
        )
        | json_values,
    },
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.lists(input_specs, max_size=2) | json_values,
        "outputs": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "name": st.sampled_from(["mask", "logits", "x"]),
                    "parameters": json_values,
                },
            ),
            max_size=2,
        )
        | json_values,
        "parameters": st.dictionaries(
            st.sampled_from(["level", "mode", "binary_data_output", "deadline_ms", "x"]),
            json_values,
            max_size=2,
        )
        | json_values,
        "id": json_values,
    },
)


def refuse(token: str) -> None:
    raise ValueError(f"{token} is not JSON")


@BOUNDED
@given(body=bodies)
def test_arbitrary_json_bodies(infer_url, body):
    r = post(infer_url, json.dumps(body).encode(), {"content-type": "application/json"})
    assert r.status_code in (200, 400, 413, 422), r.text
    if r.status_code == 200:
        json.loads(r.content, parse_constant=refuse)  # strict JSON: no NaN or Infinity
    else:
        assert list(r.json()) == ["error"], r.text


def test_the_server_is_alive_after(live, image_png):
    assert live.client.get("/v2/health/ready").json() == {"ready": True}
    assert live.segment(image_png).status_code == 200
