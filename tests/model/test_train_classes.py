"""Multi-class training: a smoke run on "synthetic-classes", and bad label maps or class lists
stopping `unetpp train` with one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unetpp.core.datasets import SYNTHETIC_CLASSES, load_split
from unetpp.core.task import Task
from unetpp.model.checkpoint import load_checkpoint
from unetpp.model.config import TrainConfig
from unetpp.model.train import evaluate, format_table, train

TINY = (4, 8, 16, 32, 64)


def test_a_multiclass_run_scores_each_class(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = TrainConfig(
            data="synthetic-classes", out=str(tmp_path), widths=TINY, crop=32, batch_size=8,
            epoch_crops=24, epochs=1, lr=3e-3,
        )  # fmt: skip
        train(config)
        best = load_checkpoint(tmp_path / "best.pt")
        rescored = evaluate(
            best.build(), load_split("synthetic-classes", "val"), best.preprocessing, best.task
        )
    finally:
        torch.set_num_threads(threads)
    assert best.task == Task.from_names(SYNTHETIC_CLASSES)
    assert best.config.num_classes == 3
    assert best.build()(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert list(record["val"]) == ["L1", "L2", "L3", "L4", "ensemble"]
    for level, scores in best.metrics.items():
        assert set(scores["classes"]) == set(SYNTHETIC_CLASSES)
        mean = np.mean([c["iou"] for c in scores["classes"].values()])
        assert scores["iou"] == pytest.approx(mean, abs=2e-6)
        assert record["val"][level] == scores
        assert rescored[level]["iou"] == pytest.approx(scores["iou"], abs=1e-3)
    table = format_table(best.metrics)
    assert "iou round" in table and "iou elongated" in table


def _folder(root: Path, masks: list[np.ndarray], classes: object | None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, mask in enumerate(masks):
        Image.fromarray(np.full(mask.shape, 100, np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    if classes is not None:
        (root / "classes.json").write_text(json.dumps(classes))
    return root


def _train_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unetpp", "train", *args, "--widths", "4,8,16,32,64"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _labels(top: int) -> np.ndarray:
    mask = np.zeros((32, 32), np.uint8)
    mask[4:12, 4:12] = 1
    mask[20:24, 20:30] = top
    return mask


@pytest.mark.parametrize(
    ("masks", "classes", "flags", "message"),
    [
        # a value above K-1 in one mask
        ([_labels(2), _labels(5)], ["round", "long"], [], r"1.png: label 5 in the mask.*0\.\.2"),
        # the classes file and --classes disagree
        ([_labels(2)] * 2, ["round", "long"], ["--classes", "round,short"], "does not match"),
        # --classes on 0/255 masks
        ([_labels(1) * 255] * 2, None, ["--classes", "a,b"], "label 255 in the mask"),
        # a classes file that is not a list of names
        ([_labels(2)] * 2, {"1": "round"}, [], "classes.json: expected a JSON list"),
        ([_labels(2)] * 2, ["round", "round"], [], "classes.json: class names must be unique"),
        # a colour image as a multi-class mask
        ([np.dstack([_labels(2)] * 3)] * 2, ["a", "b"], [], "single-channel label map"),
    ],
)
def test_bad_label_maps_stop_with_one_line(
    tmp_path: Path, masks: list, classes: object, flags: list[str], message: str
) -> None:
    data = _folder(tmp_path / "data", masks, classes)
    result = _train_cli("--data", str(data), "--out", str(tmp_path / "out"), *flags)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("unetpp train: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()
