"""Whole-slide segmentation (core/slide.py) through `unetpp predict`: time per pixel and peak
resident memory of a SIDE x SIDE 16-bit BigTIFF, segmented by the command in a child process
measured by /usr/bin/time -v (the command's whole run: start-up, the model, the slide).

The model is a tiny UNet++ (widths 4..64, as the tests' fixture) trained for a few steps on
synthetic nuclei and exported with `unetpp train` / `unetpp export`, so the figures are the
pipeline's (reading, statistics, blending, deciding, writing) plus a small network's, not a
full-width one's. The input is synthetic nuclei tiled up to SIDE, stored as a tiled,
uncompressed BigTIFF (written tile by tile: this script never holds it whole either).

    .venv/bin/python -m benchmarks.slide [--side 20000] [--level 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Study, unetpp
from unetpp.core.tiling import count

WIDTHS = "4,8,16,32,64"


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
    out = source.with_name("out")
    argv = [
        "predict", source, "--out", out, "--models", models, "--level", args.level,
        "--tile-size", args.tile, "--tile-overlap", args.overlap, "--batch", args.batch,
        "--threads", args.threads, "--jobs", 1,
    ]  # fmt: skip
    exe = Path(sys.executable).parent / "unetpp"
    start = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-v", str(exe), *map(str, argv)],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - start
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    pixels = args.side * args.side
    padded = -(-args.side // 16) * 16
    return {
        "through": "unetpp predict",
        "side": args.side,
        "pixels": pixels,
        "graph": f"L{args.level}",
        "tile": args.tile,
        "overlap": args.overlap,
        "batch": args.batch,
        "threads": args.threads,
        "windows": count(padded, padded, args.tile, args.overlap),
        "seconds": round(seconds, 1),
        "ns_per_pixel": round(1e9 * seconds / pixels, 1),
        "peak_rss_gb": round(peak_kb / 2**20, 3),
        "input_gb": round(source.stat().st_size / 2**30, 3),
        "output_mb": round((out / "slide.tif").stat().st_size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=20_000)
    parser.add_argument("--level", type=int, default=1, help="the graph L1..L4 (default 1)")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a 2048 x 2048 image")
    args = parser.parse_args()
    if args.quick:
        args.side = 2048
    study = Study("slide", args.quick)
    committed = study.where.results / "slide.json"
    previous = json.loads(committed.read_text()) if committed.exists() else None
    with tempfile.TemporaryDirectory(prefix="unetpp-slide-") as tmp:
        work = Path(tmp)
        models = tiny_repository(work)
        write_slide(work / "slide.tif", args.side)
        result = measure(work / "slide.tif", models, args)
    print(json.dumps(result, indent=2))
    study.save(
        model=f"UNet++ widths {WIDTHS}, 30 training steps (synthetic)",
        result=result,
        previous=previous and _earlier(previous),
    )


def _earlier(previous: dict[str, Any]) -> dict[str, Any]:
    """The last full run's figures and load, kept beside the new ones (before and after)."""
    if "previous" in previous and previous["result"].get("through") == "unetpp predict":
        return previous["previous"]  # a rerun of this script: keep the first figure
    load = (
        previous["machine"]["load_average_at_start"][0],
        previous["machine"]["load_average_at_end"][0],
    )
    through = previous["result"].get("through", "core.slide.segment_slide")
    return {**previous["result"], "through": through, "load_average": load}


if __name__ == "__main__":
    main()
