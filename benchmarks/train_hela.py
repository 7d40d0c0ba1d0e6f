"""Benchmark (not CI): train on real HeLa nuclei within a time budget, score every level on the
held-out frames 17-19, and measure transfer between domains (synthetic <-> HeLa).

    .venv/bin/python -m benchmarks.train_hela --budget 30 --synthetic-budget 8
    .venv/bin/python -m benchmarks.train_hela --quick    # half a minute each, runs/bench-quick/

1. `unetpp train --data hela --out runs/hela --time-budget BUDGET [--crop N] [--augment A]` (the
   command a user runs);
2. its best.pt scored with PyTorch on hela test (frames 17-19) and on synthetic test;
3. `unetpp train --data synthetic --out runs/synthetic --time-budget SYNTHETIC_BUDGET`, scored on
   synthetic test and on hela test (a microscope it never saw).
Writes benchmarks/results/NAME.json (--name, default training_hela) and re-renders
benchmarks/REPORT.md. Unlike the paper study this one is bounded by time, not steps, so its
result depends on how busy the CPU was.

    .venv/bin/python -m benchmarks.train_hela --score runs/hela_continued/best.pt --name NAME

only scores one more HeLa checkpoint (e.g. of a run continued with --resume) on the HeLa and the
synthetic test sets and writes benchmarks/results/NAME.json with the command that trained it
(from the checkpoint's own settings) and its metrics.jsonl history.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from benchmarks.common import ROOT, machine, place, save, shown, unetpp
from unetpp.core.datasets import load_split
from unetpp.model.checkpoint import load_checkpoint
from unetpp.model.config import TrainConfig
from unetpp.model.data import AUGMENTS
from unetpp.model.train import evaluate, format_table


def run_training(config: TrainConfig) -> dict:
    command = config.command_line()
    start = time.monotonic()
    unetpp(*shlex.split(command)[1:], capture=False)
    wall = time.monotonic() - start
    out = ROOT / config.out  # unetpp runs in ROOT
    records = history(out)
    best = load_checkpoint(out / "best.pt")
    return {
        "command": command,
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
    return evaluate(ckpt.build(), load_split(source, "test"), ckpt.preprocessing, ckpt.task)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=30.0, help="HeLa training minutes")
    parser.add_argument(
        "--synthetic-budget", type=float, default=8.0, help="synthetic training minutes"
    )
    parser.add_argument("--crop", type=int, default=96, help="HeLa training crop side")
    parser.add_argument(
        "--augment", choices=AUGMENTS, default="full", help="HeLa training augmentation"
    )
    parser.add_argument("--runs", type=Path, help="training folders (default runs/)")
    parser.add_argument("--quick", action="store_true", help="half a minute each, to bench-quick")
    parser.add_argument("--score", type=Path, help="only score this HeLa checkpoint")
    parser.add_argument("--name", default="training_hela", help="results file name, without suffix")
    args = parser.parse_args()
    if args.quick:
        args.budget = args.synthetic_budget = 0.5
    where = place(args.quick)
    runs = args.runs or (where.base if args.quick else ROOT / "runs")
    if args.score:
        ckpt = load_checkpoint(args.score)
        records = history(args.score.parent)
        scored = {
            "checkpoint": str(args.score),
            "command": TrainConfig.from_dict(ckpt.train_args).command_line(),
            "train_args": ckpt.train_args,
            "wall_s": records[-1]["elapsed_s"],
            "steps": records[-1]["step"],
            "best_step": ckpt.training["step"],
            "history": records,
            "val": ckpt.metrics,
            "test": score(args.score, "hela"),
            "synthetic_test": score(args.score, "synthetic"),
        }
        save(where, args.name, scored)
        print("HeLa test\n" + format_table(scored["test"]))
        print("synthetic test\n" + format_table(scored["synthetic_test"]))
        return
    result: dict = {"machine": machine()}
    hela = run_training(
        TrainConfig(
            "hela",
            shown(runs / "hela"),
            time_budget=args.budget,
            crop=args.crop,
            augment=args.augment,
        )
    )
    hela["test"] = score(runs / "hela" / "best.pt", "hela")
    hela["synthetic_test"] = score(runs / "hela" / "best.pt", "synthetic")
    result["hela"] = hela
    synthetic = run_training(
        TrainConfig("synthetic", shown(runs / "synthetic"), time_budget=args.synthetic_budget)
    )
    synthetic["test"] = score(runs / "synthetic" / "best.pt", "synthetic")
    synthetic["hela_test"] = score(runs / "synthetic" / "best.pt", "hela")
    result["synthetic"] = synthetic
    save(where, args.name, result)
    print(format_table(hela["test"]))


if __name__ == "__main__":
    main()
