from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from unetpp.core.errors import ModelRepositoryError
from unetpp.core.manifest import (
    SCHEMA_VERSION,
    Accuracy,
    Graph,
    Manifest,
    load_repository,
    read_manifest,
    sha256_file,
    write_manifest,
)
from unetpp.core.metrics import ScoreAccumulator, dice, iou
from unetpp.core.preprocess import Preprocessing
from unetpp.core.task import Task


def test_iou_and_dice() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b[1:3] = True  # 8 pixels, 4 shared
    assert iou(a, b) == pytest.approx(4 / 12)
    assert dice(a, b) == pytest.approx(8 / 16)
    assert iou(np.zeros(3), np.zeros(3)) == 1.0
    acc = ScoreAccumulator()
    acc.update(a, b)
    acc.update(a, a)
    assert acc.iou == pytest.approx((4 + 8) / (12 + 8))
    assert acc.as_dict()["images"] == 2
    with pytest.raises(ValueError, match="differ in shape"):
        iou(a, b[:2])


def _repo(tmp_path: Path) -> Manifest:
    (tmp_path / "L1.onnx").write_bytes(b"graph one")
    graph = Graph(
        name="L1",
        file="L1.onnx",
        sha256=sha256_file(tmp_path / "L1.onnx"),
        level=1,
        output="logits",
        precision="fp32",
        parameters=100,
        gflops=1.5,
        accuracy=Accuracy(iou=0.9, dice=0.95, images=3, data="synthetic:val"),
        latency_ms={"256": 1.0},
    )
    manifest = Manifest(
        name="unetpp",
        version="1",
        checkpoint_sha256="0" * 64,
        arch="unetpp",
        in_channels=1,
        task=Task.binary(0.5),
        preprocessing=Preprocessing(),
        reference_size=256,
        graphs=(graph,),
    )
    write_manifest(tmp_path, manifest)
    return manifest


def test_manifest_round_trip_and_hash_check(tmp_path: Path) -> None:
    manifest = _repo(tmp_path)
    assert load_repository(tmp_path) == manifest
    assert json.loads((tmp_path / "model.json").read_text())["schema_version"] == SCHEMA_VERSION
    (tmp_path / "L1.onnx").write_bytes(b"graph two")
    with pytest.raises(ModelRepositoryError, match="modified or replaced"):
        load_repository(tmp_path)
    (tmp_path / "L1.onnx").unlink()
    with pytest.raises(ModelRepositoryError, match="missing"):
        load_repository(tmp_path)


def test_manifest_refusals(tmp_path: Path) -> None:
    manifest = _repo(tmp_path)
    path = tmp_path / "model.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ModelRepositoryError, match="newer than"):
        read_manifest(tmp_path)
    path.write_text(json.dumps({**data, "graphs": [{"name": "L1"}]}))
    with pytest.raises(ModelRepositoryError, match="malformed"):
        read_manifest(tmp_path)
    path.write_text("{")
    with pytest.raises(ModelRepositoryError, match="unreadable"):
        read_manifest(tmp_path)
    with pytest.raises(ModelRepositoryError, match="no manifest"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(ModelRepositoryError, match="plain name"):
        replace(manifest.graphs[0], file="../etc/passwd")


def test_schema_1_manifest_reads_as_a_binary_task(tmp_path: Path) -> None:
    manifest = _repo(tmp_path)
    path = tmp_path / "model.json"
    data = json.loads(path.read_text())
    task = data.pop("task")
    assert task == {
        "kind": "binary",
        "classes": ["background", "foreground"],
        "colours": [[0, 0, 0], [255, 40, 40]],
        "threshold": 0.5,
    }
    v1 = {**data, "schema_version": 1, "num_classes": 1, "threshold": 0.3}
    path.write_text(json.dumps(v1))
    old = read_manifest(tmp_path)
    assert old.task == Task.binary(0.3) and old.threshold == 0.3 and old.num_classes == 1
    assert replace(old, task=manifest.task, schema_version=SCHEMA_VERSION) == manifest
    path.write_text(json.dumps({**v1, "num_classes": 3}))
    with pytest.raises(ModelRepositoryError, match="num_classes"):
        read_manifest(tmp_path)
    path.write_text(json.dumps({**data, "task": {**task, "classes": ["background"]}}))
    with pytest.raises(ModelRepositoryError, match=r"malformed.*classes"):
        read_manifest(tmp_path)


def test_core_and_cli_import_without_torch(run_without_torch) -> None:
    code = (
        "import unetpp.core.manifest, unetpp.core.imageio, unetpp.core.preprocess, unetpp.cli\n"
        "import sys; assert 'torch' not in sys.modules\n"
        "try:\n    import torch\nexcept ImportError: print('blocked')\n"
    )
    result = run_without_torch(code)
    assert result.returncode == 0, result.stderr
    assert "blocked" in result.stdout


def test_bf16_entries_name_their_backend_and_schema_2_still_loads(tmp_path: Path) -> None:
    manifest = _repo(tmp_path)
    fp32 = manifest.graphs[0]
    bf16 = replace(fp32, name="L1.bf16", precision="bf16", backend="openvino")
    write_manifest(tmp_path, replace(manifest, graphs=(fp32, bf16)))
    loaded = load_repository(tmp_path)
    assert [(g.name, g.file, g.precision, g.backend) for g in loaded.graphs] == [
        ("L1", "L1.onnx", "fp32", None),
        ("L1.bf16", "L1.onnx", "bf16", "openvino"),
    ]
    path = tmp_path / "model.json"
    data = json.loads(path.read_text())
    v2 = {**data, "schema_version": 2, "graphs": [data["graphs"][0]]}  # written before bf16
    del v2["graphs"][0]["backend"]
    path.write_text(json.dumps(v2))
    old = load_repository(tmp_path)
    assert old.schema_version == 2 and old.graphs[0].backend is None
    assert replace(old, schema_version=SCHEMA_VERSION) == manifest
    with pytest.raises(ModelRepositoryError, match="bf16 graph needs backend openvino"):
        replace(bf16, backend=None)
    with pytest.raises(ModelRepositoryError, match="backend"):
        replace(fp32, backend="tensorrt")
