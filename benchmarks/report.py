"""Renders REPORT.md from every results/*.json present (and findings.md, written by hand).

    .venv/bin/python -m benchmarks.report          # benchmarks/REPORT.md
    .venv/bin/python -m benchmarks.report --quick  # runs/bench-quick/REPORT.md

Every study calls `render` after writing its JSON, so any study regenerates the whole report.
One section per known results file: to add a study, write a function `(data, place) -> str`
and list it in SECTIONS under the JSON file's stem. A JSON file without a section is still
listed at the end, so nothing measured goes unmentioned.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import Place, place, shown

Renderer = Callable[[dict[str, Any], Place], str]


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; `align` holds one of l/r per column (default: first l, others r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot(data: dict[str, Any], key: str, caption: str) -> str:
    name = data.get("plots", {}).get(key)
    return f"![{caption}](plots/{name})\n\n*{caption}*" if name else ""


def run_facts(data: dict[str, Any]) -> str:
    """The command, wall time, date and the load average around a study's run."""
    m = data.get("machine", {})
    quick = " (**--quick**: a smoke run, not a result)" if data.get("quick") else ""
    return (
        f"Command: `{data['command']}`{quick}; wall time {data['wall_s'] / 60:.1f} min; "
        f"run {m.get('date_utc', '?')}; load average (1/5/15 min) "
        f"{m.get('load_average_at_start')} at the start, {m.get('load_average_at_end')} at the end."
    )


def pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f}"


# --------------------------------------------------------------------------- studies


def paper_section(d: dict[str, Any], where: Place) -> str:
    seeds = d["seeds"]
    rows, frames, runs = _paper_rows(d), d["per_frame_iou_L4"], _paper_runs(d)
    frame_rows = [
        [key, *(f"{100 * v:.2f}" for v in values)]
        for key, values in frames.items()
        if key != "frames"
    ]
    return f"""## 1. The paper's Table 1 on HeLa nuclei (`paper`)

{run_facts(d)}

Data: Fluo-N2DH-HeLa (Cell Tracking Challenge), frames 0-13 train, 14-16 validation, 17-19
test (700x1100, 16-bit). Every network: `unetpp train --epochs {d["epochs"]}` ({d["steps_per_run"]}
steps of 8 random 96x96 crops, Adam 3e-4 with cosine annealing, BCE/2 + Dice), seed(s)
{", ".join(map(str, seeds))}; the checkpoint kept is the epoch with the best validation IoU of
the deepest head. IoU and Dice (%) on the three test frames, micro-averaged over whole frames,
threshold 0.5, PyTorch; with several seeds (the "seeds" column), their mean ± standard
deviation. Parameters with BN folded (as the paper counts). Latency: {d["latency_method"]}.

{md_table(["network", "seeds", "parameters", "IoU test", "Dice test", "IoU, seed's table", "IoU, 2018 paper", "ms@256 served"], rows)}

The paper's UNet++ w/ DS figure is set beside our ensemble (the average of the four heads, the
paper's accurate mode). Not served: `unetpp export` offers the ensemble (as a second output of
L4) only when it measures better than every single head on the validation frames, and it did
not; its latency would be L4's.

Per test frame, IoU (%) of each network's served graph (L4, onnxruntime), seed {seeds[0]}:

{md_table(["network", *frames["frames"]], frame_rows)}

{plot(d, "figure2", "Like the paper's Figure 2: the same test crops, ground truth and each network's served mask; per crop, the 160x160 window of the frame with the most wrong pixels summed over all networks (where they differ, not a typical view).")}

{plot(d, "curves", "Validation IoU of the deepest head after every epoch (seed " + str(seeds[0]) + ").")}

Runs:

{runs}
"""


def _paper_rows(d: dict[str, Any]) -> list[list[Any]]:
    """Table 1: each network's test IoU and Dice beside the paper's, its size and latency."""
    rows = []
    for r in d["rows"]:
        spread = f" ± {100 * r['iou_std']:.2f}" if r["iou_std"] is not None else ""
        paper = r["paper"] or {}
        lat = d["latency"].get(f"{r['network']}/{r['output']}")
        size = lat or d["latency"].get(f"{r['network']}/L4")  # the ensemble needs all of L4
        rows.append(
            [
                r["name"],
                ", ".join(map(str, r["seeds"])),
                f"{size['parameters']:,}" if size else "—",
                f"**{100 * r['iou_mean']:.2f}**{spread}",
                f"{100 * r['dice_mean']:.2f}",
                paper.get("seed_table", "—"),
                paper.get("paper_2018", "—"),
                f"{lat['ms_256']['median']:.1f}" if lat else "not served",
            ]
        )
    return rows


def _paper_runs(d: dict[str, Any]) -> str:
    """Each training run: steps, its best step, minutes and validation IoU."""
    return md_table(
        [
            "network",
            "seed",
            "steps",
            "best step",
            "train min",
            "val IoU (deepest)",
            "val IoU (ensemble)",
        ],
        [
            [
                r["network"],
                r["seed"],
                r["steps"],
                r["best_step"],
                f"{r['train_wall_s'] / 60:.1f}",
                f"{100 * r['val']['L4']['iou']:.2f}",
                pct(r["val"].get("ensemble", {}).get("iou"), 2),
            ]
            for r in d["runs"]
        ],
    )


def pruning_section(d: dict[str, Any], where: Place) -> str:
    rows = [
        [
            r["graph"],
            f"{r['parameters']:,}",
            f"{r['gflops_256']:.2f}",
            pct(r["iou_val"], 2),
            f"**{100 * r['iou_test']:.2f}**",
            pct(r["dice_test"], 2),
            f"{r['ms_frame']['median']:.0f}",
            f"{r['ms_256']['median']:.1f}",
        ]
        for r in d["rows"]
    ]
    claim = d["paper_claim"]
    compare = [
        [
            f"ours, {c['precision']}",
            f"{c['time_saved_pct_frame']:.1f}%",
            f"{c['time_saved_pct_256']:.1f}%",
            f"{c['gflops_saved_pct']:.1f}%",
            f"{c['iou_lost_points']:+.2f}",
        ]
        for c in d["l3_vs_l4"]
    ]
    compare.append(
        [
            "paper (GPU, mean over its datasets)",
            f"{claim['time_saved_pct']}%",
            "",
            "",
            f"{claim['iou_lost_points']:+.2f}",
        ]
    )
    return f"""## 2. Pruning: accuracy against latency (`pruning`)

{run_facts(d)}

Repository `{d["repository"]}`; IoU/Dice (%) on the HeLa test frames by `{d["evaluate"]}`
(onnxruntime, the served graphs); IoU val: recorded in model.json at export. Latency:
{d["latency_method"]}; "frame" is a whole 700x1100 test frame (padded to {d.get("frame_input", "a multiple of 16")}).

{md_table(["graph", "parameters", "GFLOPs@256", "IoU val", "IoU test", "Dice test", "ms/frame", "ms@256"], rows)}

L3 against L4, in the paper's terms (time saved by serving L3 instead of L4, and the IoU points
it costs on the test frames):

{md_table(["", "time saved, frame", "time saved, 256x256", "GFLOPs saved", "IoU lost (points)"], compare)}

{plot(d, "curve", "IoU on the HeLa test frames against onnxruntime latency per frame, L1..L4, fp32 and int8.")}
"""


def levels_section(d: dict[str, Any], where: Place) -> str:
    peak = d["peak"]
    configs = sorted({(r["size"], r["batch"]) for r in d["rows"]})
    names = list(dict.fromkeys(r["graph"] for r in d["rows"]))
    cell = {(r["graph"], r["size"], r["batch"]): r for r in d["rows"]}
    heads = [f"{s}², batch {b}" for s, b in configs]
    eager = "PyTorch eager (full network)"
    peak_rate = d["peak_gflops_per_s"]

    def table(show: Callable[[dict[str, Any], dict[str, Any]], str], skip: str = "") -> list:
        return [
            [
                n,
                *(
                    show(cell[n, s, b], cell[eager, s, b]) if (n, s, b) in cell else "—"
                    for s, b in configs
                ),
            ]
            for n in names
            if n != skip
        ]

    speed = table(lambda r, _: f"{r['ms_per_image']:.1f} ({r['images_per_s']:.1f}/s)")
    flops = table(
        lambda r, _: f"{r['gflops_per_s']:.0f} ({100 * r['gflops_per_s'] / peak_rate:.0f}%)"
    )
    vs = table(lambda r, e: f"{e['ms']['median'] / r['ms']['median']:.2f}x", skip=eager)
    return f"""## 3. Levels: latency, throughput and achieved GFLOP/s (`levels`)

{run_facts(d)}

Repository `{d["repository"]}`; {d["method"]}. Matrix-multiply peak ({peak["n"]}x{peak["n"]}
float32): numpy {peak["numpy"]["gflops_per_s"]:.0f} GFLOP/s, onnxruntime MatMul
{peak["onnxruntime"]["gflops_per_s"]:.0f} GFLOP/s; the better one, {d["peak_gflops_per_s"]:.0f}
GFLOP/s, is the reference below. int8 graphs do the same multiply-adds in int8, so their
"GFLOP/s" is the fp32-equivalent rate.

Milliseconds per image (images per second):

{md_table(["graph", *heads], speed)}

Achieved GFLOP/s (share of the measured fp32 matmul peak):

{md_table(["graph", *heads], flops)}

Speed-up over PyTorch eager running the full network (its median time / the graph's):

{md_table(["graph", *heads], vs)}

{plot(d, "chart", "Per graph: ms per image (log) and achieved GFLOP/s against the matmul peak.")}
"""


def server_section(d: dict[str, Any], where: Place) -> str:
    over, load = _server_overhead_rows(d), _server_load_rows(d)
    b = d["bounds"]
    mem = [
        [
            str(m["memory_arena"]).lower(),
            f"{m['rss_after_start_mb']:,} MB",
            f"**{m['peak_rss_mb']:,} MB**",
            f"{m['request_s']:.1f}",
            f"{m['server_inference_ms']:.0f}",
        ]
        for m in d.get("memory", [])
    ]
    mem_image = d["memory"][0]["image"] if d.get("memory") else ""
    return f"""## 4. Server under load (`server`)

{run_facts(d)}

Repository `{d["repository"]}`; server: {d["server"]}; image: {d["image"]}; all traffic on
127.0.0.1. The benchmark process and the server share the 2 cores.

Overhead at concurrency 1 (medians of {b["repeats"]} interleaved pairs): end to end is
PNG in, PNG mask out over HTTP (decode, normalisation, routing, queue, inference, threshold,
PNG encoding); onnxruntime alone is `session.run` on the same preprocessed input in the
benchmark process; the server's own inference is its X-UNetPP-Inference-Ms. "onnxruntime
alone" runs in another process than the server's sessions and swings with the shared CPU's load
(several-fold between rounds); the last column, end to end minus the server's own inference
time for the same requests, is the steadier measure of what the HTTP service adds.

{md_table(["request", "graph", "onnxruntime alone (ms)", "server end to end (ms)", "overhead (ms)", "ratio", "server's inference (ms)", "end to end − server's inference (ms)"], over, "llrrrrrr")}

Closed-loop load (benchmarks/loadgen.py: asyncio + httpx, each cell at most {b["requests"]}
requests or {b["seconds"]:.0f} s): latency percentiles in ms, throughput in requests/s.

{md_table(["load", "concurrency", "requests", "s", "req/s", "p50", "p95", "p99", "served by", "errors"], load, "lrrrrrrrll")}

Batch sizes the server formed (graph: size -> batches): {d["batches_served"]}.

Memory of a fresh server over one large request ({mem_image}; tiles of 512 overlapping by 64,
batches of up to 8), resident set from /proc (VmRSS after start-up, VmHWM for the peak):

{md_table(["UNETPP_MEMORY_ARENA", "after start-up", "peak", "request (s)", "server's inference (ms)"], mem)}

{plot(d, "load", "Throughput and p95 latency against concurrency, per load.")}
"""


def _server_overhead_rows(d: dict[str, Any]) -> list[list[Any]]:
    """Concurrency 1: end to end beside onnxruntime alone and the server's own inference."""
    return [
        [
            r["request"],
            r["graph"],
            f"{r['onnxruntime_ms']:.1f}",
            f"{r['server_ms']:.1f}",
            f"{r['overhead_ms']:+.1f}",
            f"{r['ratio']:.2f}",
            f"{r['server_inference_ms']:.1f}",
            f"{r['server_ms'] - r['server_inference_ms']:.1f}",
        ]
        for r in d["overhead"]
    ]


def _server_load_rows(d: dict[str, Any]) -> list[list[Any]]:
    """Closed-loop load: throughput, latency percentiles and errors per cell."""
    return [
        [
            c["load"],
            c["concurrency"],
            c["requests"],
            f"{c['wall_s']:.0f}",
            f"**{c['requests_per_s']:.2f}**",
            c.get("p50_ms", "—"),
            c.get("p95_ms", "—"),
            c.get("p99_ms", "—"),
            ", ".join(f"{k} {v}" for k, v in c.get("served_by", {}).items()) or "—",
            ", ".join(f"{k}: {v}" for k, v in c["statuses"].items() if k != "200") or "none",
        ]
        for c in d["load"]
    ]


def overhead_section(d: dict[str, Any], where: Place) -> str:
    """benchmarks/overhead.py: what the service adds at concurrency 1, before and after."""
    rows = d["rows"]
    table = md_table(
        ["request", "server", "graph", "end to end (ms)", "server's inference (ms)",
         "added: end to end − inference (ms)", "least added (ms)", "load average (1 min)"],
        [
            [
                r["target"], f"{r['version']} (`{r['commit']}`)", r["graph"], f"{r['e2e_ms']:.1f}",
                f"{r['inference_ms']:.1f}",
                f"**{r['added_ms']:.2f}** ({r['added_p10_ms']:.1f}..{r['added_p90_ms']:.1f})",
                f"{r['added_min_ms']:.2f}", "{:.1f}..{:.1f}".format(*r["load_1min"]),
            ]
            for r in rows
        ],
        "lllrrrrr",
    )  # fmt: skip
    timed = [r for r in rows if "spans_ms" in r]
    spans = md_table(
        ["request", "server", "decode", "queue", "render", "rest of total", "outside the handler"],
        [
            [
                r["target"], f"{r['version']} (`{r['commit']}`)",
                *(f"{r['spans_ms'][k]:.2f}" for k in ("decode", "queue", "render")),
                f"{r['rest_of_total_ms']:.2f}",
                f"{r['outside_handler_ms']:.2f}",
            ]
            for r in timed
        ],
        "llrrrrr",
    )  # fmt: skip
    nice = f", client and servers at niceness {d['nice']}" if d.get("nice") else ""
    by = {(r["target"], r["version"]): r["added_ms"] for r in rows}
    ratios = "; ".join(
        f"{t}: {by[t, 'before']:.1f} -> {by[t, 'after']:.1f} ms"
        for t in dict.fromkeys(r["target"] for r in rows)
        if (t, "before") in by and (t, "after") in by
    )
    return f"""## Service overhead at concurrency 1 (`overhead`)

{run_facts(d)}

Repository `{d["models"]}`; image: {d["image"]}; answer: a PNG mask. Two `unetpp serve` processes
(default settings) at once, the tree before the changes and after, each installed from a git
worktree; {rows[0]["requests"]} requests per server and request kind, one at a time, interleaved
(the order rotating each round, a {1000 * d["settle_s"]:.0f} ms pause before each), over
loopback from a bare HTTP/1.1 client on one keep-alive socket per server{nice} (httpx would
add about a millisecond of its own). *Added* is each request's end to end (the client's wall time) minus the
server's own inference time (X-UNetPP-Inference-Ms): median (10th..90th percentile), and the
least of all (the request that met the least contention). Before -> after (medians): {ratios}.
Goal: at most 3 ms.

{table}

Where the time goes, from the after server's Server-Timing (medians, ms): *decode* (decoding and
preprocessing; a small plain PNG's on the event loop, other images' in a thread), *queue*
(waiting for the batch to start), *render* (deciding and encoding), *rest of total* (routing
and the hops to the batcher's thread and back), *outside the handler* (end to end minus total:
HTTP parsing and writing, middleware, the client, the loopback connection).
{d.get("note", "")}

{spans}
"""


def training_section(d: dict[str, Any], where: Place) -> str:
    """benchmarks/train_hela.py: one UNet++ within a time budget (and domain transfer)."""

    def cells(m: dict[str, Any]) -> list[str]:
        return [
            f"{m[k]['iou']:.4f} / {m[k]['dice']:.4f}" if k in m else "—"
            for k in ("L1", "L2", "L3", "L4", "ensemble")
        ]

    def trained(r: dict[str, Any]) -> list[Any]:
        return [f"`{r['command']}`", r["steps"], f"{r['wall_s'] / 60:.1f}"]

    if "hela" in d:  # a full run: HeLa training and the synthetic <-> HeLa transfer
        h, s = d["hela"], d["synthetic"]
        rows = [
            ["HeLa test", *trained(h), *cells(h["test"])],
            ["synthetic test", "(the same HeLa model)", "", "", *cells(h["synthetic_test"])],
            ["synthetic test", *trained(s), *cells(s["test"])],
            ["HeLa test", "(the same synthetic model)", "", "", *cells(s["hela_test"])],
        ]
        load = (d["machine"]["load_average_at_start"], d["machine"]["load_average_at_end"])
    else:  # --score: one further checkpoint, trained by hand
        rows = [
            ["HeLa test", *trained(d), *cells(d["test"])],
            ["synthetic test", "(the same HeLa model)", "", "", *cells(d["synthetic_test"])],
        ]
        load = None
    extra = f" Load average {load[0]} at the start, {load[1]} at the end." if load else ""
    return (
        "IoU / Dice of each level."
        + extra
        + "\n\n"
        + md_table(
            ["tested on", "trained by", "steps", "train min", "L1", "L2", "L3", "L4", "ensemble"],
            rows,
            "lllrrrrrr",
        )
    )


def docker_section(d: dict[str, Any], where: Place) -> str:
    rows = [
        [
            f"`unetpp:{kind}`",
            d[kind]["extra"],
            f"{d[kind]['image_bytes'] / 1e6:.1f} MB",
            f"{d[kind]['over_base_mb']:.1f} MB",
        ]
        for kind in ("cpu", "gpu")
        if kind in d
    ]
    return f"""## Serving image sizes (`docker_images`)

Measured {d["measured"]}; base {d["base_bytes"] / 1e6:.1f} MB. Commands and notes:
[results/docker_images.md](results/docker_images.md).

{md_table(["image", "extra", "size", "over the base"], rows, "llrr")}
"""


def soak_section(d: dict[str, Any], where: Place) -> str:
    return "## Soak and overload (`soak`)\n\n" + soak_body(d, where)


def soak_body(d: dict[str, Any], where: Place) -> str:
    """benchmarks/soak.py: memory over a long run, answers per kind of request, overload."""
    m, o, s = d["memory"], d["overload"], d["settings"]
    kinds = [
        [
            k["kind"],
            k["expect"],
            ", ".join(f"{status}: {n}" for status, n in k["statuses"].items()),
            k.get("p50_ms", "—"),
            k.get("p99_ms", "—"),
        ]
        for k in d["kinds"]
    ]
    met = "met" if m.get("growth_pct", 1e9) < m.get("goal_pct", 0) else "**not met**"
    served, refused = o["served"], o["refused_503"]
    surprises = "".join(f"\n- `{k}`: {v}" for k, v in d["unexpected_examples"].items())
    arena = "" if s.get("memory_arena", True) else ", served with `UNETPP_MEMORY_ARENA=false`"
    floors = m.get("minute_floors_mb") or []
    floor = (
        f" The lowest reading of each whole minute after warm-up (the least work in flight: what"
        f" grows there stays) went from {floors[0]} to {floors[-1]} MB over {len(floors)} minutes"
        f" ({m['floor_growth_pct']:+.2f}%, trend {m['floor_slope_mb_per_min']:+.3f} MB/min)."
        if len(floors) > 1
        else ""
    )
    return f"""{run_facts(d)}

{s["minutes"]:g} min of mixed traffic from {s["clients"]} closed-loop clients
({d["requests"]:,} requests, {d["requests_per_s"]} per second), then {o["clients"]} clients
sending back to back for {o["seconds"]:.0f} s against `UNETPP_MAX_QUEUE={s["max_queue"]}`, then
idle{arena}; the server process's resident memory (VmRSS) every {s["sample_s"]:g} s.

**Memory.** Baseline {m.get("baseline_mb")} MB (median of the first {m.get("window_s", 60):g} s
after a {s["warmup_min"]:g}-minute warm-up), {m.get("end_of_soak_mb")} MB at the end of the soak:
**{m.get("growth_pct", 0):+.2f}%** (goal < {m.get("goal_pct")}%: {met}; linear trend
{m.get("slope_mb_per_min", 0):+.3f} MB/min). Peak under overload {m.get("overload_peak_mb")} MB;
after the idle phase {m.get("idle_end_mb")} MB ({m.get("idle_vs_baseline_pct", 0):+.2f}% of the
baseline).{floor}

**Answers.** {d["unexpected"]} of {d["requests"]:,} differed from the expected status; the server
was {"ready" if d["alive_after"] else "**not ready**"} afterwards.{surprises}

{md_table(["request", "expected", "statuses", "p50 ms", "p99 ms"], kinds, "lrlrr")}

**Overload.** Statuses {o["statuses"]}: {served["requests"]} served ({served.get("requests_per_s")}
per second, p50 {served.get("p50_ms", "—")} ms, p99 {served.get("p99_ms", "—")} ms),
{refused["requests"]} refused with 503 (p50 {refused.get("p50_ms", "—")} ms, p99
{refused.get("p99_ms", "—")} ms; Retry-After {o["retry_after_s"]} s), {o["unexpected"]} other.

{plot(d, "rss", "Resident memory of the server process through the soak, overload and idle phases")}"""


def attacks_section(d: dict[str, Any], where: Place) -> str:
    """benchmarks/attacks.py: each attack's memory, /healthz and normal latency, per tree."""
    body = "\n\n".join(_attacks_run(label, run) for label, run in d["runs"].items())
    return f"""## Attacks (`attacks`)

{run_facts(d)}

Issue 20's attacks on a real server process, one after another (each for the seconds shown in
the JSON), with probes running meanwhile: `/healthz` and a normal 256x256 PNG to `/v1/segment`
(default mode), each in a closed loop with a 5 s timeout (a timeout or dropped connection counts
as not answered and as 5 s). Each attack starts once no request of the last one is in flight;
peak RSS: VmHWM reset before it; RSS after: 3 s after it stopped. A watchdog kills the server
above its ceiling (the machine is shared) and the next attack starts a fresh one. Latencies are
those of the machine at the time (the load average of each attack is in the JSON): compare a
row with its run's (idle) row, not across machines.

{body}
"""


def _attacks_run(label: str, run: dict[str, Any]) -> str:
    """One tree's attacks: a row per attack after its idle row."""
    idle = run["idle"]
    probes = [_probe(idle["healthz"]), _probe(idle["normal_256"])]
    rows = [["(idle)", _gb(idle["rss_mb"]), "", *probes, "", ""]]
    rows += [
        [
            r["attack"],
            _gb(r["peak_rss_mb"]),
            _gb(r["rss_after_mb"]),
            _probe(r["healthz"]),
            _probe(r["normal_256"]),
            f"{r['log_bytes'] / 1e6:.2f}",
            _attack_note(r, run),
        ]
        for r in run["rows"]
    ]
    return f"""### {label}: `{run["tree"]}` at {run["commit"]}

{" and ".join(f"`{c}`" for c in run.get("commands", []))}. Settings: {_env(run["settings"])}; the server's open-file limit {run["open_files"]}; watchdog at
{run["rss_ceiling_gb"]} GB; repository `{run["models"]}`. {run.get("notes", "")}

{md_table(["attack", "peak RSS GB", "RSS after GB", "/healthz p99 ms (200s/sent)", "256x256 p99 ms (200s/sent)", "log MB", "what the attack saw"], rows)}"""


def _gb(mb: float | None) -> str:
    return "—" if mb is None else f"{mb / 1024:.2f}"


def _probe(p: dict[str, Any]) -> str:
    return f"{p['p99_ms']:.0f} ({p['answered']}/{p['sent']})"


def _env(env: dict[str, str]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in env.items()) or "defaults"


def _attack_note(r: dict[str, Any], run: dict[str, Any]) -> str:
    """What the attack saw, after whether the server was killed or gone."""
    own = r.get("settings", {})  # rows from before the field: the defaults
    other = f"(run with {_env(own)}) " if own != run["settings"] else ""
    killed = other + (f"**killed at {_gb(r['killed_at_mb'])} GB**; " if r["killed_at_mb"] else "")
    exited = "**server gone**; " if r["exited"] and not r["killed_at_mb"] else ""
    dropped = r.get("connections_dropped")
    closed = f"; closed by the server: {json.dumps(dropped)}" if dropped else ""
    return killed + exited + (json.dumps(r["attack_saw"]) + closed).replace("|", "/")[:220]


def adaptive_section(d: dict[str, Any], where: Place) -> str:
    """benchmarks/adaptive.py: fixed graphs against the cascade on three sets."""
    parts = []
    for name, data in d["sets"].items():
        goal = d["goals"][name]
        rows = [
            [
                f"**{r['name']}**" if r["kind"] == "cascade" else r["name"],
                f"{100 * r['iou']:.2f}",
                f"{r['ms_mean']:.0f}",
                " / ".join(f"{100 * v:.0f}" for v in r["reached"]) if "reached" in r else "",
            ]
            for r in data["rows"]
        ]
        verdict = "; ".join(
            f"{a['name']}: {a['iou_lost_points']:+.2f} points at {a['time_ratio']:.2f}x"
            + (f" (dominated by {', '.join(a['dominated_by'])})" if a["dominated_by"] else "")
            for a in goal["adaptive"]
        )
        parts.append(
            f"""### {name}: {data["images"]} images, {data["windows"]} windows

{md_table(["variant", "IoU %", "ms/image", "% of windows reaching L1 / L2 / L3 / L4"], rows)}

Against {goal["reference"]} ({100 * goal["reference_iou"]:.2f}, {goal["reference_ms"]:.0f} ms; goal:
{goal["goal"]}): {verdict}. Every window escalated all the way (`stages 1-4`) costs
{goal["never_pay_twice"]:.2f}x L4 alone (goal <= 1.15x)."""
        )
    quality = [
        [
            k,
            v["images"],
            f"{v['spearman_images']:+.2f}",
            v["blocks"],
            f"{v['spearman_blocks']:+.2f}",
        ]
        for k, v in d["quality"].items()
    ]
    body = "\n\n".join(parts)
    npt = d["never_pay_twice_256"]
    return f"""## Adaptive depth (`adaptive`)

{run_facts(d)}

{d.get("note", "")}

Checkpoints: {", ".join(f"{k} `{v}`" for k, v in d["checkpoints"].items())}. Each exported with
its cascade calibrated on its own validation split (docs/adaptive.md). Every variant runs as
served (whole images up to 1 Mpixel, else 512-px tiles overlapping by 64), timed round-robin per
image ({d["rounds"]} rounds, the median per image, then the mean over images), onnxruntime
default threads, {"with" if d.get("memory_arena", True) else "without"} its memory arena; IoU
micro-averaged over the set. Cascade rows in bold.

{body}

Never pay twice, on its own: one {npt["size"]}x{npt["size"]} input, stages 1-4 (every head)
{npt["stages_ms"]:.0f} ms against L4 alone {npt["l4_ms"]:.0f} ms, medians of {npt["repeats"]}
interleaved runs: **{npt["ratio"]:.2f}x** (goal <= 1.15x).

The quality score (Dice between the L3 and L4 masks, from one pass of the network) against the
real IoU of L4: Spearman's rank correlation per image and per block of the image.

{md_table(["data", "images", "Spearman (images)", "blocks", "Spearman (blocks)"], quality)}
"""


def predict_section(d: dict[str, Any], where: Place) -> str:
    rows = d["rows"]
    table = md_table(
        ["where", "route", "--jobs", "run (median s)", "min..max s", "images/s", "fixed cost s"],
        [
            [
                r["where"],
                f"`{r['route']}`",
                r["jobs"],
                f"{r['run_s']['median'] / 1000:.2f}",
                f"{r['run_s']['min'] / 1000:.2f}..{r['run_s']['max'] / 1000:.2f}",
                f"**{r['images_per_s']:.2f}**",
                f"{r['fixed_s']:.2f}",
            ]
            for r in rows
        ],
        "llrrrrr",
    )
    pairs = {}
    for r in rows:
        pairs.setdefault((r["route"], r["jobs"]), {})[r["where"]] = r["images_per_s"]
    ratios = ", ".join(
        f"`{route}` --jobs={jobs}: {p['here'] / p['server']:.2f}x"
        for (route, jobs), p in pairs.items()
        if {"here", "server"} <= set(p)
    )
    return f"""## `unetpp predict`: here against a server

{run_facts(d)}

{d["source"]}; model repository `{d["models"]}`. Each run is the whole
command (process start, model load or connection, decode, segment, write every frame) into a
fresh folder, timed to its exit; the configurations are interleaved, {rows[0]["run_s"]["repeats"]}
runs each. *Fixed cost*: the same command again on the finished folder (every output skipped):
process start, imports, opening the model or asking the server, listing. The server ran on the
same CPU, started and ready before the runs (`unetpp serve`, default settings).

{table}

Throughput here relative to the server (images/s, here / server): {ratios}.
"""


# file stem -> its section's renderer; the order is the report's
def slide_section(d: dict[str, Any], where: Place) -> str:
    """benchmarks/slide.py: a whole-slide BigTIFF through `unetpp predict` (core/slide.py)."""
    r = d["result"]
    through = r.get("through", "core.slide.segment_slide")
    rows = [[through, f"{r['pixels']:,}", r["seconds"], f"**{r['ns_per_pixel']}**",
             f"**{r['peak_rss_gb']}**", "{:.1f}-{:.1f}".format(
                 d["machine"]["load_average_at_start"][0], d["machine"]["load_average_at_end"][0])]]  # fmt: skip
    p = d.get("previous")
    if p:
        rows.append([f"before: {p['through']}", f"{p['pixels']:,}", p["seconds"],
                     p["ns_per_pixel"], p["peak_rss_gb"], "{:.1f}-{:.1f}".format(*p["load_average"])])  # fmt: skip
    before = (
        f"Before any of these: no path segmented it (decoded whole it is above "
        f"`UNETPP_MAX_PIXELS`, 40 MP, and the decoder's limit; its float32 input alone would be "
        f"{r['pixels'] * 4 / 2**30:.1f} GB)."
        if r["pixels"] > 40_000_000
        else ""
    )
    headers = ["segmented by", "pixels", "seconds", "ns per pixel", "peak RSS GB", "load"]
    return f"""## Whole-slide images (`slide`)

{run_facts(d)}

A {r["side"]:,} x {r["side"]:,} 16-bit tiled BigTIFF ({r["input_gb"]} GB, synthetic nuclei)
segmented by `{through}` in a child process: exact streamed percentiles, then
{r["windows"]:,} windows of {r["tile"]} px (overlap {r["overlap"]}, batch {r["batch"]},
{r["threads"]} onnxruntime threads) on graph {r["graph"]} of {d["model"]}, labels written as a
tiled BigTIFF as they are made. Peak RSS from `/usr/bin/time -v` (the whole child: Python,
onnxruntime, the model); seconds are the child's whole run for `unetpp predict` (start-up
included), the segmentation alone for `core.slide.segment_slide`. The load average is the
shared machine's at the start and end of each study: the times are upper bounds, and rows run
at different loads compare in memory, not in time.

{md_table(headers, rows, "lrrrrr")}

{before}
"""


def instances_section(d: dict[str, Any], where: Place) -> str:
    """benchmarks/instances.py: separate objects on the HeLa test frames, and their cost."""

    def varied(method: str) -> bool:
        return "footprint" in method or "min_area" in method

    methods = list(dict.fromkeys(r["method"] for r in d["scores"] if not varied(r["method"])))
    graphs = list(dict.fromkeys(r["graph"] for r in d["scores"]))
    by = {(r["graph"], r["method"]): r for r in d["scores"]}
    served = "distance"

    def cell(graph: str, method: str) -> str:
        r = by.get((graph, method))
        text = f"{r['ap50']:.3f} / {r['f1']:.3f}" if r else "—"
        return f"**{text}**" if method == served else text

    table = md_table(
        ["graph", "pixel IoU", *[f"{m} AP / F1" for m in methods]],
        [[g, f"{by[(g, methods[0])]['pixel_iou']:.3f}", *[cell(g, m) for m in methods]]
         for g in graphs],
        "lr" + "r" * len(methods),
    )  # fmt: skip
    deepest = [r for r in d["scores"] if varied(r["method"])]
    footprints = md_table(
        ["method", "AP@0.5", "precision", "recall", "F1", "TP", "FP", "FN"],
        [[r["method"], f"{r['ap50']:.3f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
          f"{r['f1']:.3f}", r["tp"], r["fp"], r["fn"]] for r in deepest],
        "lrrrrrrr",
    )  # fmt: skip
    timing = [_instances_timing(size, t) for size, t in d["timing"].items()]
    l4 = by.get((graphs[-1] if graphs[-1] != "ensemble" else "L4", served))
    whole = d["timing"]["whole"]["share_of_inference"]
    worst = max(v for k, v in whole.items() if k.startswith("render"))
    return f"""## Separate objects on HeLa (`instances`)

{run_facts(d)}

Model: `{d["models"]}`, {d["trained"] or "training not stated"}. Data: `{d["data"]}`, frames
{", ".join(d["frames"])} ({d["objects_in_reference"]} reference objects, the Cell Tracking
Challenge's ERR_SEG instance labels), whole 700x1100 frames. Objects matched one to one at
IoU >= 0.5; AP@0.5 = TP / (TP + FP + FN) (DSB2018 / StarDist), F1 = 2TP / (2TP + FP + FN).
The row *reference mask* splits the reference's own binary mask: what the splitting alone
reaches with a perfect foreground. Every method drops objects under
{d["split_parameters"]["min_area"]} px. The column *border objects left out* scores the served
method without the objects that touch the image border, on both sides: the reference labels
leave out most nuclei cut by the border, which the model finds (a measure of that gap, not
the goal's figure). Served method **distance** (`instances.split`, footprint
{d["split_parameters"]["footprint"]}, min radius {d["split_parameters"]["min_radius"]},
smoothing {d["split_parameters"]["smoothing"]}).

{table}

The served method's `min_area` and `footprint` (the square a seed is the deepest point of)
varied on {deepest[0]["graph"] if deepest else "the deepest graph"}:

{footprints}

Post-processing beside inference (interleaved, onnxruntime on this CPU; *render* = split,
per-object scores and encoding):

{chr(10).join(chr(10) + t for t in timing)}

Goals: L4 AP@0.5 >= 0.90: **{l4["ap50"]:.3f}** ({"met" if l4["ap50"] >= 0.9 else "not met"});
post-processing <= 20% of L1's inference on a whole frame: the costliest format takes
**{pct(worst)}%** ({"met" if worst <= 0.2 else "not met"}).
"""


def _instances_timing(size: str, t: dict[str, Any]) -> str:
    """Each post-processing step's milliseconds beside inference, at one image size."""
    rows = [
        [step, f"{ms['median']:.1f}", f"{ms['min']:.1f}..{ms['max']:.1f}",
         pct(t["share_of_inference"].get(step)) if step != "inference" else "100"]
        for step, ms in t["ms"].items()
    ]  # fmt: skip
    return (
        f"{t['width']}x{t['height']} ({size}), {t['objects']} objects, graph {t['graph']}:\n\n"
        + md_table(["step", "median ms", "min..max", "% of inference"], rows, "lrrr")
    )


def backends_section(d: dict[str, Any], where: Place) -> str:
    """benchmarks/backends.py: onnxruntime against OpenVINO per graph, size, batch, precision."""
    rows = d["rows"]
    variants = list(dict.fromkeys((r["backend"], r["precision"]) for r in rows))
    cells: dict[tuple, dict[tuple, dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["graph"], r["size"], r["batch"]), {})[
            (r["backend"], r["precision"])
        ] = r

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "—"
        median = r.get("median_cut_agreement")
        return (
            f"{r['ms_per_image']:.1f} (x{r['speedup_vs_ort_fp32']:.2f}, "
            f"{100 * r['mask_agreement']:.2f}%"
            + (f" / {100 * median:.2f}%)" if median is not None else ")")
        )

    table = md_table(
        ["graph", "size", "batch", *(f"{b} {p}" for b, p in variants), "load average"],
        [
            [
                *key,
                *(cell(c.get(v)) for v in variants),
                " ".join(map(str, next(iter(c.values()))["load_average"])),
            ]
            for key, c in cells.items()
        ],
    )
    exported = md_table(
        ["graph", "precision", "backend", "IoU", "data", "ms at 256 (export)"],
        [
            [e["graph"], e["precision"], e["backend"], pct(e["iou"], 2), e["data"] or "—",
             e["latency_ms"].get("256", "—")]
            for e in d.get("exported", [])
        ],
        "lllrlr",
    )  # fmt: skip
    return f"""## Backends: onnxruntime against OpenVINO (`backends`)

{run_facts(d)}

Repository `{d["models"]}`; images: crops of `{d.get("data", "synthetic")}` (validation
split); OpenVINO {d["openvino"]}. Each cell: milliseconds per image (median of rounds, the
variants taking turns, each opened alone), its speed-up over onnxruntime fp32 of the same
graph, size and batch, and the share of mask pixels equal to onnxruntime fp32's at the
manifest's threshold / at the median of onnxruntime fp32's logits (half the pixels on each
side). bf16 is the fp32 file run by OpenVINO in bf16.{" " + d["note"] + "." if d.get("note") else ""}

{table}

What the export measured on the same repository (the manifest: IoU in % on its validation
data, run by the entry's backend; latency at 256x256, batch 1, during the export):

{exported}
"""


def startup_section(d: dict[str, Any], where: Place) -> str:
    """benchmarks/startup.py: process start to ready and to the first answer, before/after."""
    rows = d["rows"]

    def spread(r: dict[str, Any], key: str) -> str:
        values = [run[key] for run in r["runs"]]
        return f"**{r[key]:.1f}** ({min(values):.1f}..{max(values):.1f})"

    table = md_table(
        ["server", "graphs", "listening s", "sessions open s", "ready s", "first answer s",
         "load average (1 min) per run"],
        [
            [
                f"{r['version']} (`{r['commit']}`)", r["graphs"], f"{r['listening_s']:.1f}",
                f"{r['sessions_s']:.1f}", spread(r, "ready_s"), spread(r, "first_answer_s"),
                ", ".join(f"{run['load_average'][0]:.1f}" for run in r["runs"]),
            ]
            for r in rows
        ],
        "lrrrrrr",
    )  # fmt: skip
    by = {(r["version"], r["graphs"]): r for r in rows}
    ratios = ", ".join(
        f"{n} graph(s) {by['before', n]['ready_s'] / by['after', n]['ready_s']:.1f}x"
        for n in sorted({r["graphs"] for r in rows})
        if ("before", n) in by and ("after", n) in by
    )
    return f"""## Start-up time (`startup`)

{run_facts(d)}

`unetpp serve` started as a subprocess on a repository of one graph (L1 fp32) and of eight
(L1..L4 fp32 and int8) of the full-width UNet++ (`{d["models"]}`, untrained weights: latency
does not depend on them), timed from just before the process starts: *listening* (the first
answer of `/readyz`), *sessions open* (the server's log line saying its graphs are loaded),
*ready* (`/readyz` 200) and *first answer* (a {d["image"]} sent to `/v1/segment` as soon as it
is ready, answered). *before* is the server that calibrated every graph at start-up (each at
the reference and the tile size, warm-up and repeats); *after* probes each graph once at the
reference size and refines in the background. Medians of {len(rows[0]["runs"])} interleaved
runs (min..max in brackets). Ready, before over after: {ratios}. The goal is ready within 5 s
with eight graphs; the load average says how far this shared CPU was from idle.

{table}
"""


def tiles_section(d: dict[str, Any], where: Place) -> str:
    """benchmarks/tiles.py: per graph, cost per output pixel at each tile side; the large
    request before and after."""
    rates = d["rates"]
    overlap = d["overlap"]
    sides = sorted({int(k.split("x")[1]) for t in rates.values() for k in t["runs"]})

    def cell(graph: str, side: int) -> str:
        """'batch 1 / batch B (xB)' at one side, the chosen run in bold."""
        t, out = rates[graph], []
        for run, ms in t["runs"].items():
            batch, s = (int(v) for v in run.split("x"))
            if s != side:
                continue
            us = f"{1000.0 * ms / (batch * (side - overlap) ** 2):.2f}" + (
                f" (×{batch})" if batch > 1 else ""
            )
            out.append(f"**{us}**" if (batch, side) == (t["batch"], t["side"]) else us)
        return " / ".join(out) or "—"

    rates_table = md_table(
        ["graph", *(f"{side}²" for side in sides)],
        [[g, *(cell(g, side) for side in sides)] for g in rates],
    )
    requests = md_table(
        ["graph", "server", "run (UTC)", "ns per pixel", "÷ best rate per output pixel",
         "÷ best raw rate", "tile (side × batch)", "peak RSS MB (over the request)",
         "RSS at rest MB", "load average (1 min) per run"],
        [
            [
                r["graph"], f"{r['server']} (`{r['commit']}`)", r.get("run_utc", "—"),
                f"**{r['ns_per_pixel']:.0f}**",
                f"{r['ratio_to_best_output']:.2f}x", f"{r['ratio_to_best_raw']:.2f}x",
                ", ".join(
                    f"{x['tile']['side']}×{x['tile']['batch']}" if x["tile"] else "512×≤8"
                    for x in r["runs"]
                ),
                f"**{r['peak_rss_mb']:,.0f}**",
                ", ".join(f"{x['rss_rest_mb']}" for x in r["runs"]),
                ", ".join(f"{x['load_average'][0]:.1f}" for x in r["runs"]),
            ]
            for r in d["requests"]
        ],
        "lllrrrlrrr",
    )  # fmt: skip
    return f"""## Tiles per graph (`tiles`)

{run_facts(d)}

Repository `{d["models"]}` (full-width UNet++, untrained weights: time and memory do not depend
on them). Microseconds per new output pixel (a window of side t adds (t - {overlap})² pixels to
a large image) of each run the server's background calibration measured at each side, at batch
1 / at the largest batch (×B) whose activations fit `UNETPP_TILE_BYTES`, read from
`/v1/models`; bold: the tile it chose (the fastest, or within 10% of it the fewest activation
bytes; — : not run, over the tile bytes).

{rates_table}

One {d["image"]} request on a fresh server holding that graph alone, after its background
calibration; the peak resident set (VmHWM) is reset just before the request
(`/proc/PID/clear_refs`), so it is the request's. *before* tiles at 512 in batches of up to
8; the ratios divide the request's inference time per pixel by the graph's best measured
rate (the table above: another server, minutes earlier; for a row from an earlier run, that
run's), per output pixel (given the overlap;
the goal: within 1.2x) and per input pixel; below 1, the calibration ran slower than the
request, the shared CPU's load having moved between them. Medians of the rounds, interleaved.

{requests}
"""


SECTIONS: dict[str, Renderer | None] = {
    "paper": paper_section,
    "pruning": pruning_section,
    "levels": levels_section,
    "server": server_section,
    "overhead": overhead_section,
    "gpu": None,  # no results file yet: the section says why
    "docker_images": docker_section,
    "soak": soak_section,
    "attacks": attacks_section,
    "adaptive": adaptive_section,
    "predict": predict_section,
    "slide": slide_section,
    "backends": backends_section,
    "instances": instances_section,
    "startup": startup_section,
    "tiles": tiles_section,
}
# stems rendered by one renderer under a shared heading
GROUPS: dict[str, tuple[str, str, Renderer]] = {
    "soak_": (
        "Soak variants (`soak --name NAME`)",
        "The same soak and overload with other server settings, beside the one above.",
        soak_body,
    ),
    "training_hela": (
        "Training within a time budget (`train_hela`)",
        "`.venv/bin/python -m benchmarks.train_hela` (30-minute budget, time-dependent: the step "
        "count depends on how busy the CPU was) and `--score CKPT --name NAME` for a further "
        "checkpoint; scored on the HeLa test frames 17-19.",
        training_section,
    ),
}


def render(where: Place) -> str:
    """Write where.report from every JSON in where.results; return the text."""
    results = {p.stem: json.loads(p.read_text()) for p in sorted(where.results.glob("*.json"))}
    parts = [_header(results, where)]
    findings = Path(__file__).with_name("findings.md")
    if where.base.name != "bench-quick" and findings.exists():
        parts.append(findings.read_text().strip())
    used = set()
    for stem, renderer in SECTIONS.items():
        if renderer is None:
            parts.append(_gpu())
        elif stem in results:
            parts.append(renderer(results[stem], where).strip())
            used.add(stem)
    for prefix, (title, intro, renderer) in GROUPS.items():
        stems = [s for s in results if s.startswith(prefix) and s not in used]
        if stems:
            body = [f"## {title}", intro]
            for stem in stems:
                body += [f"### `results/{stem}.json`", renderer(results[stem], where).strip()]
                used.add(stem)
            parts.append("\n\n".join(body))
    others = [s for s in results if s not in used]
    if others:
        parts.append(
            "## Other results files\n\n"
            + "\n".join(f"- [`results/{s}.json`](results/{s}.json)" for s in others)
        )
    text = "\n\n".join(p for p in parts if p) + "\n"
    where.report.parent.mkdir(parents=True, exist_ok=True)
    where.report.write_text(text)
    return text


def _header(results: dict[str, dict[str, Any]], where: Place) -> str:
    machines = [r["machine"] for r in results.values() if isinstance(r.get("machine"), dict)]
    m = next((m for m in machines if "cpu" in m), {})
    order = list(SECTIONS)
    studies = sorted(
        ((stem, r) for stem, r in results.items() if "study" in r and "wall_s" in r),
        key=lambda item: order.index(item[0]) if item[0] in order else len(order),
    )
    commands = md_table(
        ["study", "command", "wall time of this run", "run (UTC)"],
        [
            [
                s,
                f"`{r['command']}`",
                f"{r['wall_s'] / 60:.1f} min",
                r["machine"].get("date_utc", ""),
            ]
            for s, r in studies
        ],
        "llrl",
    )
    quick = " --quick" if where.base.name == "bench-quick" else ""
    results_dir = shown(where.results)
    return f"""# Benchmark report

Generated by `.venv/bin/python -m benchmarks.report{quick}` from the JSON in `{results_dir}/`
(every study re-renders it). Machine: {m.get("cpu", "?")}, {m.get("cpu_count", "?")} CPU cores,
{m.get("platform", "?")}; Python {m.get("python", "?")}, numpy {m.get("numpy", "?")},
onnxruntime {m.get("onnxruntime", "?")}, torch {m.get("torch", "?")}; GPU: {m.get("gpu", "?")}.
**The CPU is shared with other engineers' test runs**: every study records the load average at
its start and end, and every latency is the median of repeats interleaved across the things
compared, but absolute timings move by tens of percent between runs.

Each study is one command; `--quick` makes it a smoke run (a few steps of small networks, few
repeats) that writes to `runs/bench-quick/` instead, never into this report: about one to two
minutes each on this CPU when idle. Install with `.venv/bin/pip install -e '.[all,bench]'`.

{commands}"""


def _gpu() -> str:
    return """## 5. GPU

Not run: no GPU was lent to this session (the device tool's status reported
`can_start_another=false`). No CUDA, fp16 or TensorRT figure appears anywhere in this report."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="render runs/bench-quick/")
    args = parser.parse_args()
    where = place(args.quick)
    render(where)
    print(f"wrote {where.report}")


if __name__ == "__main__":
    main()
