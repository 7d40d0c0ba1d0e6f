"""The adaptive cascade on the real tiny repository: stage graphs, calibration, the runner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import tiny_samples
from unetpp.core import tiling
from unetpp.core.cascade import Cascade, agreement, candidates, disagreement_u16, level_nodes
from unetpp.core.errors import InvalidInput, ModelRepositoryError
from unetpp.core.inference import create_session, network_input, run_batch
from unetpp.core.manifest import load_repository, read_manifest
from unetpp.core.routing import Choice, choose
from unetpp.export.cascade import spearman
from unetpp.export.graphs import LOGITS_TOLERANCE


@pytest.fixture(scope="module")
def cascade(tiny_repository: Path) -> Cascade:
    return Cascade.open(tiny_repository, load_repository(tiny_repository))


def levels(repo: Path) -> list:
    return [create_session(repo / f"L{k}.onnx") for k in range(1, 5)]


def test_stages_pass_each_node_on_once(tiny_repository: Path) -> None:
    record = load_repository(tiny_repository).cascade
    assert record is not None and [s.level for s in record.stages] == [1, 2, 3, 4]
    assert record.stages[0].inputs == ("image",)
    assert record.stages[0].outputs == ("head_1", "x_0_0", "x_1_0", "x_0_1")
    for stage in record.stages[1:]:
        k = stage.level
        assert stage.inputs == tuple(level_nodes(k - 1))  # all of L_(k-1)'s nodes, nothing else
        new = set(stage.outputs[1:])
        assert new.isdisjoint(stage.inputs)
        if k < 4:
            assert new == {f"x_{i}_{k - i}" for i in range(k + 1)}
    assert record.stages[-1].outputs == ("head_4",)  # the deepest passes nothing on


def test_the_heads_of_one_pass_equal_the_four_single_graphs(
    tiny_repository: Path, cascade: Cascade
) -> None:
    manifest = load_repository(tiny_repository)
    singles = levels(tiny_repository)
    for sample in tiny_samples("test", count=2):
        x, _ = network_input(sample.image, manifest.preprocessing)
        for head, session in zip(cascade.heads(x), singles, strict=True):
            assert np.abs(head - run_batch(session, x[None])[0]).max() <= LOGITS_TOLERANCE


def test_calibrated_targets_and_measured_figures_are_in_the_manifest(
    tiny_repository: Path,
) -> None:
    manifest = load_repository(tiny_repository)
    record = manifest.cascade
    assert record is not None and manifest.extra["cascade"]["offered"] is True
    assert [t.max_loss for t in record.targets] == [0.002, 0.005, 0.01]
    deepest = manifest.graph("L4").accuracy
    for t in record.targets:
        assert len(t.thresholds) == 3 and (t.images, t.data) == (4, "synthetic:val")
        # the measured run loses no more than its target against the deepest graph
        assert t.deepest_iou == pytest.approx(deepest.iou, abs=1e-6)
        assert t.deepest_iou - t.iou <= t.max_loss + 1e-6
        assert t.latency_ms > 0 and t.deepest_ms > 0
        assert t.reached[0] == 1.0 and list(t.reached) == sorted(t.reached, reverse=True)
    # a looser target never needs more depth
    reached = [sum(t.reached) for t in record.targets]
    assert reached == sorted(reached, reverse=True)
    assert set(record.quality["spearman"]) == {"synthetic:val"}


def test_a_tampered_stage_is_refused_and_a_manifest_without_cascade_is_valid(
    tiny_repository: Path, tmp_path: Path
) -> None:
    repo = shutil.copytree(tiny_repository, tmp_path / "models")
    data = json.loads((repo / "model.json").read_text())
    del data["cascade"]
    (repo / "model.json").write_text(json.dumps(data))
    assert load_repository(repo).cascade is None
    with pytest.raises(InvalidInput, match="no adaptive cascade"):
        Cascade.open(repo, read_manifest(repo))
    shutil.copy(tiny_repository / "model.json", repo / "model.json")
    with open(repo / "stage3.onnx", "ab") as fp:
        fp.write(b"\0")
    with pytest.raises(ModelRepositoryError, match="stage3"):
        load_repository(repo)


def test_an_uncertain_image_escalates_and_a_confident_one_stays_shallow(
    tiny_repository: Path, cascade: Cascade
) -> None:
    prep = load_repository(tiny_repository).preprocessing
    samples = tiny_samples("test", count=4)
    inputs = [network_input(s.image, prep)[0] for s in samples]
    shares = [cascade.run_window(x, [-1.0] * 3)[2][0] for x in inputs]
    easy, hard = int(np.argmin(shares)), int(np.argmax(shares))
    assert shares[easy] < shares[hard]
    thresholds = [(shares[easy] + shares[hard]) / 2, -1.0, -1.0]
    singles = levels(tiny_repository)
    for index, level in ((easy, 1), (hard, 4)):
        logits, reached, _ = cascade.run_window(inputs[index], thresholds)
        assert reached == level
        own = run_batch(singles[level - 1], inputs[index][None])[0]
        assert np.abs(logits - own).max() <= LOGITS_TOLERANCE


def test_each_tile_goes_only_as_deep_as_it_needs(tiny_repository: Path) -> None:
    """A tiled image: every window decided on its own; escalated windows carry the deeper
    graph's own output there, shallow ones the shallow graph's."""
    manifest = load_repository(tiny_repository)
    tiled = Cascade.open(tiny_repository, manifest, tile_above_pixels=0, tile=64, overlap=16)
    sample = tiny_samples("test", count=1)[0]
    image = np.concatenate([sample.image, np.full_like(sample.image, sample.image.min())], 1)
    x, _ = network_input(image, manifest.preprocessing)
    probe = tiled.infer(x, [-1.0] * 3)
    first = sorted(w.shares[0] for w in probe.windows)
    assert first[0] < first[-1]
    cut = float(np.median(first))
    result = tiled.infer(x, [cut, -1.0, -1.0])
    depths = [w.level for w in result.windows]
    assert set(depths) == {1, 4}
    assert result.reached() == (1.0, *[sum(d == 4 for d in depths) / len(depths)] * 3)
    singles = levels(tiny_repository)
    blend = tiling.Blend(*x.shape[-2:], 64, 16)
    assert [(blend.ys[i], blend.xs[j]) for i, j in blend.windows] == [
        (w.y, w.x) for w in result.windows
    ]
    for (i, j), w in zip(blend.windows, result.windows, strict=True):
        own = run_batch(singles[w.level - 1], blend.crop(x, (i, j))[None])[0]
        blend.add((i, j), own)
    assert np.abs(result.logits - blend.result()).max() <= LOGITS_TOLERANCE


def test_bad_targets_are_invalid_input(cascade: Cascade) -> None:
    assert cascade.target().max_loss == 0.005
    assert cascade.target(0.01).max_loss == 0.01
    with pytest.raises(InvalidInput, match=r"0\.002, 0\.005, 0\.01"):
        cascade.target(0.003)


def test_uncertainty_map_and_quality_score(tiny_repository: Path, cascade: Cascade) -> None:
    prep = load_repository(tiny_repository).preprocessing
    x, _ = network_input(tiny_samples("val", count=1)[0].image, prep)
    heads = cascade.heads(x)
    spread = disagreement_u16(heads)
    assert spread.dtype == np.uint16 and spread.shape == x.shape[-2:]
    p = 1 / (1 + np.exp(-np.stack([h[0] for h in heads]).astype(np.float64)))
    assert np.abs(spread / 65535.0 - (p.max(0) - p.min(0))).max() <= 1e-4
    assert agreement(heads[3], heads[3], 0.5) == 1.0
    assert 0.0 <= agreement(heads[2], heads[3], 0.5) <= 1.0
    empty = np.full_like(heads[0], -5.0)
    assert agreement(empty, empty, 0.5) == 1.0 and agreement(empty, -empty, 0.5) == 0.0


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their average rank: ranks (0.5, 0.5, 2, 3) against (0, 1, 2, 3)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0


def test_the_router_weighs_each_target_as_a_candidate(tiny_repository: Path) -> None:
    manifest = load_repository(tiny_repository)
    record = manifest.cascade
    pool = candidates(record, deepest_ms=100.0)
    assert [c.name for c in pool] == ["adaptive@0.002", "adaptive@0.005", "adaptive@0.01"]
    for c, t in zip(pool, record.targets, strict=True):
        assert (c.iou, c.target, c.output) == (t.iou, t.max_loss, "adaptive")
        assert c.predicted_ms == pytest.approx(100.0 * t.latency_ms / t.deepest_ms)
    route = choose(pool, Choice(mode="adaptive", target=0.01), default_mode="balanced",
                   fast_tolerance=0.02)  # fmt: skip
    assert route.graph == "adaptive@0.01"
