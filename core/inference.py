"""Running an exported graph with onnxruntime: sessions, whole-image inference, masks, scores.

Torch-free (onnxruntime, numpy and, for the object scores, scipy), so that `unetpp evaluate`,
the export checks and the server see a graph's output the same way. Needs onnxruntime (the
`export`, `serve` or `gpu` extra); in unetpp.core only the runtimes' modules import it (this
module, and core/backends.py through it). `evaluate_session` and `measure_latency` take a
`run` (a batch -> logits) so that any backend's session is measured the same way.

A graph takes `image` float32 [N, C, H, W] (H, W multiples of 16) and returns logits
[N, K, H, W] under the output name its manifest entry gives ("logits" or "ensemble").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from unetpp.core import instances
from unetpp.core.datasets import Sample
from unetpp.core.errors import InvalidInput, ModelRepositoryError
from unetpp.core.metrics import ObjectAccumulator
from unetpp.core.preprocess import Preprocessing, crop_to, network_input
from unetpp.core.task import Task

log = logging.getLogger(__name__)

INPUT_NAME = "image"


def create_session(
    path: str | Path,
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    memory_arena: bool = True,
    spinning: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime session for one graph file (CPU unless `providers` says otherwise).

    `memory_arena=False` returns memory after each run instead of keeping onnxruntime's CPU
    arena at the largest batch ever seen (less memory for varied shapes, somewhat slower).
    `spinning=False`: its threads sleep at once after a run instead of spinning for more work
    (for sessions that run one after another, like the cascade's stages, so that one's idle
    threads do not take the cores from the next)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = memory_arena
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            str(path), options, providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
        raise ModelRepositoryError(f"{path}: onnxruntime cannot load it ({exc})") from exc


def run_batch(
    session: ort.InferenceSession,
    batch: np.ndarray,
    output: str = "logits",
    options: ort.RunOptions | None = None,
) -> np.ndarray:
    """[N, C, H, W] float32 (H, W multiples of 16) -> logits [N, K, H, W] from `output`."""
    x = np.ascontiguousarray(batch, dtype=np.float32)
    return session.run([output], {INPUT_NAME: x}, options)[0]


def shrinking_arena() -> ort.RunOptions:
    """Run options that hand the CPU arena's unused chunks back after each run: the arena's
    speed within a run, without keeping the largest batch's memory for good."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


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
    """Set-level scores of one graph output (the mean over foreground classes, and per class
    for a multi-class task) and its mean inference time per image."""

    iou: float
    dice: float
    images: int
    ms_per_image: float
    classes: dict[str, dict[str, float]]
    # a binary task on samples with instance labels: the separate objects' scores
    # (ObjectAccumulator.as_dict: ap50, precision, recall, f1, tp, fp, fn, images)
    objects: dict[str, float | int] | None = None


def evaluate_session(
    run: Callable[[np.ndarray], np.ndarray],
    samples: Iterable[Sample],
    preprocessing: Preprocessing,
    task: Task,
) -> Evaluation:
    """IoU/Dice of the task's decision over whole images (core/task.py: micro-averaged per
    class, then the mean over foreground classes); for a binary task, also the scores of the
    objects `instances.split` finds on the samples that carry instance labels.

    `run` maps a batch to one graph output's logits (any backend's session). Time is the
    runtime's alone (pre- and post-processing excluded), batch 1."""
    scores = task.scores()
    objects = ObjectAccumulator()
    seconds = 0.0
    for sample in samples:
        task.check_labels(sample.mask, sample.name)
        chw, size = network_input(sample.image, preprocessing)
        start = time.perf_counter()
        logits = run(chw[None])
        seconds += time.perf_counter() - start
        labels = task.labels(crop_to(logits[0], size))
        scores.update(labels, sample.mask)
        if sample.objects is not None and not task.multiclass:
            objects.update(instances.split(labels > 0), sample.objects)
    if scores.images == 0:
        raise InvalidInput("no images to evaluate on")
    ms = 1000.0 * seconds / scores.images
    classes = scores.classes() if task.multiclass else {}
    found = objects.as_dict() if objects.images else None
    return Evaluation(scores.iou, scores.dice, scores.images, ms, classes, found)


def measure_latency(
    run: Callable[[np.ndarray], np.ndarray],
    size: int,
    channels: int,
    *,
    batch: int = 1,
    repeats: int = 10,
    warmup: int = 2,
) -> float:
    """Median milliseconds of `run` (a batch -> its logits: any backend's session and output)
    on a random size x size input."""
    x = np.random.default_rng(0).random((batch, channels, size, size), dtype=np.float32)
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))
