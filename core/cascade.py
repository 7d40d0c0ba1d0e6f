"""The adaptive cascade: each image, and each tile of a tiled image, runs only as deep as it
needs, and pays for every node once.

UNet++'s L_k is a subset of L_(k+1): L_(k+1) adds the nodes X(i, j) with i + j = k + 1 and
head_(k+1). The export writes one *stage* graph per level (`Stage` in the manifest): stage 1
takes the image and returns head_1 and L1's nodes; stage k takes L_(k-1)'s node tensors and
returns head_k and the nodes it adds. Running a window through stages 1..k computes exactly
L_k's nodes, once; its head_k equals the standalone L_k graph's output (export checks it).

The decision to go on comes from the shallow output itself: the share of the window's pixels
whose probability lies within `band` of the threshold. A window leaves stage k when that share
is at most `thresholds[k-1]`; the thresholds for each target (the IoU the cascade may lose
against the deepest stage) are calibrated at export (export/cascade.py) and recorded in the
manifest with the figures they reached. Windows are those of core/tiling.py: the whole image
up to `tile_above_pixels`, else overlapping tiles, each decided on its own.

The same stages run to the end give all four heads from one pass of the network: the heads'
disagreement per pixel (`disagreement`) and a per-image quality score (`agreement`, the Dice
between the L3 and L4 masks). Torch-free: numpy and a backend (core/backends.py), onnxruntime
by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from unetpp.core import tiling
from unetpp.core.backends import Backend, OnnxRuntime, Session
from unetpp.core.errors import InvalidInput
from unetpp.core.inference import INPUT_NAME
from unetpp.core.manifest import CascadeRecord, CascadeTarget, Manifest
from unetpp.core.routing import Candidate


def node_name(i: int, j: int) -> str:
    return f"x_{i}_{j}"


def level_nodes(level: int) -> list[str]:
    """The node tensors of L_level, X(i, j) with i + j <= level, in the order stages pass them."""
    return [node_name(i, k - i) for k in range(level + 1) for i in range(k, -1, -1)]


def head_name(level: int) -> str:
    return f"head_{level}"


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def uncertain_share(logits: np.ndarray, threshold: float, band: float) -> float:
    """Share of pixels of a binary [1, H, W] (or [H, W]) logit map whose probability lies
    within `band` of `threshold`."""
    lo = _logit(max(threshold - band, 1e-6))
    hi = _logit(min(threshold + band, 1.0 - 1e-6))
    return float(np.mean((logits > lo) & (logits < hi)))


def agreement(shallow: np.ndarray, deep: np.ndarray, threshold: float) -> float:
    """Dice between two heads' masks (1.0 when both are empty): the per-image quality score."""
    cut = _logit(threshold)
    a, b = shallow > cut, deep > cut
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


QUALITY_MIN_SPEARMAN = 0.3


def quality_ships(record: CascadeRecord) -> bool:
    """Whether the quality score is given out: only where the export measured that it ranks
    images by their real IoU (Spearman >= QUALITY_MIN_SPEARMAN on every data measured)."""
    values = list(record.quality.get("spearman", {}).values())
    return bool(values) and min(values) >= QUALITY_MIN_SPEARMAN


def disagreement(heads: Sequence[np.ndarray]) -> np.ndarray:
    """Per pixel, the spread (max - min) of the heads' probabilities, in [0, 1]."""
    p = 1.0 / (1.0 + np.exp(-np.stack([h[0] for h in heads]).astype(np.float32)))
    return p.max(axis=0) - p.min(axis=0)


def disagreement_u16(heads: Sequence[np.ndarray]) -> np.ndarray:
    """`disagreement` as a 16-bit image: 0 = all heads agree, 65535 = one says 0, another 1."""
    return np.round(disagreement(heads) * 65535.0).astype(np.uint16)


def candidates(record: CascadeRecord, deepest_ms: float) -> list[Candidate]:
    """The router's `adaptive@<target>` candidates: the measured IoU, and the latency the
    deepest fp32 graph is predicted to take for this request (`deepest_ms`) times the ratio
    measured at calibration."""
    return [
        Candidate(
            f"adaptive@{t.max_loss:g}",
            len(record.stages),
            "fp32",
            "adaptive",
            t.iou,
            deepest_ms * t.latency_ms / t.deepest_ms,
            target=t.max_loss,
        )
        for t in record.targets
    ]


@dataclass(frozen=True)
class Window:
    """How one window of an image ran: its origin in the padded image and the deepest level."""

    y: int
    x: int
    level: int
    shares: tuple[float, ...]  # the uncertain share after each level it ran


@dataclass(frozen=True)
class CascadeResult:
    logits: np.ndarray  # 1 x H x W, the padded image's
    windows: tuple[Window, ...]
    deepest: int

    @property
    def level(self) -> int:
        """The deepest level any window reached."""
        return max(w.level for w in self.windows)

    def reached(self) -> tuple[float, ...]:
        """Share of windows that ran L1, L2, ..., the deepest level."""
        n = len(self.windows)
        return tuple(
            sum(w.level >= k for w in self.windows) / n for k in range(1, self.deepest + 1)
        )


def for_stages(backend: Backend) -> Backend:
    """The backend as the stages need it. onnxruntime: its threads sleep at once after a stage
    (stages run one after another: measured 1.36x -> 0.94x L4's time, all the way through), and
    its arena keeps its memory between stages (the server's shrinkage after each run measured
    1.45x the cascade's time on HeLa at 256 x 256)."""
    if isinstance(backend, OnnxRuntime):
        return replace(backend, spinning=False, run_options=None)
    return backend


class Cascade:
    """The stage graphs of a model repository, opened as sessions of a backend (onnxruntime's
    CPU by default)."""

    def __init__(
        self,
        directory: str | Path,
        record: CascadeRecord,
        threshold: float,
        *,
        tile_above_pixels: int = tiling.TILE_ABOVE_PIXELS,
        tile: int = tiling.TILE_SIZE,
        overlap: int = tiling.TILE_OVERLAP,
        threads: int | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.record = record
        self.threshold = threshold
        self.tile_above_pixels, self.tile, self.overlap = tile_above_pixels, tile, overlap
        stages = for_stages(backend or OnnxRuntime())
        self.sessions: list[Session] = [
            stages.open(Path(directory) / s.file, threads) for s in record.stages
        ]

    @classmethod
    def open(cls, directory: str | Path, manifest: Manifest, **options) -> Cascade:
        if manifest.cascade is None:
            raise InvalidInput(
                "this model repository has no adaptive cascade; export it again with this "
                "version of unetpp"
            )
        if manifest.num_classes != 1:
            raise InvalidInput("the adaptive cascade serves binary models only")
        return cls(directory, manifest.cascade, manifest.threshold, **options)

    @property
    def deepest(self) -> int:
        return len(self.sessions)

    def target(self, max_loss: float | None = None) -> CascadeTarget:
        """The calibration for `max_loss` (default: the middle one); InvalidInput otherwise."""
        targets = sorted(self.record.targets, key=lambda t: t.max_loss)
        if not targets:
            raise InvalidInput("the adaptive cascade has no calibrated target")
        if max_loss is None:
            return targets[len(targets) // 2]
        for t in targets:
            if abs(t.max_loss - max_loss) < 1e-9:
                return t
        known = ", ".join(f"{t.max_loss:g}" for t in targets)
        raise InvalidInput(f"target={max_loss:g} is not calibrated; choose one of {known}")

    def step(self, level: int, feats: dict[str, np.ndarray]) -> np.ndarray:
        """Run stage `level` on `feats` (updated in place with its outputs); its head's logits
        [N, 1, H, W]."""
        stage = self.record.stages[level - 1]
        outputs = self.sessions[level - 1].run_named(
            {n: feats[n] for n in stage.inputs}, stage.outputs
        )
        feats.update(zip(stage.outputs, outputs, strict=True))
        return feats[head_name(level)]

    def run_window(
        self, x: np.ndarray, thresholds: Sequence[float]
    ) -> tuple[np.ndarray, int, tuple[float, ...]]:
        """C x h x w -> (1 x h x w logits of the level it stopped at, that level, the uncertain
        share after each level run)."""
        feats = first_input(x)
        shares: list[float] = []
        for level in range(1, self.deepest + 1):
            logits = self.step(level, feats)[0]
            if level == self.deepest:
                break
            shares.append(uncertain_share(logits, self.threshold, self.record.band))
            if shares[-1] <= thresholds[level - 1]:
                break
        return logits, level, tuple(shares)

    def heads(self, x: np.ndarray) -> list[np.ndarray]:
        """C x h x w -> every head's 1 x h x w logits, from one pass of the whole network."""
        feats = first_input(x)
        return [self.step(level, feats)[0] for level in range(1, self.deepest + 1)]

    def infer(self, x: np.ndarray, thresholds: Sequence[float]) -> CascadeResult:
        """The padded C x H x W input -> the cascade's logits, window by window (each tile of
        a tiled image decided on its own)."""
        windows: list[Window] = []

        def run(origin: tuple[int, int], window: np.ndarray) -> np.ndarray:
            logits, level, shares = self.run_window(window, thresholds)
            windows.append(Window(*origin, level, shares))
            return logits

        logits = self.over_windows(x, run)
        return CascadeResult(logits, tuple(windows), self.deepest)

    def infer_heads(self, x: np.ndarray) -> list[np.ndarray]:
        """The padded C x H x W input -> every head's 1 x H x W logits, one pass of the network
        per window."""
        per_window: list[list[np.ndarray]] = []

        def run(origin: tuple[int, int], window: np.ndarray) -> np.ndarray:
            per_window.append(self.heads(window))
            return np.concatenate(per_window[-1])  # the heads as channels, blended together

        stacked = self.over_windows(x, run)
        return [stacked[k : k + 1] for k in range(self.deepest)]

    def over_windows(
        self, x: np.ndarray, run: Callable[[tuple[int, int], np.ndarray], np.ndarray]
    ) -> np.ndarray:
        """`run(origin, window)` over the whole image, or over its tiles blended together."""
        h, w = x.shape[-2:]
        if h * w <= self.tile_above_pixels:
            return run((0, 0), x)
        blend = tiling.Blend(h, w, self.tile, self.overlap)
        for i, j in blend.windows:
            blend.add((i, j), run((blend.ys[i], blend.xs[j]), blend.crop(x, (i, j))))
        return blend.result()


def first_input(x: np.ndarray) -> dict[str, np.ndarray]:
    """The first stage's input: C x h x w as a batch of one."""
    return {INPUT_NAME: np.ascontiguousarray(x[None], dtype=np.float32)}
