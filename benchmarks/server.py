"""Benchmark (not CI): the inference server end to end against onnxruntime alone.

    .venv/bin/python benchmarks/server_latency.py                # full-size, untrained UNet++
    .venv/bin/python benchmarks/server_latency.py --build tiny   # widths 4..64
    .venv/bin/python benchmarks/server_latency.py --models DIR   # an existing repository

1. Builds a model repository (unless --models), in a child process so that torch never loads
   in the measuring one: an untrained UNet++ of the chosen size, exported with
   `export_repository` (fp32 L1..L4, no int8; latency does not depend on the weights, so the
   untrained weights change nothing measured here).
2. Starts `python -m unetpp.server` as a separate process on a free port and waits for /readyz.
3. Latency per level at concurrency 1: for each level, requests interleave with runs of
   onnxruntime alone on the same graph file in this process (same preprocessed, padded input,
   same thread count) and of the same pipeline in process (decode .. PNG mask, no HTTP), so
   that drift of a shared CPU hits all alike. End to end = the client's wall time for
   POST /v1/segment (PNG in, PNG mask out, over local HTTP).
4. Throughput at concurrency 1, 4 and 16 (threads, one HTTP client each) on one level.
Writes benchmarks/results/server_<build>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from unetpp.core.datasets import synthetic_split
from unetpp.core.imageio import decode_image, encode_png
from unetpp.core.inference import create_session, logit_threshold, run_batch
from unetpp.core.manifest import read_manifest
from unetpp.core.preprocess import crop_to, pad_to_multiple
from unetpp.server.encoders import mask_png

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SETTLE_S = 0.1  # pause before each timed step
WIDTHS = {"full": (32, 64, 128, 256, 512), "tiny": (4, 8, 16, 32, 64)}


def build_repository(build: str, out: Path) -> Path:
    import torch
    from unetpp.core.preprocess import Preprocessing
    from unetpp.export.repository import ExportOptions, export_repository
    from unetpp.model.checkpoint import Checkpoint, save_checkpoint
    from unetpp.model.unetpp import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig(widths=WIDTHS[build])
    ckpt = Checkpoint(
        config, Preprocessing(), build_model(config).state_dict(), data={"source": "untrained"}
    )
    path = save_checkpoint(out / "untrained.pt", ckpt)
    export_repository(
        path,
        out / "models",
        val_samples=synthetic_split("val", count=2),
        val_data="synthetic:val (untrained weights: accuracy meaningless)",
        options=ExportOptions(int8=False, ensemble="never", parity_images=1),
    )
    return out / "models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "UNETPP_MODELS": str(models), "UNETPP_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "unetpp.server"], env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("server not ready after 600 s")


def post(client: httpx.Client, png: bytes, level: int) -> tuple[float, float]:
    """End-to-end milliseconds of one request, and the server's own onnxruntime time."""
    start = time.perf_counter()
    r = client.post(
        "/v1/segment", params={"level": level}, content=png, headers={"content-type": "image/png"}
    )
    elapsed = 1000.0 * (time.perf_counter() - start)
    r.raise_for_status()
    return elapsed, float(r.headers["x-unetpp-inference-ms"])


def pipeline(session, png: bytes, manifest) -> None:
    """What the server does for a request, in process and without HTTP or batching."""
    prep = manifest.preprocessing
    x, size = pad_to_multiple(prep(decode_image(png)), prep.multiple)
    logits = crop_to(run_batch(session, x[None])[0, 0], size)
    mask_png(logits > logit_threshold(manifest.threshold))


def compare(
    client: httpx.Client, session, manifest, x: np.ndarray, png: bytes, level: int, repeats: int
):
    """Medians of onnxruntime alone, the in-process pipeline and the server, interleaved request
    by request (rotating the order) so that drift of a shared CPU hits all alike, with a pause
    before each."""
    times: dict[str, list[float]] = {"alone": [], "pipeline": [], "served": [], "inside": []}
    steps = {
        "alone": lambda: run_batch(session, x),
        "pipeline": lambda: pipeline(session, png, manifest),
        "served": lambda: times["inside"].append(post(client, png, level)[1]),
    }
    for _ in range(2):  # warm all
        for step in steps.values():
            step()
    order = list(steps)
    for i in range(repeats):
        for name in order[i % 3 :] + order[: i % 3]:
            # let the other side's onnxruntime threads stop spinning: they would steal the cores
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            steps[name]()
            times[name].append(1000.0 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def latency(url: str, models: Path, image: np.ndarray, repeats: int) -> list[dict]:
    manifest = read_manifest(models)
    png = encode_png(image)
    x = pad_to_multiple(manifest.preprocessing(image), manifest.preprocessing.multiple)[0][None]
    rows = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for graph in (g for g in manifest.graphs if g.output == "logits" and g.precision == "fp32"):
            session = create_session(models / graph.file)
            t = compare(client, session, manifest, x, png, graph.level, repeats)
            row = {
                "graph": graph.name,
                "onnxruntime_ms": round(t["alone"], 2),
                "pipeline_ms": round(t["pipeline"], 2),
                "server_ms": round(t["served"], 2),
                "server_inference_ms": round(t["inside"], 2),
                "ratio": round(t["served"] / t["alone"], 3),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def throughput(url: str, png: bytes, level: int, concurrency: int, requests: int) -> dict:
    times: list[float] = []
    lock = threading.Lock()
    per_thread = max(1, requests // concurrency)

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            for _ in range(per_thread):
                ms, _ = post(client, png, level)
                with lock:
                    times.append(ms)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    row = {
        "concurrency": concurrency,
        "requests": len(times),
        "images_per_s": round(len(times) / wall, 2),
        "median_ms": round(statistics.median(times), 1),
        "p95_ms": round(float(np.percentile(times, 95)), 1),
    }
    print(json.dumps(row), flush=True)
    return row


def batch_sizes(url: str, name: str) -> dict[str, int]:
    graphs = httpx.get(f"{url}/v1/models").json()["graphs"]
    return next(g for g in graphs if g["name"] == name)["served"]["batch_sizes"]


def report(result: dict) -> str:
    lines = [
        f"# Server benchmark: {result['repository']}",
        "",
        f"Weights: {result['weights']} (latency does not depend on them).",
        f"Machine: {result['machine']}; {result['cpus']} CPU cores, **shared with other work** "
        "while this ran, so figures move by tens of percent between runs. Server: "
        "`python -m unetpp.server` with default settings (one inference worker, onnxruntime "
        "on all cores, max_batch 8, max_wait 5 ms), local HTTP.",
        f"Image: {result['image']}. Command: `{result['command']}`.",
        "",
        "## Latency per level, concurrency 1 (median)",
        "",
        "| graph | onnxruntime alone (ms) | server end to end (ms) | ratio | server's own inference (ms) | in-process pipeline (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['graph']} | {r['onnxruntime_ms']} | {r['server_ms']} | {r['ratio']} | "
        f"{r['server_inference_ms']} | {r['pipeline_ms']} |"
        for r in result["latency"]
    ]
    lines += [
        "",
        "onnxruntime alone: `session.run` on the preprocessed, padded input in the benchmark "
        "process. Server: POST /v1/segment with the PNG, the PNG mask back (decode, "
        "percentile normalisation, routing, queue, inference, threshold, PNG encoding, HTTP). "
        "The server's own inference: its onnxruntime time (X-UNetPP-Inference-Ms). In-process "
        "pipeline: the same decode, preprocessing, inference, threshold and PNG encoding in the "
        "benchmark process, without HTTP, queue or threads (what the server adds is the "
        "difference to the end-to-end figure). The three are interleaved request by request, "
        "rotating the order, with a 0.1 s pause before each (one process's spinning onnxruntime "
        "threads would otherwise slow the other).",
        "",
        f"## Throughput on {result['throughput_graph']}",
        "",
        "| concurrency | requests | images/s | median (ms) | p95 (ms) |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['concurrency']} | {r['requests']} | {r['images_per_s']} | {r['median_ms']} | "
        f"{r['p95_ms']} |"
        for r in result["throughput"]
    ]
    lines += [
        "",
        f"Batch sizes served on {result['throughput_graph']}: {result['batch_sizes']}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", choices=sorted(WIDTHS), default="full")
    parser.add_argument("--models", type=Path, help="use this repository instead of building")
    parser.add_argument("--name", help="results file suffix (default: the --build, or custom)")
    parser.add_argument("--build-to", type=Path, help=argparse.SUPPRESS)  # the child's job
    parser.add_argument("--size", type=int, default=256, help="square image side (default 256)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--throughput-level", type=int, default=2)
    parser.add_argument("--requests", type=int, default=48, help="per concurrency level")
    args = parser.parse_args()
    if args.build_to:
        build_repository(args.build, args.build_to)
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.models is None:  # in a child process: torch never loads in the measuring one
            build = [sys.executable, __file__, "--build", args.build, "--build-to", tmp]
            subprocess.run(build, check=True)
        models = args.models or Path(tmp) / "models"
        name = args.name or ("custom" if args.models else args.build)
        sample = synthetic_split("test", count=1)[0].image
        image = np.tile(
            sample, (-(-args.size // sample.shape[0]), -(-args.size // sample.shape[1]))
        )
        image = np.ascontiguousarray(image[: args.size, : args.size])
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(models, port)
        try:
            rows = latency(url, models, image, args.repeats)
            png = encode_png(image)
            level = args.throughput_level
            tput = [throughput(url, png, level, c, args.requests) for c in (1, 4, 16)]
            sizes = batch_sizes(url, f"L{level}")
        finally:
            server.terminate()
            server.wait(timeout=60)
        manifest = read_manifest(models)
    result = {
        "repository": f"{name}: {manifest.name} {manifest.version}, "
        + ", ".join(f"{g.name} {g.parameters:,} params" for g in manifest.graphs),
        "weights": "as given (--models)" if args.models else "untrained, built by this script",
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "image": f"{args.size}x{args.size} 16-bit grey PNG (synthetic nuclei)",
        "command": "python benchmarks/server_latency.py " + " ".join(sys.argv[1:]),
        "latency": rows,
        "throughput_graph": f"L{level}",
        "throughput": tput,
        "batch_sizes": sizes,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"server_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"server_{name}.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
