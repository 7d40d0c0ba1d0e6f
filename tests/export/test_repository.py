from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from unetpp.core.errors import ModelRepositoryError
from unetpp.core.manifest import SCHEMA_VERSION, load_repository, read_manifest
from unetpp.export.graphs import check_graph, initializer_parameters
from unetpp.model.checkpoint import load_checkpoint
from unetpp.model.unetpp import count_parameters


def test_tiny_repository_has_every_level_and_the_ensemble(tiny_repository: Path) -> None:
    manifest = load_repository(tiny_repository)
    assert manifest.schema_version == SCHEMA_VERSION
    assert [g.name for g in manifest.graphs] == ["L1", "L2", "L3", "L4", "ensemble"]
    assert sorted(p.name for p in tiny_repository.iterdir()) == sorted(
        [
            "model.json",
            *(f"L{k}.onnx" for k in range(1, 5)),
            *(f"stage{k}.onnx" for k in range(1, 5)),
        ]
    )
    ensemble = manifest.graph("ensemble")
    assert (ensemble.file, ensemble.output, ensemble.level) == ("L4.onnx", "ensemble", 4)
    assert manifest.extra["ensemble"]["offered"] is True
    for graph in manifest.graphs:
        assert graph.precision == "fp32" and graph.validated
        assert graph.accuracy is not None and graph.accuracy.images == 4
        assert 0.0 < graph.accuracy.iou <= graph.accuracy.dice <= 1.0
        assert graph.latency_ms["256"] > 0
    # deeper levels cost more
    flops = [manifest.graph(f"L{k}").gflops for k in range(1, 5)]
    assert flops == sorted(flops) and flops[0] > 0


def test_graphs_are_standalone_valid_and_bn_folded(tiny_repository: Path) -> None:
    for level in range(1, 5):
        outputs = ("logits", "ensemble") if level == 4 else ("logits",)
        model = check_graph(tiny_repository / f"L{level}.onnx", outputs)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
        ops = {node.op_type for node in model.graph.node}
        assert "BatchNormalization" not in ops and "Conv" in ops
        image = model.graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in image] == ["N", 1, "H", "W"]


def test_parameters_are_those_of_the_pruned_level(
    tiny_repository: Path, tiny_checkpoint: Path
) -> None:
    model = load_checkpoint(tiny_checkpoint).build()
    manifest = load_repository(tiny_repository)
    for level in range(1, 5):
        graph = manifest.graph(f"L{level}")
        assert graph.parameters == count_parameters(model.prune(level))
    # L4.onnx also holds head_1..head_3 for its ensemble output, and nothing else
    with_heads = count_parameters(model.prune(4, keep_heads=True))
    assert manifest.graph("ensemble").parameters == with_heads
    stored = {
        k: initializer_parameters(onnx.load(str(tiny_repository / f"L{k}.onnx")))
        for k in range(1, 5)
    }
    expected = {k: count_parameters(model.prune(k)) for k in (1, 2, 3)} | {4: with_heads}
    assert stored == expected


def test_a_tampered_or_missing_graph_is_refused(tiny_repository: Path, tmp_path: Path) -> None:
    repo = shutil.copytree(tiny_repository, tmp_path / "models")
    data = bytearray((repo / "L2.onnx").read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the weights
    (repo / "L2.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelRepositoryError, match=r"graph L2: .* modified or replaced"):
        load_repository(repo)
    (repo / "L2.onnx").unlink()
    with pytest.raises(ModelRepositoryError, match=r"graph L2: .* missing"):
        load_repository(repo)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sha256", "abc", "sha256"),
        ("parameters", -5, "parameters"),
        ("parameters", "8113", "parameters"),
        ("latency_ms", {"fast": 1.0}, "latency_ms"),
        ("accuracy", {"iou": 1.5, "dice": 0.5, "images": 4, "data": "x"}, "iou"),
        ("level", 5, "level must be 1..4"),
        ("precision", "int4", "unknown precision"),
    ],
)
def test_manifest_schema_is_validated(
    tiny_repository: Path, tmp_path: Path, field: str, value: object, message: str
) -> None:
    repo = shutil.copytree(tiny_repository, tmp_path / "models")
    path = repo / "model.json"
    data = json.loads(path.read_text())
    assert read_manifest(repo).to_dict() == data  # what export writes is what the reader reads
    data["graphs"][1][field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ModelRepositoryError, match=message):
        read_manifest(repo)


def test_a_unet_baseline_exports_as_one_graph_without_accuracy(tmp_path: Path) -> None:
    from unetpp.core.preprocess import Preprocessing
    from unetpp.export.repository import ExportOptions, export_repository
    from unetpp.model.checkpoint import Checkpoint, save_checkpoint
    from unetpp.model.unetpp import ModelConfig, build_model

    cfg = ModelConfig(arch="unet", widths=(4, 8, 16, 32, 64), deep_supervision=False)
    model = build_model(cfg)
    ckpt = save_checkpoint(
        tmp_path / "unet.pt", Checkpoint(cfg, Preprocessing(), model.state_dict())
    )
    options = ExportOptions(int8=False, bf16=False, latency_sizes=(64,))
    manifest = export_repository(ckpt, tmp_path / "models", options=options)
    (graph,) = manifest.graphs
    assert (graph.name, graph.level, graph.accuracy) == ("L4", 4, None)
    assert graph.parameters == count_parameters(model) > 0
    assert set(graph.latency_ms) == {"64"}
    assert manifest.arch == "unet"
    assert manifest.extra["ensemble"] == {"offered": False, "reason": "the model has one head"}
    assert load_repository(tmp_path / "models") == manifest
