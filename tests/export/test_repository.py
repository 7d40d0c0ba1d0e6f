from __future__ import annotations

from pathlib import Path

import onnx
from unetpp.core.manifest import load_repository
from unetpp.export.graphs import initializer_parameters
from unetpp.model.checkpoint import load_checkpoint
from unetpp.model.unetpp import count_parameters


def test_tiny_repository_has_every_level_and_the_ensemble(tiny_repository: Path) -> None:
    manifest = load_repository(tiny_repository)
    assert [g.name for g in manifest.graphs] == ["L1", "L2", "L3", "L4", "ensemble"]
    assert {g.file for g in manifest.graphs} == {f"L{k}.onnx" for k in range(1, 5)}
    ensemble = manifest.graph("ensemble")
    assert (ensemble.file, ensemble.output, ensemble.level) == ("L4.onnx", "ensemble", 4)
    for graph in manifest.graphs:
        assert graph.precision == "fp32" and graph.validated
        assert graph.accuracy is not None and graph.accuracy.images == 4
        assert 0.0 <= graph.accuracy.iou <= graph.accuracy.dice <= 1.0
        assert graph.latency_ms["256"] > 0


def test_parameters_are_those_of_the_pruned_level(
    tiny_repository: Path, tiny_checkpoint: Path
) -> None:
    model = load_checkpoint(tiny_checkpoint).build()
    manifest = load_repository(tiny_repository)
    for level in range(1, 5):
        graph = manifest.graph(f"L{level}")
        assert graph.parameters == count_parameters(model.prune(level))
    # L4.onnx also holds head_1..head_3 for its ensemble output, and nothing else
    with_heads = count_parameters(model.prune(4, keep_heads=True))
    assert manifest.graph("ensemble").parameters == with_heads
    stored = {
        k: initializer_parameters(onnx.load(str(tiny_repository / f"L{k}.onnx")))
        for k in range(1, 5)
    }
    expected = {k: count_parameters(model.prune(k)) for k in (1, 2, 3)} | {4: with_heads}
    assert stored == expected
