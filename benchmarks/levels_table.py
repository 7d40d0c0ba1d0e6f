"""Benchmark (not CI): the per-level table of an exported checkpoint.

    .venv/bin/python benchmarks/levels_table.py runs/hela/best.pt --data hela

1. `unetpp export CHECKPOINT --out REPO` (the command a user runs: fp32 and int8, validation on
   the checkpoint's own val split, int8 calibrated on its training images);
2. `unetpp evaluate REPO --data DATA --split test --json` (IoU on held-out images, onnxruntime);
3. latency of every graph at 256x256 and 512x512, batch 1, median of --repeats runs;
4. writes benchmarks/results/export_levels.json and export_levels.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from unetpp.core.inference import create_session, measure_latency
from unetpp.core.manifest import load_repository

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SIZES = (256, 512)


def unetpp(*args: str) -> str:
    """Run the unetpp command as a user would; its stdout."""
    exe = Path(sys.executable).parent / "unetpp"
    return subprocess.run([str(exe), *args], check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="hela", help="test data for IoU (default hela)")
    parser.add_argument("--repository", default="runs/export/models", help="where to export")
    parser.add_argument("--label", default="", help="what the checkpoint is, for the report")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-export", action="store_true", help="reuse --repository")
    args = parser.parse_args()
    repo = Path(args.repository)

    export_cmd = ["export", args.checkpoint, "--out", str(repo)]
    start = time.monotonic()
    if not args.skip_export:
        unetpp(*export_cmd)
    export_s = time.monotonic() - start
    manifest = load_repository(repo)
    evaluate_cmd = ["evaluate", str(repo), "--data", args.data, "--split", "test", "--json"]
    test = {r["graph"]: r for r in json.loads(unetpp(*evaluate_cmd))["graphs"]}

    load_before = os.getloadavg()[0]
    rows = []
    for graph in manifest.graphs:
        session = create_session(repo / graph.file)
        ms = {
            str(size): round(
                measure_latency(
                    session, size, manifest.in_channels, graph.output, repeats=args.repeats
                ),
                2,
            )
            for size in SIZES
        }
        rows.append(
            {
                "graph": graph.name,
                "precision": graph.precision,
                "level": graph.level,
                "parameters": graph.parameters,
                "gflops_256": graph.gflops,
                "iou_val": graph.accuracy.iou if graph.accuracy else None,
                "iou_test": round(test[graph.name]["iou"], 4),
                "dice_test": round(test[graph.name]["dice"], 4),
                "test_images": test[graph.name]["images"],
                "ms": ms,
            }
        )
    fp32 = {r["graph"]: r for r in rows if r["precision"] == "fp32"}
    for r in rows:
        base = fp32.get(r["graph"].removesuffix(".int8"))
        if r["precision"] == "int8" and base:
            r["int8_speedup"] = {s: round(base["ms"][s] / r["ms"][s], 2) for s in r["ms"]}
    report = {
        "checkpoint": args.checkpoint,
        "label": args.label,
        "checkpoint_sha256": manifest.checkpoint_sha256,
        "test_data": f"{args.data}:test",
        "commands": ["unetpp " + " ".join(export_cmd), "unetpp " + " ".join(evaluate_cmd)],
        "export_s": round(export_s, 1) if not args.skip_export else None,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)",
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "latency": f"onnxruntime CPU, batch 1, median of {args.repeats} runs after 2 warm-ups",
        "ensemble": manifest.extra.get("ensemble"),
        "int8": manifest.extra.get("int8"),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export_levels.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "export_levels.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        "# Exported graphs: size, accuracy and latency per level",
        "",
        f"Checkpoint `{report['checkpoint']}`: {report['label'] or 'no label'}; "
        f"sha256 `{report['checkpoint_sha256'][:12]}`. IoU val: recorded in model.json at export; "
        f"IoU/Dice test: `{report['test_data']}` via `unetpp evaluate` (onnxruntime).",
        "",
        f"Latency: {report['latency']}, {report['machine']}; load average "
        f"{report['load_average'][0]} before, {report['load_average'][1]} after: "
        "**the CPU was shared, so timings are noisy and only comparable within this table.**",
        "",
        "| graph | precision | parameters | GFLOPs@256 | IoU val | IoU test | Dice test "
        "| ms@256 | ms@512 | int8 speed-up 256/512 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        speed = r.get("int8_speedup")
        speedup = f"{speed['256']:.2f}x / {speed['512']:.2f}x" if speed else ""
        iou_val = "n/a" if r["iou_val"] is None else f"{r['iou_val']:.4f}"
        lines.append(
            f"| {r['graph']} | {r['precision']} | {r['parameters']:,} | {r['gflops_256']:.2f} "
            f"| {iou_val} | {r['iou_test']:.4f} "
            f"| {r['dice_test']:.4f} | {r['ms']['256']:.1f} | {r['ms']['512']:.1f} "
            f"| {speedup} |"
        )
    ens, int8 = report["ensemble"] or {}, report["int8"] or {}
    lines += [
        "",
        f"Ensemble decision: `{json.dumps(ens)}`.",
        "",
        f"int8 (margin {int8.get('margin_iou')} IoU, {int8.get('calibration_images')} "
        f"calibration images): left out {[r['name'] for r in int8.get('rejected', [])] or 'none'}.",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in report["commands"]) + "; then this script.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
