"""Whole-slide segmentation (core/slide.py): time per pixel and peak resident memory of a
SIDE x SIDE 16-bit BigTIFF, segmented in a child process measured by /usr/bin/time -v.

The model is a tiny UNet++ (widths 4..64, as the tests' fixture) trained for a few steps on
synthetic nuclei and exported with `unetpp train` / `unetpp export`, so the figures are the
pipeline's (reading, statistics, blending, deciding, writing) plus a small network's, not a
full-width one's. The input is synthetic nuclei tiled up to SIDE, stored as a tiled,
uncompressed BigTIFF (written tile by tile: this script never holds it whole either).

    .venv/bin/python -m benchmarks.slide [--side 20000] [--graph L1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Study, unetpp

WIDTHS = "4,8,16,32,64"

CHILD = """
import json, sys, time
from unetpp.core import slide
from unetpp.core.inference import run_batch
from unetpp.core.pipeline import LocalModel
source, target, models, graph, tile, overlap, batch, threads = sys.argv[1:]
model = LocalModel.open(models, threads=int(threads))
g = model.graphs[graph]
session = model.sessions[g.file]
start = time.perf_counter()
result = slide.segment_slide(
    source, target, lambda b: run_batch(session, b, g.output),
    preprocessing=model.manifest.preprocessing, decide=model.manifest.task.labels,
    tile=int(tile), overlap=int(overlap), batch=int(batch),
)
print(json.dumps({"seconds": time.perf_counter() - start, "windows": result.windows}))
"""


def tiny_repository(work: Path) -> Path:
    run, models = work / "run", work / "models"
    unetpp(
        "train",
        "--data",
        "synthetic",
        "--widths",
        WIDTHS,
        "--stop-at-step",
        "30",
        "--out",
        str(run),
    )
    unetpp("export", str(run / "last.pt"), "--out", str(models))
    return models


def write_slide(path: Path, side: int) -> None:
    """A side x side uint16 tiled BigTIFF of synthetic nuclei, written tile by tile."""
    import tifffile

    from unetpp.core.datasets import synthetic_image

    base, _ = synthetic_image(np.random.default_rng(0), 256)
    base = base.astype(np.uint16)

    def tiles():
        for _ in range(0, side, 256):
            for _ in range(0, side, 256):
                yield base

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(), shape=(side, side), dtype=np.uint16, tile=(256, 256), metadata=None)


def measure(source: Path, models: Path, args: argparse.Namespace) -> dict[str, Any]:
    target = source.with_name("labels.tif")
    argv = [source, target, models, args.graph, args.tile, args.overlap, args.batch, args.threads]
    done = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", CHILD, *map(str, argv)],
        capture_output=True,
        text=True,
        check=True,
    )
    child = json.loads(done.stdout.strip().splitlines()[-1])
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    pixels = args.side * args.side
    return {
        "side": args.side,
        "pixels": pixels,
        "graph": args.graph,
        "tile": args.tile,
        "overlap": args.overlap,
        "batch": args.batch,
        "threads": args.threads,
        "windows": child["windows"],
        "seconds": round(child["seconds"], 1),
        "ns_per_pixel": round(1e9 * child["seconds"] / pixels, 1),
        "peak_rss_gb": round(peak_kb / 2**20, 3),
        "input_gb": round(source.stat().st_size / 2**30, 3),
        "output_mb": round(target.stat().st_size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=20_000)
    parser.add_argument("--graph", default="L1")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a 2048 x 2048 image")
    args = parser.parse_args()
    if args.quick:
        args.side = 2048
    study = Study("slide", args.quick)
    with tempfile.TemporaryDirectory(prefix="unetpp-slide-") as tmp:
        work = Path(tmp)
        models = tiny_repository(work)
        write_slide(work / "slide.tif", args.side)
        result = measure(work / "slide.tif", models, args)
    print(json.dumps(result, indent=2))
    study.save(model=f"UNet++ widths {WIDTHS}, 30 training steps (synthetic)", result=result)


if __name__ == "__main__":
    main()
