"""Tiles at full speed: each graph's cost per output pixel at each tile side, and a 4096x4096
request before and after the tile is chosen per graph from those measurements.

    .venv/bin/python -m benchmarks.tiles [--rounds 2] [--graphs L1] [--before 4db9fbb] [--quick]

The full-width UNet++ (benchmarks/common.py `full_width_repository`, untrained weights: time
and memory do not depend on them). *Rates*: `unetpp serve` on L1..L4 fp32 and int8 measures
each graph in its background calibration (`UNETPP_TILE_SIDES` at batch 1 and the batch that
fits `UNETPP_TILE_BYTES`); the study reads those runs from /v1/models, so the figures are the
ones the server chose from. *Request*: a fresh server on one graph (the study waits for its
background calibration, then resets the process's peak resident set, /proc/PID/clear_refs)
answers one 4096x4096 16-bit PNG on that graph: the server's inference time per pixel, its
ratio to the graph's best measured rate, and the peak resident set (VmHWM) over the request.
*before* is commit `--before` (tile 512, batches of up to 8), installed from a git worktree as
benchmarks/startup.py does; *after* is this tree, with the memory arena on (the default) and
off. The configurations are interleaved, the order rotating each round; medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import ROOT, Study, free_port, full_width_repository, load_average, stop
from benchmarks.server import memory_kb
from benchmarks.startup import _head, install_before, subset
from unetpp.core.tiling import TILE_OVERLAP

WORK = ROOT / "runs" / "bench-tiles"
BEFORE = "4db9fbb"  # the tree before the per-graph tile
SIDE = 4096


def big_png(side: int) -> bytes:
    """A side x side 16-bit synthetic nuclei image (512-px synthetic images tiled)."""
    from unetpp.core.datasets import synthetic_image
    from unetpp.core.imageio import encode_png

    image, _ = synthetic_image(np.random.default_rng(0), 512)
    reps = -(-side // 512)
    return encode_png(np.ascontiguousarray(np.tile(image, (reps, reps))[:side, :side]))


@contextmanager
def serving(
    models: Path, site: Path | None, env: dict[str, str], log: Path
) -> Iterator[tuple[httpx.Client, subprocess.Popen]]:
    """`unetpp serve` (this tree's, or the one installed in `site`) on a free port, ready."""
    port = free_port()
    exe = (site / "bin" / "unetpp") if site else (ROOT / ".venv" / "bin" / "unetpp")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UNETPP_")}
    clean["UNETPP_TIMEOUT_MS"] = "900000"  # a shared CPU may take minutes for a large image
    if site:
        clean["PYTHONPATH"] = str(site)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out, tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.Popen(
            [str(exe), "serve", "--models", str(models), "--port", str(port)],
            cwd=cwd,  # this tree's unetpp/ must not shadow the installed one
            env={**clean, **env},
            stdout=out,
            stderr=out,
        )
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=900)
        try:
            wait(lambda: client.get("/readyz").status_code == 200, proc)
            yield client, proc
        finally:
            client.close()
            stop(proc)


def wait(done, proc: subprocess.Popen, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if done():
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} (see its log)")
        if time.monotonic() > deadline:
            raise SystemExit(f"not done after {timeout_s:.0f} s")
        time.sleep(0.5)


def graphs_info(client: httpx.Client) -> dict[str, dict[str, Any]]:
    (model,) = client.get("/v1/models").json()["models"]
    return {g["name"]: g for g in model["graphs"]}


def calibrated(client: httpx.Client, version: str) -> bool:
    """after: every graph's tile chosen; before: every graph measured at its tile size."""
    graphs = graphs_info(client).values()
    if version == "before":
        return all("calibrated" in g["latency_ms"]["sources"].values() for g in graphs)
    return all(g["tile"] for g in graphs)


def rates(models: Path) -> dict[str, dict[str, Any]]:
    """Every graph's measured tile runs and chosen tile, from a server on all of them."""
    with serving(models, None, {}, WORK / "logs" / "rates.log") as (client, proc):
        wait(lambda: calibrated(client, "after"), proc)
        return {name: g["tile"] for name, g in graphs_info(client).items()}


def one_request(
    version: str, models: Path, site: Path | None, env: dict[str, str], png: bytes, graph: str
) -> dict[str, Any]:
    log = WORK / "logs" / f"{version}-{graph}-{time.time():.0f}.log"
    with serving(models, site, env, log) as (client, proc):
        wait(lambda: calibrated(client, version), proc)
        tile = graphs_info(client)[graph].get("tile")
        startup_peak = memory_kb(proc.pid, "VmHWM")
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # the peak from here on
        rest = memory_kb(proc.pid, "VmRSS")
        load = load_average()
        start = time.perf_counter()
        r = client.post(
            "/v1/segment",
            content=png,
            params={"level": int(graph[1]), "format": "json"},  # the repository's one graph
            headers={"content-type": "image/png"},
        )
        wall = time.perf_counter() - start
        r.raise_for_status()
        timings = r.json()["timings"]
        return {
            "request_s": round(wall, 2),
            "inference_ms": float(r.headers["x-unetpp-inference-ms"]),
            "tiles": timings["tiles"],
            "largest_batch": timings["largest_batch"],
            "tile": tile and {k: tile[k] for k in ("side", "batch", "us_per_output_pixel")},
            "rss_rest_mb": round(rest / 1024),
            "peak_rss_mb": round(memory_kb(proc.pid, "VmHWM") / 1024),
            "startup_peak_rss_mb": round(startup_peak / 1024),
            "load_average": load,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="requests per configuration")
    parser.add_argument("--graphs", default="L1", help="graphs of the 4096x4096 request")
    parser.add_argument("--before", default=BEFORE, help="the commit to compare with")
    parser.add_argument(
        "--quick", action="store_true", help="1024x1024, one round, rates of --graphs only"
    )
    args = parser.parse_args(argv)
    study = Study("tiles", args.quick)
    side, rounds = (1024, 1) if args.quick else (SIDE, args.rounds)
    eight = full_width_repository(ROOT / "runs" / "bench-startup" / "eight")
    everything = None if not args.quick else tuple(args.graphs.split(","))
    measured = rates(subset(eight, WORK / ("quick" if args.quick else "all"), everything, schema=2))
    print(measured, flush=True)
    site = install_before(args.before)
    png = big_png(side)
    configurations = {
        "before": (site, {}),
        "after": (None, {}),
        "after, arena off": (None, {"UNETPP_MEMORY_ARENA": "false"}),
    }
    requests = []
    for graph in args.graphs.split(","):
        repos = {
            "before": subset(eight, WORK / f"before-{graph}", (graph,), schema=1),
            "after": subset(eight, WORK / f"after-{graph}", (graph,), schema=2),
        }
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configurations}
        names = list(configurations)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                site_or_none, env = configurations[name]
                version = name.split(",")[0]
                run = one_request(version, repos[version], site_or_none, env, png, graph)
                print(f"{graph} {name}: {run}", flush=True)
                runs[name].append(run)
        best_raw = min(ms / pixels(k) for k, ms in measured[graph]["runs"].items())
        for name, done in runs.items():
            ms = statistics.median(x["inference_ms"] for x in done)
            requests.append(
                {
                    "graph": graph,
                    "server": name,
                    "commit": args.before if name == "before" else _head(),
                    "ns_per_pixel": round(1e6 * ms / side**2, 1),
                    "ratio_to_best_raw": round(ms / side**2 / best_raw, 2),
                    "ratio_to_best_output": round(
                        1000 * ms / side**2 / measured[graph]["us_per_output_pixel"], 2
                    ),
                    "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in done),
                    "runs": done,
                }
            )
    now = datetime.now(UTC).isoformat(timespec="minutes")
    requests = [{**r, "run_utc": now} for r in requests]
    study.save(
        models=str(eight.relative_to(ROOT)), image=f"{side}x{side} 16-bit PNG",
        overlap=TILE_OVERLAP, rates=measured,
        requests=earlier_requests(study, args.graphs.split(",")) + requests,
    )  # fmt: skip


def earlier_requests(study: Study, graphs: list[str]) -> list[dict[str, Any]]:
    """The last run's requests on other graphs, each with the date of its run: a run on L4
    keeps L1's figures (their ratios are to that run's rates)."""
    path = study.where.results / "tiles.json"
    if not path.exists():
        return []
    last = json.loads(path.read_text())
    return [
        {"run_utc": last["machine"]["date_utc"][:16], **r}
        for r in last["requests"]
        if r["graph"] not in graphs
    ]


def pixels(run: str) -> int:
    """'<batch>x<side>' -> input pixels of that run."""
    batch, side = (int(v) for v in run.split("x"))
    return batch * side * side


if __name__ == "__main__":
    main()
