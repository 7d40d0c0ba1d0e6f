"""Study 2 (pruning): accuracy against latency of L1..L4 (fp32 and int8) on the HeLa test
frames, against the paper's claim "L3: 32.2% less inference time for 0.6 IoU points".

    .venv/bin/python -m benchmarks.pruning                  # the paper study's UNet++ w/ DS
    .venv/bin/python -m benchmarks.pruning --models DIR     # any model repository
    .venv/bin/python -m benchmarks.pruning --quick          # the quick paper run's, 3 repeats

1. `unetpp evaluate REPO --data hela --split test --json`: IoU and Dice of every served graph
   on the test frames 17-19 (onnxruntime, no torch; what the server would answer);
2. latency of every graph, batch 1, on a whole test frame (700x1100, padded to 704x1104) and
   at 256x256, the graphs interleaved, median of --repeats;
3. a plot of IoU against latency, and L3 against L4 in the paper's terms.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    ROOT,
    Study,
    add_repository_arguments,
    interleaved_ms,
    pyplot,
    repository,
    save_figure,
    shown,
    summary_ms,
    unetpp,
)

PAPER_CLAIM = {"time_saved_pct": 32.2, "iou_lost_points": 0.6}


def measure(repo: Path, repeats: int) -> tuple[list[dict[str, Any]], str, str]:
    """Per graph: test scores (by `unetpp evaluate`) and latency; the evaluate command and the
    padded frame's size."""
    from unetpp.core.datasets import load_split
    from unetpp.core.inference import create_session, network_input, run_batch
    from unetpp.core.manifest import load_repository

    manifest = load_repository(repo)
    evaluate = [
        "evaluate",
        str(repo.relative_to(ROOT)),
        "--data",
        "hela",
        "--split",
        "test",
        "--json",
    ]
    scores = {g["graph"]: g for g in json.loads(unetpp(*evaluate))["graphs"]}
    frame = load_split("hela", "test")[0]
    inputs = {
        "frame": network_input(frame.image, manifest.preprocessing)[0][None],
        "256": np.random.default_rng(0).random(
            (1, manifest.in_channels, 256, 256), dtype=np.float32
        ),
    }
    sessions: dict[str, Any] = {}
    steps = {}
    for g in manifest.graphs:
        if g.file not in sessions:  # no arena: eight arenas at frame size held 10 GB
            sessions[g.file] = create_session(repo / g.file, memory_arena=False)
        session = sessions[g.file]
        for size, x in inputs.items():
            steps[f"{g.name}@{size}"] = lambda s=session, x=x, o=g.output: run_batch(s, x, o)
    times = interleaved_ms(steps, repeats, warmup=1)
    rows = [
        {
            "graph": g.name,
            "level": g.level,
            "precision": g.precision,
            "output": g.output,
            "parameters": g.parameters,
            "gflops_256": g.gflops,
            "iou_val": g.accuracy.iou if g.accuracy else None,
            "iou_test": round(scores[g.name]["iou"], 4),
            "dice_test": round(scores[g.name]["dice"], 4),
            "ms_frame": summary_ms(times[f"{g.name}@frame"]),
            "ms_256": summary_ms(times[f"{g.name}@256"]),
        }
        for g in manifest.graphs
    ]
    return rows, "unetpp " + " ".join(evaluate), "x".join(map(str, inputs["frame"].shape[-2:]))


def l3_vs_l4(rows: list[dict[str, Any]], precision: str) -> dict[str, Any] | None:
    by = {(r["level"], r["precision"]): r for r in rows if r["output"] == "logits"}
    l3, l4 = by.get((3, precision)), by.get((4, precision))
    if not (l3 and l4):
        return None
    return {
        "precision": precision,
        **{
            f"time_saved_pct_{size}": round(
                100 * (1 - l3[f"ms_{size}"]["median"] / l4[f"ms_{size}"]["median"]), 1
            )
            for size in ("frame", "256")
        },
        "gflops_saved_pct": round(100 * (1 - l3["gflops_256"] / l4["gflops_256"]), 1),
        "iou_lost_points": round(100 * (l4["iou_test"] - l3["iou_test"]), 2),
    }


def curve(path: Path, rows: list[dict[str, Any]], frame: str) -> None:
    fig, ax = pyplot().subplots(figsize=(6.4, 4))
    for precision, style in (("fp32", "o-"), ("int8", "s--")):
        pts = sorted(
            (r for r in rows if r["precision"] == precision and r["output"] == "logits"),
            key=lambda r: r["level"],
        )
        if not pts:
            continue
        xs = [r["ms_frame"]["median"] for r in pts]
        ys = [100 * r["iou_test"] for r in pts]
        ax.plot(xs, ys, style, label=precision)
        for r, x, y in zip(pts, xs, ys, strict=True):
            ax.annotate(r["graph"], (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    for r in rows:
        if r["output"] == "ensemble":
            ax.plot([r["ms_frame"]["median"]], [100 * r["iou_test"]], "k*", label=r["graph"])
    ax.set_xscale("log")
    ax.set_xlabel(f"onnxruntime ms per test frame ({frame}), batch 1, 2 shared CPU cores")
    ax.set_ylabel("IoU on HeLa test frames 17-19 (%)")
    ax.set_title("Pruned UNet++: accuracy against latency", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_repository_arguments(parser)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 repeats, the quick paper model")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    study = Study("pruning", args.quick)
    repo, _ = repository(args)
    rows, evaluate, frame = measure(repo, args.repeats)
    curve(study.where.plot_path("pruning_curve.png"), rows, frame)
    study.save(
        repository=shown(repo),
        evaluate=evaluate,
        frame_input=frame,
        latency_method=f"onnxruntime CPU (default threads, memory arena off), batch 1, median "
        f"of {args.repeats} runs after 1 warm-up, all graphs and sizes interleaved",
        rows=rows,
        l3_vs_l4=[c for p in ("fp32", "int8") if (c := l3_vs_l4(rows, p))],
        paper_claim=PAPER_CLAIM,
        plots={"curve": "pruning_curve.png"},
    )


if __name__ == "__main__":
    main()
