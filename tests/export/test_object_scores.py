"""Separate objects' scores at export: measured per graph on validation images with instance
labels, written to the manifest, reproduced by `unetpp evaluate` and by an independent run."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from tests.helpers import tiny_samples
from unetpp.core import instances
from unetpp.core.errors import ModelRepositoryError
from unetpp.core.imageio import encode_png
from unetpp.core.inference import create_session, predict_logits
from unetpp.core.manifest import Manifest, read_manifest
from unetpp.core.metrics import match_objects
from unetpp.export import evaluate
from unetpp.export.repository import ExportOptions, export_repository


def object_samples() -> list:
    """Tiny validation images whose references are instance label images (each connected
    component of the mask an object, numbered with gaps, as real label images often are)."""
    return [replace(s, objects=ndi.label(s.mask)[0] * 3) for s in tiny_samples("val")]


@pytest.fixture(scope="module")
def objects_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("objects") / "repo"
    export_repository(
        tiny_checkpoint,
        out,
        val_samples=object_samples(),
        val_data="components:val",
        options=ExportOptions(int8=False, bf16=False, ensemble="never", cascade_targets=()),
    )
    return out


def test_export_records_object_scores_per_graph(objects_repository: Path) -> None:
    manifest = read_manifest(objects_repository)
    assert [g.name for g in manifest.graphs] == ["L1", "L2", "L3", "L4"]
    session = create_session(objects_repository / "L4.onnx")
    tp = fp = fn = 0
    for s in object_samples():  # L4's figure recomputed here, from its logits
        logits = predict_logits(session, s.image, manifest.preprocessing)
        counts = match_objects(instances.split(logits[0] > 0), s.objects)
        tp, fp, fn = tp + counts[0], fp + counts[1], fn + counts[2]
    recorded = manifest.graph("L4").instances
    assert recorded is not None and recorded.data == "components:val" and recorded.images == 4
    assert (recorded.tp, recorded.fp, recorded.fn) == (tp, fp, fn)
    assert tp > 0 and recorded.ap50 == pytest.approx(tp / (tp + fp + fn), abs=1e-6)
    for graph in manifest.graphs:
        assert graph.instances is not None and 0 <= graph.instances.f1 <= 1


def test_no_object_scores_without_instance_labels(tiny_repository: Path) -> None:
    assert all(g.instances is None for g in read_manifest(tiny_repository).graphs)


def test_evaluate_prints_the_object_scores(
    objects_repository: Path, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "data"  # a folder source whose masks are 16-bit instance label images
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    for s in object_samples():
        (data / "images" / f"{s.name}.png").write_bytes(encode_png(s.image))
        (data / "masks" / f"{s.name}.png").write_bytes(encode_png(s.objects.astype(np.uint16)))
    args = dict(directory=objects_repository, data=str(data), val_dir=str(data), threads=None)
    assert evaluate.main(argparse.Namespace(split="val", json=False, **args)) == 0
    table = capsys.readouterr().out
    assert "AP@0.5" in table and "obj F1" in table
    assert evaluate.main(argparse.Namespace(split="val", json=True, **args)) == 0
    rows = {r["graph"]: r for r in json.loads(capsys.readouterr().out)["graphs"]}
    for graph in read_manifest(objects_repository).graphs:  # the same images as at export
        got, recorded = rows[graph.name]["objects"], graph.instances
        assert (got["tp"], got["fp"], got["fn"]) == (recorded.tp, recorded.fp, recorded.fn)
        assert f"{got['ap50']:.4f}" in table


def test_manifest_refuses_bad_object_scores(objects_repository: Path) -> None:
    data = json.loads((objects_repository / "model.json").read_text())
    assert Manifest.from_dict(data).graph("L1").instances is not None
    data["graphs"][0]["instances"]["ap50"] = 1.5
    with pytest.raises(ModelRepositoryError, match="instances ap50"):
        Manifest.from_dict(data)
