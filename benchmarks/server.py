"""Study 4 (server): the HTTP service under a closed-loop load, its overhead against
onnxruntime alone, and a naive FastAPI + PyTorch server of the full network under the same load.

    .venv/bin/python -m benchmarks.server                  # the paper study's UNet++ w/ DS
    .venv/bin/python -m benchmarks.server --models DIR --checkpoint CKPT
    .venv/bin/python -m benchmarks.server --quick          # 12 requests / 5 s per cell

1. `python -m unetpp.server` (default settings) in its own process on a free loopback port;
   the image: a SIZE x SIZE crop of HeLa test frame 17 as a 16-bit PNG.
2. Overhead, concurrency 1: for each mode and each level (fp32), requests interleave with
   `session.run` of the graph the server chose, in this process, on the same preprocessed
   input (a 0.1 s pause before each, so one process's spinning threads do not slow the other);
   medians. End to end = the client's wall time of POST /v1/segment (PNG in, PNG mask out).
3. Load (benchmarks/loadgen.py): closed loop at concurrency 1, 4 and 16 for each mode and for
   level=4&precision=fp32, each bounded by --requests and --seconds; p50/p95/p99, requests/s.
4. The same load on benchmarks/baselines/torch_server.py (the full network in PyTorch, no
   batching) with the same image; then the server's dynamic batch sizes from /v1/models.
5. Memory: a fresh server with and without onnxruntime's memory arena (UNETPP_MEMORY_ARENA),
   resident memory after start-up and its peak over one --memory-side square request on L1
   (sliding-window tiles), read from /proc.
This process never imports torch (the baseline runs in its own process).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from subprocess import Popen
from typing import Any

import httpx
import numpy as np

from benchmarks import loadgen
from benchmarks.common import (
    Study,
    add_repository_arguments,
    free_port,
    interleaved_ms,
    pyplot,
    repository,
    save_figure,
    shown,
    start_process,
    stop,
)

SETTLE_S = 0.1
MODES = ("fast", "balanced", "accurate")
LOADS: dict[str, dict[str, Any]] = {
    **{f"mode={m}": {"mode": m} for m in MODES},
    "level=4 fp32": {"level": 4, "precision": "fp32"},
}
CONCURRENCY = (1, 4, 16)


def test_crop(size: int) -> np.ndarray:
    from unetpp.core.datasets import load_split

    frame = load_split("hela", "test")[0].image
    y, x = (frame.shape[0] - size) // 2, (frame.shape[1] - size) // 2
    return np.ascontiguousarray(frame[y : y + size, x : x + size])


def overhead(url: str, models: Path, image: np.ndarray, png: bytes, repeats: int) -> list[dict]:
    """Per mode and level: the server end to end against onnxruntime alone on its graph."""
    from unetpp.core.inference import create_session, network_input, run_batch
    from unetpp.core.manifest import read_manifest

    manifest = read_manifest(models)
    by_name = {g.name: g for g in manifest.graphs}
    x = network_input(image, manifest.preprocessing)[0][None]
    targets = {f"mode={m}": {"mode": m} for m in MODES}
    targets |= {f"level={k} fp32": {"level": k, "precision": "fp32"} for k in range(1, 5)}
    rows = []
    with httpx.Client(base_url=url, timeout=300) as client:

        def post(params: dict[str, Any]) -> httpx.Response:
            r = client.post(
                "/v1/segment", params=params, content=png, headers={"content-type": "image/png"}
            )
            r.raise_for_status()
            return r

        for label, params in targets.items():
            graph = by_name[post(params).headers["x-unetpp-graph"]]
            session = create_session(models / graph.file)
            inside: list[float] = []
            times = interleaved_ms(
                {
                    "alone": lambda s=session, g=graph: run_batch(s, x, g.output),
                    "served": lambda p=params, sink=inside: sink.append(
                        float(post(p).headers["x-unetpp-inference-ms"])
                    ),
                },
                repeats,
                warmup=2,
                settle_s=SETTLE_S,
            )
            alone, served = statistics.median(times["alone"]), statistics.median(times["served"])
            row = {
                "request": label,
                "graph": graph.name,
                "onnxruntime_ms": round(alone, 2),
                "server_ms": round(served, 2),
                "server_inference_ms": round(statistics.median(inside), 2),
                "overhead_ms": round(served - alone, 2),
                "ratio": round(served / alone, 3),
            }
            rows.append(row)
            print(row, flush=True)
    return rows


def memory_kb(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in kB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/{pid}/status has no {field}")


def memory(models: Path, side: int) -> list[dict]:
    """Peak resident memory of the server over one side x side request on L1 (tiled), with
    and without onnxruntime's CPU memory arena (UNETPP_MEMORY_ARENA)."""
    from unetpp.core.datasets import load_split
    from unetpp.core.imageio import encode_png

    frame = load_split("hela", "test")[0].image
    reps = (-(-side // frame.shape[0]), -(-side // frame.shape[1]))
    png = encode_png(np.ascontiguousarray(np.tile(frame, reps)[:side, :side]))
    rows = []
    for arena in ("true", "false"):
        with serving(models, {"UNETPP_MEMORY_ARENA": arena}) as (url, proc):
            started = memory_kb(proc.pid, "VmRSS")
            t0 = time.perf_counter()
            r = httpx.post(
                f"{url}/v1/segment",
                params={"level": 1, "precision": "fp32"},
                content=png,
                headers={"content-type": "image/png"},
                timeout=900,
            )
            r.raise_for_status()
            rows.append(
                {
                    "memory_arena": arena == "true",
                    "image": f"{side}x{side} 16-bit PNG ({len(png) / 1e6:.1f} MB), level=1 fp32",
                    "rss_after_start_mb": round(started / 1024),
                    "peak_rss_mb": round(memory_kb(proc.pid, "VmHWM") / 1024),
                    "request_s": round(time.perf_counter() - t0, 2),
                    "server_inference_ms": float(r.headers["x-unetpp-inference-ms"]),
                }
            )
        print(rows[-1], flush=True)
    return rows


@contextmanager
def serving(models: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, Popen]]:
    """`python -m unetpp.server` on a free loopback port, ready; stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_process(
        [sys.executable, "-m", "unetpp.server"],
        f"{url}/readyz",
        env={"UNETPP_MODELS": str(models), "UNETPP_PORT": str(port), **(env or {})},
    )
    try:
        yield url, proc
    finally:
        stop(proc)


def load_cells(
    url: str, png: bytes, loads: dict[str, dict], requests: int, seconds: float
) -> list[dict]:
    cells = []
    for label, params in loads.items():
        for c in CONCURRENCY:
            time.sleep(1.0)  # let the previous cell's queue drain and threads go idle
            cell = loadgen.run(
                url,
                content=png,
                content_type="image/png",
                params=params,
                concurrency=c,
                max_requests=requests,
                max_seconds=seconds,
                count_header="x-unetpp-graph" if params else "",
            )
            cells.append({"load": label, **cell})
            print(cells[-1], flush=True)
    return cells


def chart(path: Path, cells: list[dict]) -> None:
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    for label in dict.fromkeys(c["load"] for c in cells):
        mine = [c for c in cells if c["load"] == label and c["requests"]]
        xs = [c["concurrency"] for c in mine]
        style = "k--" if label.startswith("baseline") else "o-"
        left.plot(xs, [c["requests_per_s"] for c in mine], style, label=label)
        right.plot(xs, [c["p95_ms"] for c in mine], style, label=label)
    for ax, what in ((left, "requests/s"), (right, "p95 latency (ms, log)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=7)
    fig.suptitle(
        "unetpp server vs a naive PyTorch server, loopback, 2 shared CPU cores", fontsize=10
    )
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_repository_arguments(parser, checkpoint_for="the PyTorch baseline")
    parser.add_argument("--size", type=int, default=256, help="square image side (default 256)")
    parser.add_argument("--repeats", type=int, default=12, help="overhead: requests per target")
    parser.add_argument("--requests", type=int, default=120, help="load: at most, per cell")
    parser.add_argument("--seconds", type=float, default=30.0, help="load: at most, per cell")
    parser.add_argument("--quick", action="store_true", help="12 requests or 5 s a cell, 3 repeats")
    parser.add_argument(
        "--memory-side", type=int, default=4096, help="memory: the large image's side"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.requests, args.seconds, args.memory_side = 3, 12, 5.0, 1536
    study = Study("server", args.quick)
    models, checkpoint = repository(args)
    from unetpp.core.imageio import encode_png

    image = test_crop(args.size)
    png = encode_png(image)

    with serving(models) as (url, _):
        rows = overhead(url, models, image, png, args.repeats)
        cells = load_cells(f"{url}/v1/segment", png, LOADS, args.requests, args.seconds)
        served = {g["name"]: g["served"] for g in httpx.get(f"{url}/v1/models").json()["graphs"]}

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    baseline = start_process(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.baselines.torch_server:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        f"{base}/healthz",
        env={"UNETPP_BASELINE_CHECKPOINT": str(checkpoint)},
    )
    try:
        cells += load_cells(
            f"{base}/segment",
            png,
            {"baseline: PyTorch full network": {}},
            args.requests,
            args.seconds,
        )
    finally:
        stop(baseline)

    peaks = memory(models, args.memory_side)
    chart(study.where.plot_path("server_load.png"), cells)
    study.save(
        repository=shown(models),
        image=f"{args.size}x{args.size} crop of HeLa test frame 17 (16-bit grey PNG, "
        f"{len(png):,} bytes)",
        server="python -m unetpp.server, default settings (one inference worker, onnxruntime "
        "on all cores, max_batch 8, max_wait 5 ms)",
        bounds={"requests": args.requests, "seconds": args.seconds, "repeats": args.repeats},
        overhead=rows,
        load=cells,
        memory=peaks,
        batches_served={k: v["batch_sizes"] for k, v in served.items() if v["requests"]},
        plots={"load": "server_load.png"},
    )


if __name__ == "__main__":
    main()
