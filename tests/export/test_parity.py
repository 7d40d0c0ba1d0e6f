from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from unetpp.core.errors import ExportError
from unetpp.core.inference import create_session, run_batch
from unetpp.core.task import Task
from unetpp.export.graphs import check_parity, export_graph
from unetpp.model.checkpoint import load_checkpoint
from unetpp.model.unetpp import average_heads


def test_graph_matches_the_pruned_module_on_odd_sizes_and_batches(
    tiny_repository: Path, tiny_checkpoint: Path
) -> None:
    model = load_checkpoint(tiny_checkpoint).build()
    x = np.random.default_rng(1).standard_normal((3, 1, 80, 48), dtype=np.float32)
    for level in (1, 3):
        got = run_batch(create_session(tiny_repository / f"L{level}.onnx"), x)
        with torch.no_grad():
            expected = model(torch.from_numpy(x), level=level).numpy()
        assert got.shape == (3, 1, 80, 48)
        np.testing.assert_allclose(got, expected, atol=1e-4)
    with torch.no_grad():
        ensemble = model.ensemble(torch.from_numpy(x)).numpy()
    got = run_batch(create_session(tiny_repository / "L4.onnx"), x, "ensemble")
    np.testing.assert_allclose(got, ensemble, atol=1e-4)


def test_parity_check_fails_loudly_on_a_graph_that_differs(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    model = load_checkpoint(tiny_checkpoint).build()
    pruned = model.prune(2)
    path = export_graph(pruned, tmp_path / "L2.onnx", in_channels=1)
    image = np.random.default_rng(2).random((1, 32, 64), dtype=np.float32)
    figures = check_parity(path, pruned, [image], in_channels=1, task=Task.binary())
    assert figures["max_abs_diff"] < 1e-4 and figures["mask_agreement"] >= 0.9999
    assert figures["inputs"] == 3  # the image and two random batches
    with torch.no_grad():
        pruned.heads["head_2"].bias += 1e-3  # a small drift: masks barely change, logits do
    with pytest.raises(ExportError, match=r"L2.onnx: output logits differs from PyTorch"):
        check_parity(path, pruned, [image], in_channels=1, task=Task.binary())


def test_opset_below_18_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = load_checkpoint(tiny_checkpoint).build()
    with pytest.raises(ExportError, match="opset must be >= 18"):
        export_graph(model.prune(1), tmp_path / "L1.onnx", in_channels=1, opset=17)


def test_the_ensemble_is_accurate_on_confident_pixels() -> None:
    # where the heads are confident, logit(mean probability) must not lose its precision
    # (a float32 logit(p) near p = 1 is off by 1e-3 and would fail the 1e-4 parity check)
    heads = np.array([[15.0, -17.0, 3.0, 19.0], [18.0, -16.0, -2.0, 17.5]])
    p = (1.0 / (1.0 + np.exp(-heads))).mean(axis=0)  # float64: exact enough for |x| <= 20
    exact = np.log(p) - np.log1p(-p)
    got = average_heads([torch.tensor(h, dtype=torch.float32) for h in heads])
    np.testing.assert_allclose(got.numpy(), exact, atol=1e-5, rtol=1e-6)
