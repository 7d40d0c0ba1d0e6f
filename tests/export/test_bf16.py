"""bf16 variants at export: each fp32 graph run by OpenVINO in bf16, measured on the
validation samples like an int8 variant, written as a manifest entry on the fp32 file that
only the openvino backend serves; `unetpp evaluate` measures them the same way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import tiny_samples
from unetpp.core.backends import OnnxRuntime, OpenVINO, bf16_runs
from unetpp.core.manifest import load_repository
from unetpp.export.evaluate import evaluate_repository

pytestmark = pytest.mark.skipif(not bf16_runs(), reason="OpenVINO does not compute in bf16 here")


def test_bf16_entries_are_the_fp32_files_measured_on_openvino(tiny_bf16_repository: Path):
    manifest = load_repository(tiny_bf16_repository)
    bf16 = {g.name: g for g in manifest.graphs if g.precision == "bf16"}
    rejected = {r["name"] for r in manifest.extra["bf16"]["rejected"]}
    assert manifest.extra["bf16"]["enabled"] and set(bf16) | rejected == {
        f"L{k}.bf16" for k in range(1, 5)
    }
    assert bf16, "no bf16 variant kept its accuracy"
    for graph in bf16.values():
        fp32 = manifest.graph(graph.name.removesuffix(".bf16"))
        assert (graph.file, graph.sha256, graph.level) == (fp32.file, fp32.sha256, fp32.level)
        assert graph.backend == "openvino" and fp32.backend is None
        assert graph.accuracy is not None and fp32.accuracy is not None
        assert graph.accuracy.data == "synthetic:val"
        assert abs(fp32.accuracy.iou - graph.accuracy.iou) <= manifest.extra["bf16"]["margin_iou"]
        assert graph.latency_ms["256"] > 0 and graph.parameters == fp32.parameters
    raw = json.loads((tiny_bf16_repository / "model.json").read_text())
    assert raw["schema_version"] == 3
    assert {g["name"]: g["backend"] for g in raw["graphs"]}["L4.bf16"] == "openvino"
    assert sorted(p.name for p in tiny_bf16_repository.glob("*.onnx")) == [
        f"L{k}.onnx" for k in range(1, 5)
    ]


def test_bf16_really_runs_in_bf16(tiny_bf16_repository: Path):
    """The entry's session computes in bf16: its logits differ from fp32's, its masks agree."""
    manifest = load_repository(tiny_bf16_repository)
    prep = manifest.preprocessing
    x = np.stack([prep(s.image[:64, :64]) for s in tiny_samples("val", count=2)])
    path = tiny_bf16_repository / "L4.onnx"
    fp32 = OnnxRuntime().open(path).run(x, "logits")
    bf16 = OpenVINO().open(path, 1, "bf16").run(x, "logits")
    assert not np.allclose(bf16, fp32, atol=1e-4)
    assert ((bf16 > 0) == (fp32 > 0)).mean() >= 0.99


def test_evaluate_measures_bf16_entries_as_the_export_did(tiny_bf16_repository: Path):
    rows = {r.graph: r for r in evaluate_repository(tiny_bf16_repository, tiny_samples("val"))}
    manifest = load_repository(tiny_bf16_repository)
    assert list(rows) == [g.name for g in manifest.graphs]
    for graph in manifest.graphs:
        assert graph.accuracy is not None
        assert rows[graph.name].precision == graph.precision
        assert rows[graph.name].iou == pytest.approx(graph.accuracy.iou, abs=1e-6)
