"""A multi-class model through export and evaluation: the task, per-class accuracy and parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import tiny_samples
from unetpp.core.errors import ExportError
from unetpp.core.inference import create_session, predict_logits, run_batch
from unetpp.core.manifest import SCHEMA_VERSION, load_repository
from unetpp.core.task import Task
from unetpp.export.evaluate import evaluate_repository, format_table
from unetpp.export.graphs import check_parity, export_graph
from unetpp.model.checkpoint import load_checkpoint

CLASSES = ("round", "elongated")


def test_the_manifest_carries_the_task_and_per_class_figures(
    tiny_classes_repository: Path,
) -> None:
    manifest = load_repository(tiny_classes_repository)
    assert manifest.task == Task.from_names(CLASSES)
    assert manifest.num_classes == 3
    raw = json.loads((tiny_classes_repository / "model.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION
    assert raw["task"]["classes"] == ["background", *CLASSES]
    assert "num_classes" not in raw and "threshold" not in raw
    for graph in manifest.graphs:
        per_class = graph.accuracy.classes
        assert set(per_class) == set(CLASSES)
        # routing reads accuracy.iou: the mean over the foreground classes
        mean = np.mean([per_class[c]["iou"] for c in CLASSES])
        assert graph.accuracy.iou == pytest.approx(mean, abs=2e-6)
    for figures in manifest.extra["parity"].values():
        assert set(figures["classes"]) == set(CLASSES)
        for cls in figures["classes"].values():
            assert cls["max_abs_diff"] < 1e-4 and cls["mask_agreement"] >= 0.9999


def test_the_ensemble_is_the_mean_softmax(
    tiny_classes_repository: Path, tiny_classes_checkpoint: Path
) -> None:
    model = load_checkpoint(tiny_classes_checkpoint).build()
    x = np.random.default_rng(3).standard_normal((2, 1, 48, 64), dtype=np.float32)
    got = run_batch(create_session(tiny_classes_repository / "L4.onnx"), x, "ensemble")
    with torch.no_grad():
        heads = [torch.softmax(h, dim=1) for h in model.head_logits(torch.from_numpy(x))]
    mean = torch.stack(heads).mean(0).numpy()
    np.testing.assert_allclose(Task.from_names(CLASSES).probabilities(got), mean, atol=1e-5)


def test_evaluate_scores_each_class(tiny_classes_repository: Path) -> None:
    samples = tiny_samples("val", classes=True)
    rows = evaluate_repository(tiny_classes_repository, samples)
    manifest = load_repository(tiny_classes_repository)
    session = create_session(tiny_classes_repository / "L2.onnx")
    # the L2 row, recomputed by hand: each class's IoU over the four images, then the mean
    labels = [
        manifest.task.labels(predict_logits(session, s.image, manifest.preprocessing))
        for s in samples
    ]
    pred, true = np.stack(labels), np.stack([s.mask for s in samples])
    ious = [
        np.count_nonzero((pred == k) & (true == k)) / np.count_nonzero((pred == k) | (true == k))
        for k in (1, 2)
    ]
    row = next(r for r in rows if r.graph == "L2")
    assert row.classes["round"]["iou"] == pytest.approx(ious[0], abs=1e-6)
    assert row.classes["elongated"]["iou"] == pytest.approx(ious[1], abs=1e-6)
    assert row.iou == pytest.approx(np.mean(ious), abs=1e-6)
    table = format_table(rows)
    assert "IoU round" in table.splitlines()[0] and "IoU elongated" in table.splitlines()[0]


def test_parity_names_the_class_that_differs(tiny_classes_checkpoint: Path, tmp_path: Path) -> None:
    pruned = load_checkpoint(tiny_classes_checkpoint).build().prune(1)
    path = export_graph(pruned, tmp_path / "L1.onnx", in_channels=1)
    task = Task.from_names(CLASSES)
    image = np.random.default_rng(2).random((1, 32, 48), dtype=np.float32)
    figures = check_parity(path, pruned, [image], in_channels=1, task=task)
    assert set(figures["classes"]) == set(CLASSES)
    with torch.no_grad():
        pruned.heads["head_1"].bias[2] += 1e-3  # only the elongated class's logit drifts
    with pytest.raises(
        ExportError, match=r"L1.onnx: output logits differs .* for class 'elongated'"
    ):
        check_parity(path, pruned, [image], in_channels=1, task=task)


def test_a_schema_1_repository_still_loads(tiny_repository: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(tiny_repository, old)
    data = json.loads((old / "model.json").read_text())
    task = data.pop("task")
    data.update(schema_version=1, num_classes=1, threshold=task["threshold"])
    (old / "model.json").write_text(json.dumps(data))
    manifest = load_repository(old)
    assert manifest.task == Task.binary(task["threshold"])
    samples = tiny_samples("val", count=2)
    assert (
        evaluate_repository(old, samples)[0].iou
        == evaluate_repository(tiny_repository, samples)[0].iou
    )
