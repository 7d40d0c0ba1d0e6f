"""Both runtimes on the tiny exported model: the same logits (f32), masks that agree (bf16),
the same call signature as run_batch, and clear errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from unetpp.core.backends import OnnxRuntime, OpenVINO, backend
from unetpp.core.errors import InvalidInput, ModelRepositoryError
from unetpp.core.manifest import load_repository
from unetpp.core.preprocess import pad_to_multiple
from unetpp.core.task import logit_threshold

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def batch(tiny_repository: Path) -> np.ndarray:
    from unetpp.core.datasets import synthetic_split

    prep = load_repository(tiny_repository).preprocessing
    images = [s.image[:160, :192] for s in synthetic_split("val", count=3)]
    return np.stack([pad_to_multiple(prep(image))[0] for image in images])


@pytest.mark.parametrize(
    ("graph", "output"), [("L1", "logits"), ("L4", "logits"), ("L4", "ensemble")]
)
def test_openvino_f32_matches_onnxruntime(tiny_repository, batch, graph, output):
    path = tiny_repository / f"{graph}.onnx"
    ours = OnnxRuntime().open(path, threads=1).run(batch, output)
    theirs = OpenVINO().open(path, threads=1, precision="fp32").run(batch, output)
    assert theirs.shape == ours.shape == (3, 1, 160, 192) and theirs.dtype == np.float32
    np.testing.assert_allclose(theirs, ours, rtol=1e-3, atol=1e-3)


def test_openvino_bf16_masks_agree_and_sessions_serve_threads(tiny_repository, batch):
    path = tiny_repository / "L4.onnx"
    cut = logit_threshold(load_repository(tiny_repository).threshold)
    reference = OnnxRuntime().open(path).run(batch, "logits") > cut
    session = OpenVINO().open(path, threads=1, precision="bf16")
    with ThreadPoolExecutor(3) as pool:  # one infer request per thread
        outs = list(pool.map(lambda x: session.run(x[None], "logits")[0], batch))
    masks = np.stack(outs) > cut
    assert (masks == reference).mean() >= 0.99
    assert not np.array_equal(np.stack(outs), OnnxRuntime().open(path).run(batch, "logits"))


def test_backend_names_and_bad_files(tmp_path):
    assert backend("onnxruntime").name == "onnxruntime" and backend("openvino").name == "openvino"
    assert backend("onnxruntime", memory_arena=False) == OnnxRuntime(memory_arena=False)
    with pytest.raises(InvalidInput, match="unknown backend 'tensorrt'"):
        backend("tensorrt")
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelRepositoryError, match="OpenVINO cannot load it"):
        OpenVINO().open(tmp_path / "bad.onnx")
