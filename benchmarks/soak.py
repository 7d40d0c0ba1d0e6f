"""Soak and overload (benchmark, not CI): a real server process under minutes of mixed traffic,
then far more clients than its queue admits, then idle; its resident memory sampled from /proc.

    .venv/bin/python -m benchmarks.soak --models DIR      # 10 minutes
    .venv/bin/python -m benchmarks.soak --quick           # a 1-minute smoke run (runs/bench-quick)
    .venv/bin/python -m benchmarks.soak --models DIR --minutes 30

1. Starts `python -m unetpp.server` on a free loopback port (--models, default the paper
   study's UNet++ w/ DS) with UNETPP_MAX_QUEUE=--max-queue.
2. Soak: --clients closed-loop clients send a fixed, shuffled mix of requests: every mode and
   level, JSON/overlay/probabilities, PNG, JPEG and TIFF, sizes 64x64 to a tiled 1200x1100, and
   bad requests (truncated, not an image, GIF, a bad parameter, a 1 ms deadline). Each request
   has an expected answer; anything else (a 5xx, a 4xx for a good request, a dropped
   connection) is an error.
3. Overload: --overload-clients clients send a 256x256 image back to back for --overload-s
   seconds: admitted requests' latency, 503 + Retry-After for the rest and how fast.
4. Idle for --idle-s seconds.
RSS (VmRSS of the server process) every --sample-s seconds throughout. Growth = the median of
the last minute of the soak against the median of its first minute after --warmup-min, goal
< 5%; the lowest reading of each minute (the floor: the least work in flight) shows whether what
grows stays; the overload's and the idle phase's RSS against that baseline show whether memory
returns.
Writes results/soak.json (and re-renders the report) and results/soak.md.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks import loadgen
from benchmarks.common import (
    Study,
    add_repository_arguments,
    pyplot,
    repository,
    save_figure,
    shown,
)
from benchmarks.server import serving
from unetpp.core.datasets import synthetic_image
from unetpp.core.imageio import encode_png

GROWTH_GOAL_PCT = 5.0


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix and the answer it must get."""

    name: str
    content: bytes
    content_type: str
    params: dict[str, Any]
    expect: int  # the status every answer must have


def _image(height: int, width: int, seed: int) -> np.ndarray:
    image, _ = synthetic_image(np.random.default_rng(seed), 256)
    reps = (-(-height // 256), -(-width // 256))
    return np.ascontiguousarray(np.tile(image, reps)[:height, :width])


def _save(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def mix() -> list[Kind]:
    """The soak's requests; the list's multiplicities are the weights."""
    grey = _image(256, 256, 0)
    rgb8 = np.repeat((_image(200, 300, 1) >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    png = encode_png(grey)
    kinds = [
        Kind(f"mode={m}", png, "image/png", {"mode": m}, 200)
        for m in ("fast", "balanced", "accurate")
    ]
    kinds += [
        Kind(f"level={k} json", png, "image/png", {"level": k, "format": "json"}, 200)
        for k in (1, 2, 3, 4)
    ]
    kinds += [
        Kind("64x64 min_iou", encode_png(_image(64, 64, 2)), "image/png", {"min_iou": 0.5}, 200),
        Kind("jpeg overlay", _save(rgb8, "JPEG"), "image/jpeg", {"format": "overlay"}, 200),
        Kind(
            "tiff 16-bit budget",
            _save(_image(300, 200, 3), "TIFF"),
            "image/tiff",
            {"max_latency_ms": 500},
            200,
        ),
        Kind(
            "probabilities npy",
            png,
            "image/png",
            {"format": "probabilities", "encoding": "npy"},
            200,
        ),
        Kind(
            "tiled 1200x1100 L1", encode_png(_image(1200, 1100, 4)), "image/png", {"level": 1}, 200
        ),
        Kind("truncated png", png[: len(png) // 3], "image/png", {}, 400),
        Kind("not an image", b"hello" * 100, "application/octet-stream", {}, 400),
        Kind("gif", _save((grey >> 8).astype(np.uint8), "GIF"), "image/gif", {}, 415),
        Kind("level=9", png, "image/png", {"level": 9}, 422),
        Kind("deadline 1 ms", png, "image/png", {"deadline_ms": 1}, 504),
    ]
    return kinds


@dataclass
class Record:
    """Every answer the clients got: (kind, status, milliseconds); 0 for a dropped connection."""

    rows: list[tuple[str, int, float]] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)  # the first body of each surprise
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: Kind, status: int, ms: float, body: str) -> None:
        with self.lock:
            self.rows.append((kind.name, status, ms))
            if status != kind.expect:
                self.examples.setdefault(f"{kind.name}: {status}", body[:300])

    def statuses(self, name: str) -> Counter:
        return Counter(status for kind, status, _ in self.rows if kind == name)

    def latencies(self, name: str, status: int) -> list[float]:
        return [ms for kind, s, ms in self.rows if kind == name and s == status]


def send(http: httpx.Client, kind: Kind, record: Record) -> httpx.Response | None:
    start = time.perf_counter()
    try:
        r = http.post(
            "/v1/segment",
            content=kind.content,
            params=kind.params,
            headers={"content-type": kind.content_type},
        )
    except httpx.HTTPError as exc:
        record.add(kind, 0, 1000.0 * (time.perf_counter() - start), repr(exc))
        return None
    record.add(
        kind,
        r.status_code,
        1000.0 * (time.perf_counter() - start),
        r.text if r.status_code != 200 else "",
    )
    return r


def run_clients(
    url: str, kinds: list[Kind], clients: int, seconds: float, record: Record, seed: int
) -> float:
    """`clients` closed-loop clients, each cycling through its own shuffle of `kinds`."""
    stop_at = time.monotonic() + seconds

    def client(i: int) -> None:
        order = list(kinds)
        random.Random(seed + i).shuffle(order)
        n = 0
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < stop_at:
                send(http, order[n % len(order)], record)
                n += 1

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - start


class Sampler:
    """VmRSS of a process every `every_s` seconds, tagged with the phase it fell in."""

    def __init__(self, pid: int, every_s: float) -> None:
        self.pid, self.every_s = pid, every_s
        self.samples: list[dict[str, Any]] = []
        self.phase = "start"
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            t = time.monotonic() - self._start
            self.samples.append(
                {"t_s": round(t, 1), "rss_mb": round(self.rss_mb(), 1), "phase": self.phase}
            )

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def memory(samples: list[dict[str, Any]], warmup_s: float, window_s: float) -> dict[str, Any]:
    """Baseline (the first window after warm-up) and the end of the soak, the overload's peak and
    the idle phase, in MB and as growth over the baseline."""
    soak = [s for s in samples if s["phase"] == "soak"]
    t0 = soak[0]["t_s"] if soak else 0.0
    steady = [s for s in soak if s["t_s"] - t0 >= warmup_s]
    if len(steady) < 2:
        return {"note": "too few samples after warm-up"}
    first = [s["rss_mb"] for s in steady if s["t_s"] - steady[0]["t_s"] <= window_s]
    last = [s["rss_mb"] for s in steady if steady[-1]["t_s"] - s["t_s"] <= window_s]
    base = statistics.median(first)
    end = statistics.median(last)
    slope = np.polyfit([s["t_s"] for s in steady], [s["rss_mb"] for s in steady], 1)[0] * 60.0

    # the lowest reading of each whole minute: the least work in flight, so what grows here stays
    # (a leak or fragmentation) rather than being requests served
    floors: dict[int, float] = {}
    for s in steady:
        minute = int((s["t_s"] - steady[0]["t_s"]) // 60)
        floors[minute] = min(floors.get(minute, s["rss_mb"]), s["rss_mb"])
    floors.pop(int((steady[-1]["t_s"] - steady[0]["t_s"]) // 60), None)  # a part of a minute
    floor = list(floors.values())
    floor_growth = floor_slope = None
    if len(floor) > 1:
        floor_growth = round(100.0 * (floor[-1] - floor[0]) / floor[0], 2)
        floor_slope = round(float(np.polyfit(range(len(floor)), floor, 1)[0]), 3)

    def phase(name: str) -> list[float]:
        return [s["rss_mb"] for s in samples if s["phase"] == name]

    overload, idle = phase("overload"), phase("idle")
    return {
        "window_s": window_s,
        "baseline_mb": round(base, 1),
        "end_of_soak_mb": round(end, 1),
        "growth_pct": round(100.0 * (end - base) / base, 2),
        "goal_pct": GROWTH_GOAL_PCT,
        "slope_mb_per_min": round(float(slope), 3),
        "minute_floors_mb": [round(f, 1) for f in floor],
        "floor_from_s": steady[0]["t_s"],
        "floor_growth_pct": floor_growth,
        "floor_slope_mb_per_min": floor_slope,
        "max_soak_mb": round(max(s["rss_mb"] for s in soak), 1),
        "overload_peak_mb": round(max(overload), 1) if overload else None,
        "idle_end_mb": round(idle[-1], 1) if idle else None,
        "idle_vs_baseline_pct": round(100.0 * (idle[-1] - base) / base, 2) if idle else None,
    }


def plot_rss(samples: list[dict[str, Any]], rss: dict[str, Any], path: Path) -> None:
    """The samples of each phase, and the soak's floor (`rss`: what memory() measured)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for phase, colour in (("soak", "tab:blue"), ("overload", "tab:red"), ("idle", "tab:green")):
        points = [(s["t_s"] / 60.0, s["rss_mb"]) for s in samples if s["phase"] == phase]
        if points:
            ax.plot(*zip(*points, strict=True), ".-", color=colour, label=phase, markersize=3)
    floors = rss.get("minute_floors_mb") or []
    if floors:
        edges = [rss["floor_from_s"] / 60.0 + i for i in range(len(floors) + 1)]
        ax.stairs(
            floors,
            edges,
            baseline=None,
            color="black",
            linewidth=1.5,
            label="floor (lowest each minute)",
        )
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def per_kind(record: Record, kinds: list[Kind], wall_s: float) -> list[dict[str, Any]]:
    """Per kind: the statuses, and the latency of the answers that had the expected status."""
    return [
        {
            "kind": k.name,
            "expect": k.expect,
            "statuses": {str(s): n for s, n in sorted(record.statuses(k.name).items())},
            **loadgen.stats(record.latencies(k.name, k.expect), wall_s),
        }
        for k in kinds
    ]


def overload(url: str, clients: int, seconds: float) -> dict[str, Any]:
    """Back-to-back 256x256 requests from `clients` clients: served vs refused, and how fast."""
    kind = Kind("overload", encode_png(_image(256, 256, 5)), "image/png", {"mode": "fast"}, 200)
    record = Record()
    retry_after: Counter = Counter()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < stop_at:
                r = send(http, kind, record)
                if r is not None and r.status_code == 503:
                    retry_after[r.headers.get("retry-after", "none")] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    statuses = record.statuses(kind.name)
    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "statuses": {str(s): n for s, n in sorted(statuses.items())},
        "served": loadgen.stats(record.latencies(kind.name, 200), wall),
        "refused_503": loadgen.stats(record.latencies(kind.name, 503), wall),
        "retry_after_s": dict(retry_after),
        "unexpected": sum(n for s, n in statuses.items() if s not in (200, 503)),
    }


def main() -> None:
    args = _arguments()
    study = Study(args.name, args.quick, module="soak")
    models, _ = repository(args)
    kinds = mix()
    record = Record()
    env = {"UNETPP_MAX_QUEUE": str(args.max_queue)}
    if not args.memory_arena:
        env["UNETPP_MEMORY_ARENA"] = "false"
    with serving(models, env) as (url, proc):
        with Sampler(proc.pid, args.sample_s) as sampler:
            sampler.phase = "soak"
            print(f"soak: {args.minutes:g} min, {args.clients} clients", flush=True)
            soak_s = run_clients(url, kinds, args.clients, 60.0 * args.minutes, record, args.seed)
            sampler.phase = "overload"
            print(f"overload: {args.overload_clients} clients, {args.overload_s:g} s", flush=True)
            burst = overload(url, args.overload_clients, args.overload_s)
            sampler.phase = "idle"
            time.sleep(args.idle_s)
        alive = httpx.get(f"{url}/readyz").status_code == 200
    rss = memory(sampler.samples, 60.0 * args.warmup_min, 10.0 if args.quick else 60.0)
    plot_rss(sampler.samples, rss, study.where.plot_path(f"{args.name}_rss.png"))
    unexpected = sum(
        n for k in kinds for status, n in record.statuses(k.name).items() if status != k.expect
    )
    path = study.save(
        repository=shown(models),
        settings={
            "clients": args.clients,
            "minutes": args.minutes,
            "warmup_min": args.warmup_min,
            "sample_s": args.sample_s,
            "max_queue": args.max_queue,
            "memory_arena": args.memory_arena,
        },
        requests=len(record.rows),
        requests_per_s=round(len(record.rows) / soak_s, 2),
        unexpected=unexpected,
        unexpected_examples=record.examples,
        kinds=per_kind(record, kinds, soak_s),
        memory=rss,
        overload=burst,
        alive_after=alive,
        plots={"rss": f"{args.name}_rss.png"},
        rss_samples=sampler.samples,
    )
    _write_page(path, study)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_repository_arguments(parser)
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration (default 10)")
    parser.add_argument("--clients", type=int, default=4, help="soak clients (default 4)")
    parser.add_argument("--warmup-min", type=float, default=1.0)
    parser.add_argument("--sample-s", type=float, default=5.0, help="RSS every (default 5 s)")
    parser.add_argument("--max-queue", type=int, default=8, help="the server's (default 8)")
    parser.add_argument("--overload-clients", type=int, default=48)
    parser.add_argument("--overload-s", type=float, default=60.0)
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-memory-arena",
        dest="memory_arena",
        action="store_false",
        help="serve with UNETPP_MEMORY_ARENA=false",
    )
    parser.add_argument("--name", default="soak", help="results file name (default soak)")
    parser.add_argument("--quick", action="store_true", help="1 minute and short phases")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.warmup_min, args.sample_s = 1.0, 0.25, 2.0
        args.overload_s, args.idle_s = 10.0, 6.0
    return args


def _write_page(path: Path, study: Study) -> None:
    """The results' readable page beside their JSON, and a one-line summary."""
    from benchmarks.report import soak_body

    data = json.loads(path.read_text())
    path.with_suffix(".md").write_text(soak_body(data, study.where) + "\n")
    m = data["memory"]
    print(
        f"{data['requests']} requests, {data['unexpected']} unexpected; RSS "
        f"{m.get('baseline_mb')} -> {m.get('end_of_soak_mb')} MB ({m.get('growth_pct')}%), "
        f"after idle {m.get('idle_end_mb')} MB; overload {data['overload']['statuses']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
