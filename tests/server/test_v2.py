"""KServe v2 / Open Inference Protocol on a real uvicorn server: JSON tensors and binary tensors
built by hand from the spec (JSON header + raw little-endian bytes)."""

from __future__ import annotations

import json

import numpy as np

from tests.helpers import LENGTH, binary_request, decode, model_name
from unetpp.core.manifest import read_manifest


def v1_mask(live, image_png: bytes, level: int) -> np.ndarray:
    r = live.segment(image_png, level=level)
    assert r.status_code == 200, r.text
    return decode(r.content) > 0


def split_response(response) -> tuple[dict, bytes]:
    length = int(response.headers[LENGTH])
    return json.loads(response.content[:length]), response.content[length:]


def test_health_and_metadata(live, tiny_repository):
    c, name = live.client, model_name(tiny_repository)
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").json() == {"ready": True}
    assert "binary_tensor_data" in c.get("/v2").json()["extensions"]
    meta = c.get(f"/v2/models/{name}").json()
    graphs = [g.name for g in read_manifest(tiny_repository).graphs]
    assert meta["name"] == name and meta["versions"] == graphs
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, -1, -1]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "logits": "FP32",
        "probabilities": "FP32",
        "mask": "UINT8",
    }
    assert c.get(f"/v2/models/{name}/versions/L2").json()["versions"] == ["L2"]
    assert c.get(f"/v2/models/{name}/versions/L2/ready").json() == {"name": name, "ready": True}
    for path in ("/v2/models/nope", f"/v2/models/{name}/versions/L9/ready"):
        r = c.get(path)
        assert r.status_code == 404 and list(r.json()) == ["error"], r.text
        assert r.json()["error"].startswith("model_not_found: ")


def test_infer_json_routes_by_parameters(live, tiny_repository, image, image_png):
    name = model_name(tiny_repository)
    h, w = image.shape
    request = {
        "id": "req-1",
        "inputs": [
            {"name": "image", "datatype": "UINT16", "shape": [h, w], "data": image.tolist()}
        ],
        "parameters": {"level": 3},
    }
    r = live.client.post(f"/v2/models/{name}/infer", json=request)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-1" and body["model_version"] == "L3"
    assert body["parameters"]["route_rule"] == "level" and r.headers["x-unetpp-graph"] == "L3"
    out = {o["name"]: o for o in body["outputs"]}
    assert all(o["shape"] == [1, 1, h, w] for o in out.values())
    logits = np.array(out["logits"]["data"], np.float32).reshape(h, w)
    probabilities = np.array(out["probabilities"]["data"], np.float32).reshape(h, w)
    mask = np.array(out["mask"]["data"]).reshape(h, w)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-6)
    assert out["mask"]["datatype"] == "UINT8" and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(mask.astype(bool), v1_mask(live, image_png, 3))


def test_infer_binary_batch_on_a_version(live, tiny_repository, image, image_png):
    name = model_name(tiny_repository)
    batch = np.stack([image, image[::-1]])[:, None].astype(np.float32)  # [2, 1, H, W]
    header = {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": list(batch.shape),
                "parameters": {"binary_data_size": batch.nbytes},
            }
        ],
        "outputs": [{"name": "mask", "parameters": {"binary_data": True}}, {"name": "logits"}],
    }
    body, headers = binary_request(header, batch)
    r = live.client.post(f"/v2/models/{name}/versions/L1/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    meta, raw = split_response(r)
    assert meta["model_version"] == "L1"
    mask_out, logits_out = meta["outputs"]
    assert mask_out["name"] == "mask" and "data" not in mask_out
    assert mask_out["parameters"]["binary_data_size"] == len(raw) == batch[:, :1].size
    mask = np.frombuffer(raw, np.uint8).reshape(mask_out["shape"])
    np.testing.assert_array_equal(mask[0, 0].astype(bool), v1_mask(live, image_png, 1))
    logits = np.array(logits_out["data"], np.float32).reshape(logits_out["shape"])
    np.testing.assert_array_equal(mask.astype(bool), logits > 0)  # threshold 0.5: logit 0
    assert not np.array_equal(mask[0], mask[1])  # each image its own result


def test_binary_output_for_all_with_uint8_binary_input(live, tiny_repository):
    name = model_name(tiny_repository)
    pixels = (np.arange(40 * 50) % 251).astype(np.uint8).reshape(1, 1, 40, 50)
    header = {
        "inputs": [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": [1, 1, 40, 50],
                "parameters": {"binary_data_size": pixels.nbytes},
            }
        ],
        "parameters": {"binary_data_output": True, "mode": "fast"},
    }
    body, headers = binary_request(header, pixels)
    r = live.client.post(f"/v2/models/{name}/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    meta, raw = split_response(r)
    sizes = [o["parameters"]["binary_data_size"] for o in meta["outputs"]]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities", "mask"]
    assert sizes == [2000 * 4, 2000 * 4, 2000] and len(raw) == sum(sizes)


def test_v2_errors_are_the_spec_shape(live, tiny_repository):
    name = model_name(tiny_repository)
    url = f"/v2/models/{name}/infer"
    good = {"name": "image", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}
    cases = [
        ({"inputs": [good], "parameters": {"level": 2, "mode": "fast"}}, 422, "invalid_parameter"),
        ({"inputs": [good], "parameters": {"colour": 1}}, 422, "invalid_parameter"),
        ({"inputs": [{**good, "shape": [3, 2]}]}, 400, "invalid_tensor"),
        ({"inputs": [{**good, "datatype": "BYTES"}]}, 400, "invalid_tensor"),
        ({"inputs": [{**good, "name": "x"}]}, 400, "invalid_tensor"),
        ({"inputs": [good], "outputs": [{"name": "nope"}]}, 400, "invalid_tensor"),
    ]
    for request, status, error in cases:
        r = live.client.post(url, json=request)
        assert r.status_code == status and list(r.json()) == ["error"], (request, r.text)
        assert r.json()["error"].startswith(f"{error}: "), r.text
    r = live.client.post(
        f"/v2/models/{name}/versions/L2/infer", json={"inputs": [good], "parameters": {"level": 1}}
    )
    assert r.status_code == 422 and "at most one" in r.json()["error"]
    body, headers = binary_request(
        {"inputs": [{**good, "data": None, "parameters": {"binary_data_size": 16}}]},
        np.zeros(3, np.float32),
    )
    r = live.client.post(url, content=body, headers=headers)
    assert r.status_code == 400 and "16 bytes" in r.json()["error"], r.text
    r = live.client.post(url, content=b"{", headers={LENGTH: "99"})
    assert r.status_code == 400 and LENGTH in r.json()["error"]
