"""The adaptive cascade at export: stage graphs, checked against the level graphs, and the
thresholds calibrated on the validation split for each target (core/cascade.py runs them).

Calibration runs every validation window through all stages once, recording each head's
logits, each stage's time and each level's uncertain share. A setting of the thresholds then
decides each window's depth, and so the cascade's IoU, without running anything again (an
escalated window's output is the deeper stage's own). For each target the search keeps the
settings whose IoU is within the target of the deepest stage's, and takes the one with the
least time (the windows' measured stage times summed up to their depth). Then the cascade runs
for real with those thresholds, interleaved with the deepest graph alone on the same images,
and the manifest records what was measured.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from unetpp.core.backends import OnnxRuntime
from unetpp.core.cascade import (
    Cascade,
    agreement,
    first_input,
    head_name,
    level_nodes,
    uncertain_share,
)
from unetpp.core.datasets import Sample
from unetpp.core.errors import ExportError
from unetpp.core.inference import INPUT_NAME, create_session, network_input, run_batch
from unetpp.core.manifest import CascadeRecord, CascadeTarget, Stage, sha256_file
from unetpp.core.preprocess import Preprocessing, crop_to
from unetpp.export.graphs import LOGITS_TOLERANCE, export_graph
from unetpp.model.unetpp import UNetPlusPlus

log = logging.getLogger(__name__)

TARGETS = (0.002, 0.005, 0.01)  # IoU the cascade may lose against the deepest stage
BAND = 0.3  # a pixel is uncertain when its probability is within 0.3 of the threshold
QUANTILES = 12  # candidate thresholds per level: quantiles of the windows' uncertain shares


class StageModule(nn.Module):
    """Stage `level` of `net` (all heads built): L_(level-1)'s node tensors (or the image) in;
    head_level's logits and, unless `last`, the nodes L_level adds, out."""

    def __init__(self, net: UNetPlusPlus, level: int, last: bool) -> None:
        super().__init__()
        self.net, self.level = net, level
        self.inputs = (INPUT_NAME,) if level == 1 else tuple(level_nodes(level - 1))
        new = level_nodes(level)[len(level_nodes(level - 1)) if level > 1 else 0 :]
        self.outputs = (head_name(level),) + (() if last else tuple(new))

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        if self.level == 1:
            feats = self.net.encode(tensors[0], 0)
        else:
            feats = {_key(n): t for n, t in zip(self.inputs, tensors, strict=True)}
        self.net.grow(feats, self.level)
        head = self.net.heads[head_name(self.level)](feats[(0, self.level)])
        return (head, *(feats[_key(n)] for n in self.outputs[1:]))


def _key(name: str) -> tuple[int, int]:
    _, i, j = name.split("_")
    return int(i), int(j)


def cascade_supported(model: nn.Module, num_classes: int) -> str:
    """Why the model cannot have a cascade ("" when it can)."""
    if not isinstance(model, UNetPlusPlus) or model.depth < 2:
        return "not a UNet++ with several levels"
    if sorted(model.heads) != [head_name(k) for k in range(1, model.depth + 1)]:
        return "the model lacks some of the heads (trained without deep supervision)"
    if num_classes != 1:
        return "the cascade serves binary models only"
    return ""


def export_stages(
    net: UNetPlusPlus, directory: Path, in_channels: int, opset: int
) -> tuple[Stage, ...]:
    """Write stage1.onnx .. stage{depth}.onnx and check them with onnx.checker."""
    net = net.eval()
    stages = []
    with torch.no_grad():
        feats = net.encode(torch.zeros(1, in_channels, 64, 64), 0)
        for level in range(1, net.depth + 1):
            module = StageModule(net, level, last=level == net.depth)
            example = {n: feats[_key(n)] for n in module.inputs if n != INPUT_NAME}
            inputs = example or {INPUT_NAME: torch.zeros(1, in_channels, 64, 64)}
            path = directory / f"stage{level}.onnx"
            export_graph(
                module, path, in_channels=in_channels, outputs=module.outputs,
                opset=opset, inputs=inputs,
            )  # fmt: skip
            try:
                onnx.checker.check_model(str(path), full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
                raise ExportError(f"{path.name}: invalid ONNX graph ({exc})") from exc
            net.grow(feats, level)
            stages.append(
                Stage(
                    f"stage{level}",
                    path.name,
                    sha256_file(path),
                    level,
                    module.inputs,
                    module.outputs,
                )
            )
    return tuple(stages)


def check_stages(cascade: Cascade, directory: Path, inputs: Sequence[np.ndarray]) -> float:
    """The stages' heads, from one pass, against the standalone L1..L4 graphs on `inputs` (C x
    H x W): within LOGITS_TOLERANCE, else ExportError. Returns the largest difference."""
    levels = [
        create_session(directory / f"L{k}.onnx", memory_arena=False)
        for k in range(1, cascade.deepest + 1)
    ]
    worst = 0.0
    for x in inputs:
        for level, (head, session) in enumerate(zip(cascade.heads(x), levels, strict=True), 1):
            diff = float(np.abs(head - run_batch(session, x[None])[0]).max())
            worst = max(worst, diff)
            if diff > LOGITS_TOLERANCE:
                raise ExportError(
                    f"stage{level}: head_{level} differs from L{level}.onnx on input {x.shape} "
                    f"by {diff:.2e} (limit {LOGITS_TOLERANCE:.0e})"
                )
    return worst


@dataclass
class _Window:
    """One validation window after a full pass: each head's logits, stage times, shares."""

    heads: list[np.ndarray]
    ms: list[float]
    shares: list[float]


@dataclass
class _Image:
    sample: Sample
    size: tuple[int, int]
    windows: list[_Window] = field(default_factory=list)
    cache: dict[tuple[int, ...], tuple[int, int]] = field(default_factory=dict)


def _full_pass(cascade: Cascade, x: np.ndarray, image: _Image) -> None:
    def run(origin: tuple[int, int], window: np.ndarray) -> np.ndarray:
        feats = first_input(window)
        record = _Window([], [], [])
        for level in range(1, cascade.deepest + 1):
            start = time.perf_counter()
            head = cascade.step(level, feats)[0]
            record.ms.append(1000.0 * (time.perf_counter() - start))
            record.heads.append(head)
            record.shares.append(uncertain_share(head, cascade.threshold, cascade.record.band))
        image.windows.append(record)
        return head

    cascade.over_windows(x, run)


def _counts(
    cascade: Cascade, x: np.ndarray, image: _Image, depths: tuple[int, ...]
) -> tuple[int, int]:
    """Intersection and union of the image's mask with its windows at `depths`."""
    if depths not in image.cache:
        chosen = iter([w.heads[d - 1] for w, d in zip(image.windows, depths, strict=True)])
        logits = crop_to(cascade.over_windows(x, lambda origin, window: next(chosen)), image.size)
        mask = logits[0] > _cut(cascade.threshold)
        truth = image.sample.mask.astype(bool)
        image.cache[depths] = (int((mask & truth).sum()), int((mask | truth).sum()))
    return image.cache[depths]


def _cut(threshold: float) -> float:
    return float(np.log(threshold / (1.0 - threshold)))


def _depth(shares: Sequence[float], thresholds: Sequence[float], deepest: int) -> int:
    for level, (share, limit) in enumerate(zip(shares, thresholds, strict=False), 1):
        if share <= limit:
            return level
    return deepest


def calibrate(
    cascade: Cascade,
    samples: Sequence[Sample],
    preprocessing: Preprocessing,
    *,
    targets: Sequence[float] = TARGETS,
    data: str = "",
    deepest_file: Path,
) -> tuple[tuple[CascadeTarget, ...], dict[str, Any]]:
    """The thresholds for each target (see the module docstring) and the quality score's rank
    correlation with the per-image IoU on `samples`."""
    inputs = [network_input(s.image, preprocessing) for s in samples]
    images = [_Image(s, size) for s, (_, size) in zip(samples, inputs, strict=True)]
    for (x, _), image in zip(inputs, images, strict=True):
        _full_pass(cascade, x, image)
    deepest = cascade.deepest
    windows = [w for image in images for w in image.windows]
    grid = [
        sorted({-1.0, *np.quantile([w.shares[k] for w in windows], np.linspace(0, 1, QUANTILES))})
        for k in range(deepest - 1)
    ]

    def evaluate(thresholds: Sequence[float]) -> tuple[float, float]:
        inter = union = 0
        ms = 0.0
        for (x, _), image in zip(inputs, images, strict=True):
            depths = tuple(_depth(w.shares, thresholds, deepest) for w in image.windows)
            i, u = _counts(cascade, x, image, depths)
            inter, union = inter + i, union + u
            ms += sum(sum(w.ms[:d]) for w, d in zip(image.windows, depths, strict=True))
        return (inter / union if union else 1.0), ms

    settings = {t: evaluate(t) for t in itertools.product(*grid)}
    full_iou = evaluate([-1.0] * (deepest - 1))[0]
    session = create_session(deepest_file, memory_arena=False)
    chosen = []
    for target in sorted(targets):
        ok = [t for t, (iou, _) in settings.items() if iou >= full_iou - target - 1e-12]
        best = min(ok, key=lambda t: (settings[t][1], -settings[t][0]))
        chosen.append(_measure(cascade, session, inputs, samples, target, best, data))
        log.info("cascade target %g: %s", target, chosen[-1])
    return tuple(chosen), _quality(cascade, images, data)


def _measure(
    cascade: Cascade,
    deepest: ort.InferenceSession,
    inputs: Sequence[tuple[np.ndarray, tuple[int, int]]],
    samples: Sequence[Sample],
    target: float,
    thresholds: Sequence[float],
    data: str,
) -> CascadeTarget:
    """The cascade with `thresholds` and the deepest graph alone, interleaved, image by image."""
    scores = {"cascade": [0, 0], "deepest": [0, 0]}
    seconds = {"cascade": 0.0, "deepest": 0.0}
    reached = np.zeros(cascade.deepest)
    windows = 0
    for (x, size), sample in zip(inputs, samples, strict=True):
        start = time.perf_counter()
        result = cascade.infer(x, thresholds)
        seconds["cascade"] += time.perf_counter() - start
        start = time.perf_counter()
        alone = cascade.over_windows(x, lambda origin, window: run_batch(deepest, window[None])[0])
        seconds["deepest"] += time.perf_counter() - start
        reached += np.array(result.reached()) * len(result.windows)
        windows += len(result.windows)
        truth = sample.mask.astype(bool)
        for name, logits in (("cascade", result.logits), ("deepest", alone)):
            mask = crop_to(logits, size)[0] > _cut(cascade.threshold)
            scores[name][0] += int((mask & truth).sum())
            scores[name][1] += int((mask | truth).sum())
    iou = {k: (i / u if u else 1.0) for k, (i, u) in scores.items()}
    n = len(samples)
    return CascadeTarget(
        max_loss=target,
        thresholds=tuple(float(t) for t in thresholds),
        iou=round(iou["cascade"], 6),
        deepest_iou=round(iou["deepest"], 6),
        latency_ms=round(1000.0 * seconds["cascade"] / n, 3),
        deepest_ms=round(1000.0 * seconds["deepest"] / n, 3),
        reached=tuple(round(float(r), 4) for r in reached / windows),
        images=n,
        data=data,
    )


def _quality(cascade: Cascade, images: Sequence[_Image], data: str) -> dict[str, Any]:
    """The quality score (Dice between the L3 and L4 masks of the full pass) against the
    per-image IoU of the deepest head: Spearman's rank correlation."""
    deepest = cascade.deepest
    scores, ious = [], []
    for image in images:
        full = tuple([deepest] * len(image.windows))
        inter, union = image.cache.get(full) or (0, 0)
        ious.append(inter / union if union else 1.0)
        scores.append(
            float(
                np.mean(
                    [
                        agreement(w.heads[deepest - 2], w.heads[deepest - 1], cascade.threshold)
                        for w in image.windows
                    ]
                )
            )
        )
    return {
        "score": f"Dice between the L{deepest - 1} and L{deepest} masks",
        "spearman": {data: round(spearman(scores, ious), 4)},
        "images": len(images),
    }


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); 0.0 when either side is constant."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for v in np.unique(values):  # ties share their average rank
        tied = values == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def export_cascade(
    net: UNetPlusPlus,
    directory: Path,
    *,
    in_channels: int,
    opset: int,
    threshold: float,
    parity_inputs: Sequence[np.ndarray],
    samples: Sequence[Sample],
    preprocessing: Preprocessing,
    data: str,
    targets: Sequence[float] = TARGETS,
) -> tuple[CascadeRecord, float]:
    """Stage graphs written to `directory` (next to L1..L4.onnx), checked and calibrated; the
    record and the largest head difference against the level graphs."""
    stages = export_stages(net, directory, in_channels, opset)
    # no arenas: eight sessions each keeping its largest run's memory took 9 GB on HeLa frames
    cascade = Cascade(
        directory,
        CascadeRecord(stages, BAND, ()),
        threshold,
        backend=OnnxRuntime(memory_arena=False),
    )
    worst = check_stages(cascade, directory, parity_inputs)
    chosen, quality = calibrate(
        cascade, samples, preprocessing, targets=targets, data=data,
        deepest_file=directory / f"L{net.depth}.onnx",
    )  # fmt: skip
    return CascadeRecord(stages, BAND, chosen, quality), worst
