"""The adaptive cascade on either backend: OpenVINO's stage runs give onnxruntime's node tensors
and heads; onnxruntime's stages do not spin nor shrink their arena."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import synthetic
from unetpp.core.backends import OnnxRuntime, OpenVINO
from unetpp.core.cascade import Cascade, first_input, for_stages
from unetpp.core.inference import shrinking_arena
from unetpp.core.manifest import load_repository
from unetpp.core.preprocess import pad_to_multiple


def test_onnxruntimes_stages_do_not_spin_nor_shrink_and_openvino_is_as_given():
    server = OnnxRuntime(memory_arena=False, run_options=shrinking_arena())
    assert for_stages(server) == OnnxRuntime(memory_arena=False, spinning=False)
    assert for_stages(OpenVINO()) == OpenVINO()


def test_openvino_stages_give_onnxruntimes_node_tensors_and_heads(tiny_repository: Path):
    pytest.importorskip("openvino")
    manifest = load_repository(tiny_repository)
    ort, ov = (Cascade.open(tiny_repository, manifest, backend=b) for b in (None, OpenVINO()))
    prep = manifest.preprocessing
    x, _ = pad_to_multiple(prep(synthetic(96, 128, seed=2)), prep.multiple)
    feats = {name: first_input(x) for name in ("ort", "ov")}
    for level, stage in enumerate(manifest.cascade.stages, 1):
        ort.step(level, feats["ort"])
        ov.step(level, feats["ov"])
        for name in stage.outputs:
            want, got = feats["ort"][name], feats["ov"][name]
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=1e-3 * max(1.0, np.abs(want).max()))
    heads = [np.stack(c.infer_heads(x)) for c in (ort, ov)]
    assert np.mean((heads[0] > 0) == (heads[1] > 0)) >= 0.999
