"""`unetpp predict --backend`: OpenVINO here gives onnxruntime's masks, routes to the bf16
entries the server's OpenVINO serves, and defaults as the server's setting does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.cli.test_predict import SMALL_TILES, folder, outputs  # noqa: F401 (a fixture)
from unetpp.cli import build_parser, main
from unetpp.core.backends import OvSession, bf16_runs
from unetpp.core.pipeline import LocalModel
from unetpp.server.settings import Settings

pytest.importorskip("openvino")


def test_the_default_backend_is_the_servers():
    args = build_parser().parse_args(["predict", "x.png", "--out", "o", "--models", "m"])
    assert args.backend == Settings().backend


def test_openvino_runs_every_graph_here(tiny_repository: Path):
    model = LocalModel.open(tiny_repository, backend_name="openvino", threads=1)
    assert set(model.graphs) == {g.name for g in model.manifest.graphs}  # fp32 and int8
    assert all(isinstance(s, OvSession) for s in model.sessions.values())


@pytest.mark.parametrize("route", [["--level", "4"], ["--mode", "fast"]])
def test_openvino_gives_onnxruntimes_masks(
    tiny_repository: Path,
    folder: Path,  # noqa: F811
    tmp_path: Path,
    route: list[str],
):
    masks = {}
    for backend in ("onnxruntime", "openvino"):
        out = tmp_path / backend
        args = [str(folder), *route, *SMALL_TILES, "--backend", backend]
        assert main(["predict", *args, "--out", str(out), "--models", str(tiny_repository)]) == 0
        masks[backend] = outputs(out)
    assert len(masks["openvino"]) == 7  # 4 images, one tiled, and a 3-page stack
    assert masks["openvino"].keys() == masks["onnxruntime"].keys()
    for name, mask in masks["openvino"].items():
        reference = masks["onnxruntime"][name]
        assert mask.shape == reference.shape and 0 < (reference > 0).mean() < 1
        assert (mask == reference).mean() >= 0.99, name


@pytest.mark.skipif(not bf16_runs(), reason="OpenVINO does not compute in bf16 here")
def test_openvino_routes_to_the_bf16_entries(
    tiny_bf16_repository: Path,
    folder: Path,  # noqa: F811
    tmp_path: Path,
    capsys,
):
    image = str(folder / "a0.png")
    out = tmp_path / "bf16"
    args = [image, "--precision", "bf16", "--format", "json", "--models", str(tiny_bf16_repository)]
    assert main(["predict", *args, "--out", str(out), "--backend", "openvino"]) == 0
    graph = json.loads((out / "a0.json").read_text())["graph"]
    assert graph["precision"] == "bf16" and graph["name"] == f"L{graph['level']}.bf16"
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert main(["predict", *args, "--out", str(refused), "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["unetpp predict: error: no bf16 graph in this model repository"]
    assert not np.any([p.is_file() for p in refused.rglob("*")])
