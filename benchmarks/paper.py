"""Study 1 (paper): the paper's Table 1 on the real HeLa nuclei, and a figure like its Figure 2.

    .venv/bin/python -m benchmarks.paper --threads 1 --parallel 4   # full: 4 networks x 3 epochs
    .venv/bin/python -m benchmarks.paper --seeds 0 1 2   # more seeds (finished runs are reused;
                                                         # --networks picks those of seeds 1, 2)
    .venv/bin/python -m benchmarks.paper --quick         # 6 steps of small networks each

(--threads 1 --parallel 4: four one-thread trainings at once, several times faster than one
two-thread training after another when other jobs crowd the two cores; results are the same for
a given thread count.)

For each network (U-Net, wide U-Net, UNet++ without and with deep supervision) and seed:
1. `unetpp train --data hela --epochs E --seed S ...`: the same number of steps (an epoch is
   146 steps of 8 crops of 96x96 on frames 0-13) and the same seed for every network, so the
   result does not depend on how busy the CPU is; best.pt is the epoch with the best
   validation IoU (frames 14-16) of the deepest head;
2. best.pt scored with PyTorch on the test frames 17-19: IoU and Dice of every head and, with
   deep supervision, of the ensemble (mean probability);
3. `unetpp export best.pt --out .../models` (int8 variants for UNet++ with deep supervision,
   which the pruning study uses).
Then, for the first seed's repositories: the latency of every served graph (onnxruntime, batch
1, 256x256, interleaved, median), and the qualitative figure: the same test crops, ground truth
and each network's served mask with its errors coloured. A finished run (its run.json) is
reused, so adding seeds trains only the new ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    ROOT,
    Study,
    interleaved_ms,
    pyplot,
    save_figure,
    summary_ms,
    unetpp,
)

# network key -> (name in the paper's Table 1, `unetpp train` flags)
NETWORKS: dict[str, tuple[str, list[str]]] = {
    "unet": ("U-Net", ["--arch", "unet"]),
    "wide_unet": ("wide U-Net", ["--arch", "wide_unet"]),
    "unetpp": ("UNet++ w/o DS", ["--no-deep-supervision"]),
    "unetpp_ds": ("UNet++ w/ DS", []),
}
# Cell nuclei IoU (%) as published: the seed's Table 1 and the 2018 paper (DLMIA), Table 3.
PAPER_IOU: dict[str, dict[str, float]] = {
    "unet": {"seed_table": 88.7, "paper_2018": 90.77},
    "wide_unet": {"seed_table": 89.2, "paper_2018": 90.92},
    "unetpp_ds": {"seed_table": 90.6, "paper_2018": 92.52},
}
STEPS_PER_EPOCH = 146  # 14 frames of 700x1100 / 96^2 crops / 8 per step
QUICK_CROPS = 48  # 6 steps
QUICK_WIDTHS = "8,16,32,64,128"  # a smoke run: every step of the study, on small networks
CROP = 160  # side of the figure's crops


def run_one(
    runs: Path, key: str, seed: int, epochs: int, quick: bool, export: bool, threads: int
) -> dict[str, Any]:
    """Train (unless already done with the same command), score on test, export (if asked:
    only the first seed's repositories are timed and drawn)."""
    from unetpp.core.datasets import load_split
    from unetpp.model.checkpoint import load_checkpoint
    from unetpp.model.train import evaluate

    rel = runs / f"{key}-s{seed}"  # relative to ROOT, where `unetpp` runs
    out = ROOT / rel
    train = ["train", "--data", "hela", "--out", str(rel), "--epochs", str(epochs)]
    train += ["--seed", str(seed), *NETWORKS[key][1]]
    if quick:
        train += ["--epoch-crops", str(QUICK_CROPS), "--widths", QUICK_WIDTHS]
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    command_line = "".join(f"{k}={v} " for k, v in env.items()) + "unetpp " + " ".join(train)
    done = out / "run.json"
    if done.exists():
        record = json.loads(done.read_text())
        if record["command"] == command_line and (record["repository"] or not export):
            print(f"{key} seed {seed}: reusing {done}", flush=True)
            return record
    print(f"{key} seed {seed}: {command_line}", flush=True)
    start = time.monotonic()
    unetpp(*train, capture=False, env=env)
    train_s = time.monotonic() - start
    ckpt = load_checkpoint(out / "best.pt")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    test = evaluate(ckpt.build(), load_split("hela", "test"), ckpt.preprocessing, ckpt.task)
    command = ["export", str(rel / "best.pt"), "--out", str(rel / "models")]
    if key != "unetpp_ds":
        command.append("--no-int8")
    elif quick:
        command += ["--calib-images", "1", "--ensemble", "never"]
    start = time.monotonic()
    if export:
        unetpp(*command)
    record = {
        "network": key,
        "seed": seed,
        "command": command_line,
        "export_command": "unetpp " + " ".join(command) if export else None,
        "train_wall_s": round(train_s, 1),
        "export_wall_s": round(time.monotonic() - start, 1),
        "steps": history[-1]["step"],
        "best_step": ckpt.training["step"],
        "best_epoch": ckpt.training["epoch"],
        "val": ckpt.metrics,
        "test": test,
        "val_iou_per_epoch": [
            {
                "step": r["step"],
                "epoch": r.get("epoch"),
                "iou": {k: v["iou"] for k, v in r["val"].items()},
            }
            for r in history
        ],
        "repository": str(rel / "models") if export else None,
    }
    done.write_text(json.dumps(record, indent=2) + "\n")
    return record


def served_graphs(repository: Path) -> list[Any]:
    from unetpp.core.manifest import load_repository

    return [g for g in load_repository(repository).graphs if g.precision == "fp32"]


def latency(records: dict[str, dict], repeats: int) -> dict[str, dict[str, Any]]:
    """ms of every fp32 served graph at 256x256, batch 1, interleaved across all networks."""
    from unetpp.core.inference import create_session, run_batch

    x = np.random.default_rng(0).random((1, 1, 256, 256), dtype=np.float32)
    steps, info = {}, {}
    for key, record in records.items():
        repo = ROOT / record["repository"]
        sessions: dict[str, Any] = {}
        for g in served_graphs(repo):
            session = sessions.setdefault(g.file, create_session(repo / g.file))
            name = f"{key}/{g.name}"
            steps[name] = lambda s=session, o=g.output: run_batch(s, x, o)
            info[name] = {"parameters": g.parameters, "gflops_256": g.gflops}
    times = interleaved_ms(steps, repeats, warmup=2)
    return {name: {**info[name], "ms_256": summary_ms(t)} for name, t in times.items()}


def served_masks(records: dict[str, dict]) -> tuple[list, dict[str, list[np.ndarray]]]:
    """Every network's served mask (its deepest fp32 graph) for each test frame."""
    from unetpp.core.datasets import load_split
    from unetpp.core.inference import create_session, predict_logits
    from unetpp.core.manifest import load_repository

    test = load_split("hela", "test")
    masks = {}
    for key, record in records.items():
        repo = ROOT / record["repository"]
        manifest = load_repository(repo)
        graph = next(g for g in manifest.graphs if g.name == "L4")
        session = create_session(repo / graph.file)
        masks[key] = [
            manifest.task.labels(predict_logits(session, s.image, manifest.preprocessing)) > 0
            for s in test
        ]
    return test, masks


def per_frame_iou(test: list, masks: dict[str, list[np.ndarray]]) -> dict[str, list[float]]:
    from unetpp.core.metrics import iou

    return {
        k: [round(iou(m, s.mask), 4) for m, s in zip(v, test, strict=True)]
        for k, v in masks.items()
    }


def pick_crops(test: list, masks: dict[str, list[np.ndarray]], count: int = 3) -> list[tuple]:
    """The CROP x CROP window (on a 32-pixel grid) of each test frame with the most wrong
    pixels summed over all networks: where they differ, not a typical view."""
    crops = []
    for f, sample in enumerate(test[:count]):
        errors = sum(m[f] != sample.mask for m in masks.values()).astype(np.int64)
        h, w = errors.shape
        best = max(
            ((errors[y : y + CROP, x : x + CROP].sum(), y, x)
             for y in range(0, h - CROP + 1, 32) for x in range(0, w - CROP + 1, 32)),
        )  # fmt: skip
        crops.append((f, best[1], best[2]))
    return crops


def figure(path: Path, test: list, masks: dict[str, list[np.ndarray]], crops: list[tuple]) -> None:
    from unetpp.core.metrics import iou

    cols = ["image", "ground truth", *[NETWORKS[k][0] for k in masks]]
    fig, axes = pyplot().subplots(
        len(crops), len(cols), figsize=(2.1 * len(cols), 2.3 * len(crops))
    )
    axes = np.atleast_2d(axes)
    for row, (f, y, x) in enumerate(crops):
        window = (slice(y, y + CROP), slice(x, x + CROP))
        image = test[f].image[window].astype(np.float32)
        lo, hi = np.percentile(image, (1, 99.8))
        truth = test[f].mask[window]
        panels = [np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1), truth.astype(np.float32)]
        titles = [f"{test[f].name} y{y} x{x}", "ground truth"]
        for key in masks:
            pred = masks[key][f][window]
            rgb = np.zeros((*pred.shape, 3), np.float32)
            rgb[pred & truth] = 1.0  # agreeing foreground: white
            rgb[pred & ~truth] = (1.0, 0.1, 0.1)  # false positive: red
            rgb[~pred & truth] = (0.1, 0.5, 1.0)  # false negative: blue
            panels.append(rgb)
            titles.append(f"{NETWORKS[key][0]}\nIoU {iou(pred, truth):.3f}")
        for ax, panel, title in zip(axes[row], panels, titles, strict=True):
            ax.imshow(panel, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.set_axis_off()
    fig.suptitle(
        "HeLa test crops: white = correct nucleus, red = false positive, blue = missed",
        fontsize=9,
    )
    save_figure(fig, path)


def curves(path: Path, records: dict[str, dict]) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 3.6))
    for key, record in records.items():
        points = record["val_iou_per_epoch"]
        deepest = "L4"
        ax.plot(
            [p["step"] for p in points],
            [p["iou"][deepest] for p in points],
            "o-",
            label=NETWORKS[key][0],
        )
    ax.set_xlabel("training step (8 crops of 96x96)")
    ax.set_ylabel("validation IoU (frames 14-16), deepest head")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def table(runs: list[dict]) -> list[dict[str, Any]]:
    """Rows of Table 1: per network and output, test IoU/Dice over the seeds (mean, spread)."""
    rows = []
    for key in NETWORKS:
        mine = [r for r in runs if r["network"] == key]
        if not mine:
            continue
        outputs = ["L1", "L2", "L3", "L4", "ensemble"] if key == "unetpp_ds" else ["L4"]
        for out in outputs:
            ious = [r["test"][out]["iou"] for r in mine]
            dices = [r["test"][out]["dice"] for r in mine]
            rows.append(
                {
                    "network": key,
                    "name": NETWORKS[key][0] + ("" if key != "unetpp_ds" else f" {out}"),
                    "output": out,
                    "seeds": [r["seed"] for r in mine],
                    "iou": [round(v, 4) for v in ious],
                    "dice": [round(v, 4) for v in dices],
                    "iou_mean": round(statistics.mean(ious), 4),
                    "iou_std": round(statistics.stdev(ious), 4) if len(ious) > 1 else None,
                    "dice_mean": round(statistics.mean(dices), 4),
                    # the paper's UNet++ w/ DS figure is its accurate mode: the heads' average
                    "paper": PAPER_IOU.get(key) if out == outputs[-1] else None,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="per network (default 3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--networks",
        nargs="+",
        choices=list(NETWORKS),
        default=list(NETWORKS),
        help="the networks of the seeds after the first (the first: all)",
    )
    parser.add_argument("--repeats", type=int, default=20, help="latency runs per graph")
    parser.add_argument(
        "--parallel", type=int, default=1, help="trainings at once (default 1: one after another)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for training (OMP_NUM_THREADS; 1 is faster on a crowded CPU)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="6 steps of small networks each, 3 latency runs"
    )
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds, args.repeats = 1, [0], 3
    study = Study("paper", args.quick)
    runs_dir = Path("runs") / ("bench-quick/paper" if args.quick else "paper")
    jobs = [(key, args.seeds[0]) for key in NETWORKS]
    jobs += [(key, seed) for seed in args.seeds[1:] for key in args.networks]
    if args.threads:
        torch.set_num_threads(args.threads)  # scoring in this process too

    def job(key_seed: tuple[str, int]) -> dict[str, Any]:
        key, seed = key_seed
        return run_one(
            runs_dir, key, seed, args.epochs, args.quick, seed == args.seeds[0], args.threads
        )

    with ThreadPoolExecutor(args.parallel) as pool:  # each run is a child process
        runs = list(pool.map(job, jobs))
    first = {r["network"]: r for r in runs if r["seed"] == args.seeds[0]}
    graphs = latency(first, args.repeats)
    test, masks = served_masks(first)
    crops = pick_crops(test, masks)
    figure(study.where.plot_path("paper_figure2.png"), test, masks, crops)
    curves(study.where.plot_path("paper_curves.png"), first)
    study.save(
        epochs=args.epochs,
        steps_per_run=runs[0]["steps"],
        seeds=args.seeds,
        rows=table(runs),
        runs=runs,
        latency=graphs,
        latency_method=f"onnxruntime CPU, batch 1, 256x256 random input, median of "
        f"{args.repeats} runs, every graph of every network interleaved (seed {args.seeds[0]}'s "
        "repositories; latency does not depend on the weights)",
        per_frame_iou_L4={"frames": [s.name for s in test], **per_frame_iou(test, masks)},
        figure_crops=[{"frame": test[f].name, "y": y, "x": x, "side": CROP} for f, y, x in crops],
        plots={"figure2": "paper_figure2.png", "curves": "paper_curves.png"},
    )


if __name__ == "__main__":
    main()
