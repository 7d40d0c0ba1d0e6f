"""Running an exported graph with onnxruntime: sessions, whole-image inference, masks, scores.

Torch-free (onnxruntime and numpy only), so that `unetpp evaluate`, the export checks and the
server see a graph's output the same way. Needs onnxruntime (the `export`, `serve` or `gpu`
extra); nothing else in unetpp.core imports this module.

A graph takes `image` float32 [N, C, H, W] (H, W multiples of 16) and returns logits
[N, K, H, W] under the output name its manifest entry gives ("logits" or "ensemble").
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from unetpp.core.datasets import Sample
from unetpp.core.errors import InvalidInput, ModelRepositoryError
from unetpp.core.metrics import ScoreAccumulator
from unetpp.core.preprocess import Preprocessing, crop_to, pad_to_multiple

log = logging.getLogger(__name__)

INPUT_NAME = "image"


def create_session(
    path: str | Path,
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    memory_arena: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime session for one graph file (CPU unless `providers` says otherwise).

    `memory_arena=False` returns memory after each run instead of keeping onnxruntime's CPU
    arena at the largest batch ever seen (less memory for varied shapes, somewhat slower)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = memory_arena
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            str(path), options, providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
        raise ModelRepositoryError(f"{path}: onnxruntime cannot load it ({exc})") from exc


def logit_threshold(threshold: float) -> float:
    """The logit above which sigmoid(logit) > threshold (a probability in (0, 1))."""
    if not 0.0 < threshold < 1.0:
        raise InvalidInput(f"threshold must be a probability in (0, 1), got {threshold}")
    return math.log(threshold / (1.0 - threshold))


def to_mask(logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Logits -> boolean mask: sigmoid(logits) > threshold, computed on the logits."""
    return logits > logit_threshold(threshold)


def run_batch(
    session: ort.InferenceSession, batch: np.ndarray, output: str = "logits"
) -> np.ndarray:
    """[N, C, H, W] float32 (H, W multiples of 16) -> logits [N, K, H, W] from `output`."""
    return session.run([output], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def network_input(
    image: np.ndarray, preprocessing: Preprocessing
) -> tuple[np.ndarray, tuple[int, int]]:
    """A raw HxW[xC] image -> the padded float32 [C, H', W'] input and the original (H, W)."""
    return pad_to_multiple(preprocessing(image), preprocessing.multiple)


def predict_logits(
    session: ort.InferenceSession,
    image: np.ndarray,
    preprocessing: Preprocessing,
    output: str = "logits",
) -> np.ndarray:
    """A raw HxW[xC] image -> logits [K, H, W] at its own size (padded, run, cropped back)."""
    chw, size = network_input(image, preprocessing)
    return crop_to(run_batch(session, chw[None], output)[0], size)


@dataclass(frozen=True)
class Evaluation:
    """Set-level scores of one graph output and its mean inference time per image."""

    iou: float
    dice: float
    images: int
    ms_per_image: float


def evaluate_session(
    session: ort.InferenceSession,
    samples: Iterable[Sample],
    preprocessing: Preprocessing,
    threshold: float,
    output: str = "logits",
) -> Evaluation:
    """Micro-averaged IoU/Dice of the thresholded first class over whole images.

    Time is onnxruntime's alone (pre- and post-processing excluded), batch 1."""
    acc = ScoreAccumulator()
    seconds = 0.0
    for sample in samples:
        chw, size = network_input(sample.image, preprocessing)
        start = time.perf_counter()
        logits = run_batch(session, chw[None], output)
        seconds += time.perf_counter() - start
        acc.update(to_mask(crop_to(logits[0, 0], size), threshold), sample.mask)
    if acc.images == 0:
        raise InvalidInput("no images to evaluate on")
    return Evaluation(acc.iou, acc.dice, acc.images, 1000.0 * seconds / acc.images)


def measure_latency(
    session: ort.InferenceSession,
    size: int,
    channels: int,
    output: str = "logits",
    *,
    batch: int = 1,
    repeats: int = 10,
    warmup: int = 2,
) -> float:
    """Median milliseconds of one run on a random size x size input."""
    x = np.random.default_rng(0).random((batch, channels, size, size), dtype=np.float32)
    for _ in range(warmup):
        run_batch(session, x, output)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_batch(session, x, output)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))
