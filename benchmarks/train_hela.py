"""Benchmark (not CI): train on real HeLa nuclei within a time budget, score every level on the
held-out frames 17-19, and measure transfer between domains (synthetic <-> HeLa).

    .venv/bin/python benchmarks/train_hela.py --budget 30 --synthetic-budget 8

1. `unetpp train --data hela --out runs/hela --time-budget BUDGET` (the command a user runs);
2. its best.pt scored with PyTorch on hela test (frames 17-19) and on synthetic test;
3. `unetpp train --data synthetic --out runs/synthetic --time-budget SYNTHETIC_BUDGET`, scored on
   synthetic test and on hela test (a microscope it never saw).
Writes benchmarks/results/NAME.json and NAME.md (--name, default training_hela).

    .venv/bin/python benchmarks/train_hela.py --score runs/hela_continued/best.pt --name NAME

only scores one more HeLa checkpoint (e.g. of a run continued with --resume) on the test frames
and writes benchmarks/results/NAME.json with its metrics.jsonl history.
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

import torch
from unetpp.core.datasets import load_split
from unetpp.model.checkpoint import load_checkpoint
from unetpp.model.train import evaluate, format_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run_training(source: str, out: Path, budget: float) -> dict:
    cmd = ["unetpp", "train", "--data", source, "--out", str(out), "--time-budget", str(budget)]
    start = time.monotonic()
    subprocess.run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], check=True)
    wall = time.monotonic() - start
    records = history(out)
    best = load_checkpoint(out / "best.pt")
    return {
        "command": " ".join(cmd),
        "wall_s": round(wall, 1),
        "steps": records[-1]["step"],
        "epochs_validated": len(records),
        "best_epoch": best.training["epoch"],
        "best_step": best.training["step"],
        "val": best.metrics,
        "history": records,
    }


def history(out: Path) -> list[dict]:
    """Step, elapsed time, training loss and per-level validation IoU of every validation."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        {
            "step": r["step"],
            "elapsed_s": r["elapsed_s"],
            "train_loss": r["train_loss"],
            "val_iou": {k: v["iou"] for k, v in r["val"].items()},
        }
        for r in lines
    ]


def score(checkpoint: Path, source: str) -> dict:
    ckpt = load_checkpoint(checkpoint)
    return evaluate(ckpt.build(), load_split(source, "test"), ckpt.preprocessing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=30.0, help="HeLa training minutes")
    parser.add_argument(
        "--synthetic-budget", type=float, default=8.0, help="synthetic training minutes"
    )
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--score", type=Path, help="only score this HeLa checkpoint")
    parser.add_argument("--name", default="training_hela", help="results file name, without suffix")
    args = parser.parse_args()
    if args.score:
        ckpt = load_checkpoint(args.score)
        scored = {
            "checkpoint": str(args.score),
            "train_args": ckpt.train_args,
            "best_step": ckpt.training["step"],
            "history": history(args.score.parent),
            "val": ckpt.metrics,
            "test": score(args.score, "hela"),
        }
        (RESULTS / f"{args.name}.json").write_text(json.dumps(scored, indent=2) + "\n")
        print(format_table(scored["test"]))
        return
    load = os.getloadavg()
    result: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": [round(v, 2) for v in load],
        },
    }
    hela = run_training("hela", args.runs / "hela", args.budget)
    hela["test"] = score(args.runs / "hela" / "best.pt", "hela")
    hela["synthetic_test"] = score(args.runs / "hela" / "best.pt", "synthetic")
    result["hela"] = hela
    synthetic = run_training("synthetic", args.runs / "synthetic", args.synthetic_budget)
    synthetic["test"] = score(args.runs / "synthetic" / "best.pt", "synthetic")
    synthetic["hela_test"] = score(args.runs / "synthetic" / "best.pt", "hela")
    result["synthetic"] = synthetic
    result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    h, s = r["hela"], r["synthetic"]
    return f"""# Training benchmark: HeLa nuclei (Fluo-N2DH-HeLa) and domain transfer

Produced by `.venv/bin/python benchmarks/train_hela.py` on {r["machine"]["cpu_count"]} CPU cores
(torch {r["machine"]["torch"]}, no GPU). The CPU was shared with other work during the run
(load average {r["machine"]["load_average_at_start"]} at the start,
{r["machine"]["load_average_at_end"]} at the end), so the step counts are lower than on an idle machine.

## HeLa: `{h["command"]}`

Wall time {h["wall_s"]} s, {h["steps"]} steps of 8 crops of 96x96; best validation at step
{h["best_step"]} (epoch {h["best_epoch"]}).

Test frames 17-19 (never trained or validated on), IoU and Dice per level:

```
{format_table(h["test"])}
```

Validation frames 14-16 (best.pt's recorded metrics):

```
{format_table(h["val"])}
```

## Domain transfer

| trained on | tested on | L1 IoU | L2 IoU | L3 IoU | L4 IoU | ensemble IoU |
|---|---|---|---|---|---|---|
{_row("HeLa", "HeLa test", h["test"])}
{_row("HeLa", "synthetic test", h["synthetic_test"])}
{_row("synthetic", "synthetic test", s["test"])}
{_row("synthetic", "HeLa test", s["hela_test"])}

Synthetic run: `{s["command"]}`, {s["wall_s"]} s, {s["steps"]} steps.
"""


def _row(trained: str, tested: str, m: dict) -> str:
    cells = " | ".join(
        f"{m[k]['iou']:.4f}" if k in m else "-" for k in ("L1", "L2", "L3", "L4", "ensemble")
    )
    return f"| {trained} | {tested} | {cells} |"


if __name__ == "__main__":
    main()
