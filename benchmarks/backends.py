"""onnxruntime against OpenVINO (core/backends.py) on every graph of a model repository, at
256 and 512, batch 1 and 8: fp32 and int8 on both, bf16 on OpenVINO, with mask agreement.

    .venv/bin/python -m benchmarks.backends --models DIR [--repeats 5] [--shapes 256x1,512x1]
    .venv/bin/python -m benchmarks.backends --models DIR --quick   # 256, batch 1, 2 repeats

Per (size, batch, level) the variants are opened together and timed interleaved (round-robin,
rotating order, 50 ms pause before each run so that one runtime's spinning threads do not slow
the other), median of the repeats; each session on every core (the runtimes' defaults), the
onnxruntime arena on. Ratios are against onnxruntime fp32 of the same graph, size and batch.
Agreement: the fraction of mask pixels (logit > the manifest's threshold) equal to onnxruntime
fp32's, on synthetic nuclei images preprocessed by the manifest's recipe; and the same at the
median of onnxruntime fp32's logits as the cut (half the pixels on each side: sensitive to
precision even for a model whose masks are nearly empty). The load average is recorded beside
every row: the machine is shared.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Study, interleaved_ms, load_average, summary_ms

SETTLE_S = 0.05
REFERENCE = ("onnxruntime", "fp32")


def inputs(models: Path, size: int, batch: int) -> np.ndarray:
    """`batch` synthetic images, preprocessed, size x size."""
    from unetpp.core.datasets import synthetic_image
    from unetpp.core.manifest import load_repository

    prep = load_repository(models).preprocessing
    rng = np.random.default_rng(size)
    return np.stack([prep(synthetic_image(rng, size)[0]) for _ in range(batch)])


def variants(models: Path, level: int) -> dict[tuple[str, str], Any]:
    """The sessions of one level: (backend, precision) -> session, for the files present."""
    from unetpp.core.backends import OnnxRuntime, OpenVINO

    fp32, int8 = models / f"L{level}.onnx", models / f"L{level}.int8.onnx"
    opened = {
        ("onnxruntime", "fp32"): OnnxRuntime().open(fp32),
        ("openvino", "fp32"): OpenVINO("f32").open(fp32),
        ("openvino", "bf16"): OpenVINO("bf16").open(fp32),
    }
    if int8.exists():
        opened[("onnxruntime", "int8")] = OnnxRuntime().open(int8)
        opened[("openvino", "int8")] = OpenVINO().open(int8)
    return opened


def measure(models: Path, level: int, size: int, batch: int, repeats: int) -> list[dict]:
    from unetpp.core.manifest import load_repository
    from unetpp.core.task import logit_threshold

    cut = logit_threshold(load_repository(models).threshold)
    x = inputs(models, size, batch)
    sessions = variants(models, level)
    logits = {key: s.run(x, "logits") for key, s in sessions.items()}
    median = float(np.median(logits[REFERENCE]))  # half the reference's pixels on each side
    masks = {key: out > cut for key, out in logits.items()}
    halves = {key: out > median for key, out in logits.items()}
    names = {f"{b} {p}": (b, p) for b, p in sessions}
    load = load_average()
    times = interleaved_ms(
        {n: (lambda s=sessions[k]: s.run(x, "logits")) for n, k in names.items()},
        repeats,
        settle_s=SETTLE_S,
    )
    base = float(np.median(times[f"{REFERENCE[0]} {REFERENCE[1]}"]))
    rows = []
    for name, key in names.items():
        ms = summary_ms(times[name])
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
            f"L{level} {size} b{batch} {name:>16}: {ms['median']:9.1f} ms  "
            f"x{base / ms['median']:.2f}  agree {rows[-1]['mask_agreement']:.5f}  load {load}",
            flush=True,
        )
    del sessions
    gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="a model repository")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--levels", default="1,2,3,4")
    parser.add_argument(
        "--shapes", default="256x1,256x8,512x1,512x8", help="SIZExBATCH, comma-separated"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    shapes = [(256, 1)] if args.quick else shapes
    repeats = 2 if args.quick else args.repeats
    study = Study("backends", args.quick)
    import openvino

    rows: list[dict] = []
    for size, batch in shapes:  # saved after each shape: a long run keeps what it measured
        for level in map(int, args.levels.split(",")):
            rows += measure(args.models.resolve(), level, size, batch, repeats)
        study.save(
            models=str(args.models), openvino=openvino.__version__, settle_s=SETTLE_S, rows=rows
        )


if __name__ == "__main__":
    main()
