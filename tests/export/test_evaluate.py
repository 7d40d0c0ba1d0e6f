from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import tiny_samples
from unetpp.core.inference import create_session, predict_logits
from unetpp.core.metrics import ScoreAccumulator
from unetpp.core.preprocess import crop_to, pad_to_multiple
from unetpp.export.evaluate import evaluate_repository
from unetpp.model.checkpoint import load_checkpoint


def _torch_scores(checkpoint: Path, samples: list, level: int | None) -> ScoreAccumulator:
    """IoU of one level (None: the ensemble) computed with PyTorch, independently of onnxruntime."""
    ckpt = load_checkpoint(checkpoint)
    model, prep = ckpt.build(), ckpt.preprocessing
    acc = ScoreAccumulator()
    for s in samples:
        x, size = pad_to_multiple(prep(s.image))
        with torch.no_grad():
            xt = torch.from_numpy(x[None])
            logits = model.ensemble(xt) if level is None else model(xt, level=level)
        acc.update(torch.sigmoid(crop_to(logits[0, 0], size)).numpy() > 0.5, s.mask)
    return acc


def test_evaluate_equals_an_independent_pytorch_computation(
    tiny_repository: Path, tiny_checkpoint: Path
) -> None:
    samples = tiny_samples("test")
    rows = {r.graph: r for r in evaluate_repository(tiny_repository, samples)}
    assert list(rows) == ["L1", "L2", "L3", "L4", "ensemble"]
    for name, level in [("L1", 1), ("L2", 2), ("L3", 3), ("L4", 4), ("ensemble", None)]:
        expected = _torch_scores(tiny_checkpoint, samples, level)
        assert rows[name].images == len(samples)
        # masks may differ on a pixel or two where a logit sits at the threshold
        assert rows[name].iou == pytest.approx(expected.iou, abs=1e-3)
        assert rows[name].dice == pytest.approx(expected.dice, abs=1e-3)
        assert rows[name].ms_per_image > 0


def test_manifest_accuracy_is_that_of_the_exported_files(tiny_repository: Path) -> None:
    rows = evaluate_repository(tiny_repository, tiny_samples("val"))
    manifest = json.loads((tiny_repository / "model.json").read_text())
    recorded = {g["name"]: g["accuracy"] for g in manifest["graphs"]}
    for row in rows:
        assert recorded[row.graph]["data"] == "synthetic:val"
        assert row.iou == pytest.approx(recorded[row.graph]["iou"], abs=1e-6)
        assert row.dice == pytest.approx(recorded[row.graph]["dice"], abs=1e-6)
    assert len({round(r.iou, 6) for r in rows}) > 1  # the levels really are different networks


def test_evaluate_cli_runs_without_torch(tiny_repository: Path, run_without_torch) -> None:
    code = (
        "import sys\n"
        "from unetpp.cli import main\n"
        "rc = main(['evaluate', sys.argv[1], '--data', 'synthetic', '--split', 'val', '--json'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc)\n"
    )
    result = run_without_torch(code, str(tiny_repository))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["data"] == "synthetic:val"
    assert [g["graph"] for g in report["graphs"]] == ["L1", "L2", "L3", "L4", "ensemble"]
    assert all(g["images"] == 4 and 0 <= g["iou"] <= 1 for g in report["graphs"])


def test_evaluate_refuses_a_tampered_repository_in_one_line(
    tiny_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unetpp.cli import main

    repo = tmp_path / "models"
    repo.mkdir()
    for f in tiny_repository.iterdir():
        (repo / f.name).write_bytes(f.read_bytes())
    with open(repo / "L3.onnx", "ab") as fp:
        fp.write(np.zeros(4, np.uint8).tobytes())
    assert main(["evaluate", str(repo), "--data", "synthetic", "--split", "val"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "graph L3" in err[0] and "modified or replaced" in err[0]


def test_predict_logits_pads_runs_and_crops_back(
    tiny_repository: Path, tiny_checkpoint: Path
) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    sample = tiny_samples("val", count=1)[0]
    assert sample.image.shape == (72, 100)  # not multiples of 16
    session = create_session(tiny_repository / "L2.onnx")
    got = predict_logits(session, sample.image, ckpt.preprocessing)
    x, size = pad_to_multiple(ckpt.preprocessing(sample.image))
    with torch.no_grad():
        expected = ckpt.build()(torch.from_numpy(x[None]), level=2)[0].numpy()
    assert got.shape == (1, 72, 100)
    np.testing.assert_allclose(got, crop_to(expected, size), atol=1e-4)
