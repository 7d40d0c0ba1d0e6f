"""Benchmark study `backend_paths`: the paths beyond the fixed graphs on each backend.

    .venv/bin/python -m benchmarks.backend_paths [--cascade-models runs/adaptive/hela] \\
        [--models runs/backends-cache/hela] [--rounds 7] [--serve-rounds 3]

1. The adaptive cascade (core/cascade.py) on onnxruntime and on OpenVINO f32, on crops of the
   HeLa test frames (a corner and the opposite corner of each, at 256 and 512), its middle
   target; the two backends take turns (benchmarks/common.py `interleaved_ms`), median ms per
   image, the mean level reached, and the share of mask pixels equal to onnxruntime's.
2. A server's start-up on each backend: `unetpp serve --models DIR` on every repository given,
   the backends taking turns; seconds from launch to /readyz answering 200, and the process's
   VmRSS a second later (medians).

Writes benchmarks/results/backend_paths.json and re-renders benchmarks/REPORT.md
(docs/big-images.md#backends quotes it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import ROOT, Study, free_port, interleaved_ms, shown, start_process, stop
from unetpp.core.backends import backend
from unetpp.core.cascade import Cascade
from unetpp.core.datasets import load_split
from unetpp.core.manifest import BACKENDS, load_repository
from unetpp.core.pipeline import prepare

SIZES = (256, 512)


def crops(size: int) -> list[np.ndarray]:
    """Two opposite corners of each HeLa test frame."""
    return [
        frame.image[y : y + size, x : x + size]
        for frame in load_split("hela", "test")
        for y, x in ((0, 0), (frame.image.shape[0] - size, frame.image.shape[1] - size))
    ]


def cascade(repo: Path, rounds: int) -> list[dict[str, Any]]:
    manifest = load_repository(repo)
    cascades = {name: Cascade.open(repo, manifest, backend=backend(name)) for name in BACKENDS}
    thresholds = cascades[BACKENDS[0]].target().thresholds
    rows = []
    for size in SIZES:
        xs = [prepare(c, manifest.preprocessing).x for c in crops(size)]
        results: dict[str, list] = {}

        def step(name: str, xs=xs, results=results) -> Any:
            def run() -> None:
                results[name] = [cascades[name].infer(x, thresholds) for x in xs]

            return run

        times = interleaved_ms({n: step(n) for n in cascades}, repeats=rounds)
        reference = [r.logits > 0 for r in results[BACKENDS[0]]]
        for name in cascades:
            masks = [r.logits > 0 for r in results[name]]
            rows.append(
                {
                    "size": size,
                    "backend": name,
                    "images": len(xs),
                    "ms_per_image": round(statistics.median(times[name]) / len(xs), 1),
                    "mean_level": round(float(np.mean([r.level for r in results[name]])), 2),
                    "mask_agreement": round(
                        float(
                            np.mean(
                                [(a == b).mean() for a, b in zip(masks, reference, strict=True)]
                            )
                        ),
                        5,
                    ),
                }
            )
    return rows


def vm_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024


def one_start(repo: Path, name: str) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "unetpp", "serve", "--models", str(repo), "--port", str(port)]
    start = time.monotonic()
    proc = start_process(argv, f"{url}/readyz", env={"UNETPP_BACKEND": name})
    ready_s = time.monotonic() - start
    try:
        time.sleep(1.0)
        model = httpx.get(f"{url}/v1/models").json()["models"][0]
        assert model["backend"] == name, model
        return {"ready_s": ready_s, "rss_mb": vm_rss_mb(proc.pid), "graphs": len(model["graphs"])}
    finally:
        stop(proc)


def startup(repos: list[Path], rounds: int) -> list[dict[str, Any]]:
    rows = []
    for repo in repos:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in BACKENDS}
        for r in range(rounds):
            for name in BACKENDS[r % 2 :] + BACKENDS[: r % 2]:
                runs[name].append(one_start(repo, name))
        for name, starts in runs.items():
            rows.append(
                {
                    "repository": shown(repo),
                    "backend": name,
                    "graphs": starts[0]["graphs"],
                    "cascade": load_repository(repo).cascade is not None,
                    "ready_s": round(statistics.median(s["ready_s"] for s in starts), 2),
                    "rss_mb": round(statistics.median(s["rss_mb"] for s in starts), 1),
                    "starts": len(starts),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cascade-models", type=Path, default=ROOT / "runs/adaptive/hela")
    parser.add_argument(
        "--models", type=Path, action="append", help="(repeatable; default: both repositories)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="cascade rounds per size")
    parser.add_argument("--serve-rounds", type=int, default=3, help="starts per backend")
    parser.add_argument("--quick", action="store_true", help="one round each: a smoke run")
    args = parser.parse_args()
    study = Study("backend_paths", args.quick)
    repos = args.models or [args.cascade_models, ROOT / "runs/backends-cache/hela"]
    rounds, serve_rounds = (1, 1) if args.quick else (args.rounds, args.serve_rounds)
    study.save(
        cascade=cascade(args.cascade_models, rounds),
        cascade_repository=shown(args.cascade_models),
        startup=startup(repos, serve_rounds),
    )  # and re-renders the report


if __name__ == "__main__":
    main()
