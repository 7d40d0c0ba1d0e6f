"""onnxruntime against OpenVINO (core/backends.py) on every graph of a model repository, at
256 and 512, batch 1 and 8: fp32 and int8 on both, bf16 on OpenVINO, with mask agreement.

    .venv/bin/python -m benchmarks.backends --models DIR [--data hela] [--repeats 3]
    .venv/bin/python -m benchmarks.backends --models DIR --quick   # 256, batch 1, 2 repeats

Per (size, batch, level) the variants are timed in rounds, the order rotating each round; in
a round each variant is opened alone (the others closed: five sessions holding the memory of
8 x 512x512 at once were OOM-killed at 10 GB), run once to warm up and once timed, after a
50 ms pause (so that one runtime's spinning threads do not slow the other), then closed.
Median of the rounds; each session on every core (the runtimes' defaults), the onnxruntime
arena on, as the server opens them (a bf16 entry: the fp32 file opened by OpenVINO in bf16;
fp32 and int8 on OpenVINO keep their float layers in f32). Ratios are against onnxruntime
fp32 of the same graph, size and batch. Agreement: the fraction of mask pixels (logit > the
manifest's threshold) equal to onnxruntime fp32's, on `--data` images (validation frames,
cropped at seeded offsets, or synthetic nuclei) preprocessed by the manifest's recipe; and the
same at the median of onnxruntime fp32's logits as the cut (half the pixels on each side:
sensitive to precision even for a model whose masks are nearly empty). The load average is
recorded beside every row: the machine is shared. The manifest's export-time figures (IoU on
its validation data, latency at 256) are copied beside them.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Study, load_average, summary_ms

SETTLE_S = 0.05
REFERENCE = ("onnxruntime", "fp32")


def inputs(models: Path, size: int, batch: int, data: str) -> np.ndarray:
    """`batch` preprocessed size x size images: crops of `data`'s validation images at seeded
    offsets, or synthetic nuclei."""
    from unetpp.core.datasets import load_split, synthetic_image
    from unetpp.core.manifest import load_repository

    prep = load_repository(models).preprocessing
    rng = np.random.default_rng(size)
    if data == "synthetic":
        return np.stack([prep(synthetic_image(rng, size)[0]) for _ in range(batch)])
    frames = [s.image for s in load_split(data, "val")]
    crops = []
    for k in range(batch):
        image = frames[k % len(frames)]
        top = int(rng.integers(0, image.shape[0] - size + 1))
        left = int(rng.integers(0, image.shape[1] - size + 1))
        crops.append(prep(image[top : top + size, left : left + size]))
    return np.stack(crops)


def variants(models: Path, level: int) -> list[tuple[str, str]]:
    """(backend, precision) of one level, for the files present."""
    keys = [REFERENCE, ("openvino", "fp32"), ("openvino", "bf16")]
    if (models / f"L{level}.int8.onnx").exists():
        keys += [("onnxruntime", "int8"), ("openvino", "int8")]
    return keys


def open_variant(models: Path, level: int, key: tuple[str, str]) -> Any:
    from unetpp.core.backends import backend

    name, precision = key
    file = f"L{level}.int8.onnx" if precision == "int8" else f"L{level}.onnx"
    return backend(name).open(models / file, None, precision)


def rounds(
    models: Path, level: int, x: np.ndarray, repeats: int
) -> tuple[dict[tuple[str, str], list[float]], dict[tuple[str, str], np.ndarray]]:
    """Each variant's timings (ms) and its logits of the first round."""
    keys = variants(models, level)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    logits: dict[tuple[str, str], np.ndarray] = {}
    for r in range(repeats):
        k = r % len(keys)
        for key in keys[k:] + keys[:k]:
            session = open_variant(models, level, key)
            logits.setdefault(key, session.run(x, "logits"))  # the warm-up
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            session.run(x, "logits")
            times[key].append(1000.0 * (time.perf_counter() - start))
            del session
            gc.collect()
    return times, logits


def measure(models: Path, level: int, size: int, batch: int, repeats: int, data: str) -> list:
    from unetpp.core.manifest import load_repository
    from unetpp.core.task import logit_threshold

    cut = logit_threshold(load_repository(models).threshold)
    x = inputs(models, size, batch, data)
    load = load_average()
    times, logits = rounds(models, level, x, repeats)
    median = float(np.median(logits[REFERENCE]))  # half the reference's pixels on each side
    masks = {key: out > cut for key, out in logits.items()}
    halves = {key: out > median for key, out in logits.items()}
    base = float(np.median(times[REFERENCE]))
    rows = []
    for key, t in times.items():
        ms = summary_ms(t)
        rows.append(
            {
                "graph": f"L{level}",
                "size": size,
                "batch": batch,
                "backend": key[0],
                "precision": key[1],
                "ms": ms,
                "ms_per_image": round(ms["median"] / batch, 2),
                "speedup_vs_ort_fp32": round(base / ms["median"], 3),
                "mask_agreement": round(float((masks[key] == masks[REFERENCE]).mean()), 5),
                "foreground": round(float(masks[REFERENCE].mean()), 4),
                "median_cut_agreement": round(float((halves[key] == halves[REFERENCE]).mean()), 5),
                "load_average": load,
            }
        )
        print(
            f"L{level} {size} b{batch} {key[0]:>11} {key[1]}: {ms['median']:9.1f} ms  "
            f"x{base / ms['median']:.2f}  agree {rows[-1]['mask_agreement']:.5f}  load {load}",
            flush=True,
        )
    return rows


def exported(models: Path) -> list[dict[str, Any]]:
    """The manifest's figures per graph: IoU on its validation data, latency at export."""
    from unetpp.core.manifest import load_repository

    return [
        {
            "graph": g.name,
            "precision": g.precision,
            "backend": g.backend or "onnxruntime",
            "iou": g.accuracy.iou if g.accuracy else None,
            "data": g.accuracy.data if g.accuracy else None,
            "latency_ms": g.latency_ms,
        }
        for g in load_repository(models).graphs
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="a model repository")
    parser.add_argument("--data", default="synthetic", help="hela, synthetic or a folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", default="1,2,3,4")
    parser.add_argument(
        "--shapes", default="256x1,512x1,256x8,512x8", help="SIZExBATCH, comma-separated"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    shapes = [(256, 1)] if args.quick else shapes
    repeats = 2 if args.quick else args.repeats
    study = Study("backends", args.quick)
    import openvino

    models = args.models.resolve()
    rows: list[dict] = []
    for size, batch in shapes:  # saved after each shape: a long run keeps what it measured
        for level in map(int, args.levels.split(",")):
            rows += measure(models, level, size, batch, repeats, args.data)
        study.save(
            models=str(args.models),
            data=args.data,
            openvino=openvino.__version__,
            settle_s=SETTLE_S,
            exported=exported(models),
            rows=rows,
        )


if __name__ == "__main__":
    main()
