from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest

from tests.helpers import one_torch_thread, tiny_samples
from unetpp.cli import build_parser, main
from unetpp.core.manifest import load_repository
from unetpp.export.graphs import check_graph
from unetpp.export.repository import ExportOptions, export_repository, options_from


@pytest.fixture(scope="module")
def full_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`unetpp export` with int8 (default) and fp16, as a user runs it."""
    out = tmp_path_factory.mktemp("cli") / "models"
    argv = ["export", str(tiny_checkpoint), "--out", str(out), "--val-data", "synthetic"]
    with one_torch_thread():
        assert main([*argv, "--calib-images", "4", "--fp16", "--ensemble", "never"]) == 0
    return out


def test_int8_variants_are_measured_or_left_out(full_repository: Path) -> None:
    manifest = load_repository(full_repository)
    int8 = manifest.extra["int8"]
    assert int8["enabled"] and int8["margin_iou"] == 0.01 and int8["calibration_images"] == 4
    rejected = {r["name"]: r for r in int8["rejected"]}
    kept = [g for g in manifest.graphs if g.precision == "int8"]
    assert kept, "no int8 variant kept its accuracy"
    assert {g.name for g in kept} | set(rejected) == {f"L{k}.int8" for k in range(1, 5)}
    for graph in kept:
        fp32 = manifest.graph(graph.name.removesuffix(".int8"))
        assert graph.accuracy is not None and fp32.accuracy is not None
        assert graph.accuracy.data == "synthetic:val" and graph.accuracy.images == 4
        assert fp32.accuracy.iou - graph.accuracy.iou <= 0.01
        assert graph.parameters == fp32.parameters and graph.level == fp32.level
        ops = {n.op_type for n in check_graph(full_repository / graph.file).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    for name, r in rejected.items():
        assert r["fp32_iou"] - r["iou"] > 0.01
        assert not (full_repository / f"{name}.onnx").exists()


def test_fp16_variants_are_written_and_marked_unvalidated_without_a_gpu(
    full_repository: Path,
) -> None:
    manifest = load_repository(full_repository)
    fp16 = [g for g in manifest.graphs if g.precision == "fp16"]
    assert [g.name for g in fp16] == [f"L{k}.fp16" for k in range(1, 5)]
    for graph in fp16:
        assert not graph.validated and "GPU" in graph.note and graph.accuracy is None
        model = check_graph(full_repository / graph.file)
        weights = {t.data_type for t in model.graph.initializer if len(t.dims) == 4}
        assert weights == {onnx.TensorProto.FLOAT16}
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_a_variant_losing_more_than_the_margin_is_left_out(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # a negative margin: every variant "loses too much", so every one must be left out
    options = ExportOptions(int8_margin=-1.0, bf16=False, ensemble="never", latency_sizes=(64,))
    manifest = export_repository(
        tiny_checkpoint,
        tmp_path / "models",
        val_samples=tiny_samples("val", count=2),
        val_data="synthetic:val",
        calibration_samples=tiny_samples("train", count=2),
        options=options,
    )
    assert [g.name for g in manifest.graphs] == ["L1", "L2", "L3", "L4"]
    assert [r["name"] for r in manifest.extra["int8"]["rejected"]] == [
        f"L{k}.int8" for k in range(1, 5)
    ]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "L1.onnx",
        "L2.onnx",
        "L3.onnx",
        "L4.onnx",
        "model.json",
        *(f"stage{k}.onnx" for k in range(1, 5)),
    ]


def test_user_mistakes_are_one_line_errors(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models"
    argv = ["export", str(tiny_checkpoint), "--out", str(out), "--val-data", "synthetic"]
    cases = [
        ([*argv, "--no-int8", "--opset", "17"], "opset must be >= 18"),
        (["export", str(tmp_path / "none.pt"), "--out", str(out)], "no such checkpoint"),
        ([*argv[:4], "--val-data", str(tmp_path / "nodata")], "nodata"),
        (["evaluate", str(tmp_path), "--data", "synthetic"], "no manifest"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_int8_margin_is_a_fraction_of_iou(capsys) -> None:
    # the unit of the manifest's margin_iou and of ExportOptions: 1 would keep every variant
    with pytest.raises(SystemExit):
        main(["export", "best.pt", "--out", "models", "--int8-margin", "1"])
    assert (
        "--int8-margin: a fraction in [0, 1) (0.01 is one point), got 1" in capsys.readouterr().err
    )


def test_export_help_shows_the_export_options_defaults(capsys, monkeypatch) -> None:
    """argparse holds no second copy of ExportOptions' defaults: the help shows them, and a
    command line without the flags makes the default options."""
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    defaults = ExportOptions()
    for flag, value in (
        ("--int8-margin", defaults.int8_margin),
        ("--opset", defaults.opset),
        ("--ensemble", defaults.ensemble),
        ("--threshold", defaults.threshold),
        ("--latency-size", ",".join(map(str, defaults.latency_sizes))),
        ("--name", defaults.name),
    ):
        assert re.search(rf"{flag} \S+ .*?\(default {re.escape(str(value))}\)", shown), flag
    argv = ["export", "best.pt", "--out", "models"]
    assert options_from(build_parser().parse_args(argv)) == defaults
    given = ["--opset", "19", "--latency-size", "64", "--latency-size", "128", "--no-bf16"]
    assert options_from(build_parser().parse_args([*argv, *given])) == ExportOptions(
        opset=19, latency_sizes=(64, 128), bf16=False
    )
