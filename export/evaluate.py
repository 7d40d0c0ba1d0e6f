"""`unetpp evaluate DIR --data ...`: IoU, Dice and ms/image of every graph of a model repository
(for a multi-class model, the mean over the foreground classes and each class's IoU; for a
binary model on data with instance labels, as HeLa's, the separate objects' AP@0.5,
precision, recall and F1: docs/instances.md).

Pure onnxruntime and unetpp.core (no torch): it measures the served artifacts exactly as a
server runs them, on any machine that can serve them: a graph that needs a backend (bf16:
OpenVINO) runs on it, and is left out, with a log line, where that backend cannot run.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unetpp.core.backends import Session, backend, bf16_runs
from unetpp.core.datasets import Sample, load_split
from unetpp.core.inference import evaluate_session
from unetpp.core.manifest import Graph, load_repository, read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    graph: str
    precision: str
    level: int
    iou: float
    dice: float
    images: int
    ms_per_image: float
    classes: dict[str, dict[str, float]] = field(default_factory=dict)
    objects: dict[str, float | int] | None = None  # separate objects, where the data has them


OBJECT_COLUMNS = {"ap50": "AP@0.5", "precision": "obj P", "recall": "obj R", "f1": "obj F1"}


def evaluate_repository(
    directory: str | Path, samples: Sequence[Sample], *, threads: int | None = None
) -> list[Row]:
    """Every graph of the repository (hashes verified first) on `samples`, whole images."""
    manifest = load_repository(directory)
    sessions: dict[tuple[str, str], Session] = {}
    rows = []
    for graph in manifest.graphs:
        if graph.precision == "bf16" and not bf16_runs():
            log.warning("%s left out: OpenVINO does not compute in bf16 here", graph.name)
            continue
        key = (graph.file, graph.precision)
        if key not in sessions:
            sessions[key] = _open(Path(directory), graph, threads)
        session = sessions[key]
        ev = evaluate_session(
            lambda x, s=session, o=graph.output: s.run(x, o),
            samples,
            manifest.preprocessing,
            manifest.task,
        )
        log.debug(
            "%s: IoU %.4f, Dice %.4f, %.1f ms/image", graph.name, ev.iou, ev.dice, ev.ms_per_image
        )
        rows.append(
            Row(
                graph.name,
                graph.precision,
                graph.level,
                ev.iou,
                ev.dice,
                ev.images,
                ev.ms_per_image,
                ev.classes,
                ev.objects,
            )
        )
    return rows


def _open(directory: Path, graph: Graph, threads: int | None) -> Session:
    return backend(graph.backend or "onnxruntime").open(
        directory / graph.file, threads, graph.precision
    )


def format_table(rows: Sequence[Row]) -> str:
    classes = list(rows[0].classes) if rows else []
    head = "".join(f" {'IoU ' + c:>{max(9, len(c) + 4)}}" for c in classes)
    objects = OBJECT_COLUMNS if rows and rows[0].objects else {}
    head += "".join(f" {title:>7}" for title in objects.values())
    lines = [f"{'graph':<14} {'precision':<9} {'IoU':>7} {'Dice':>7} {'ms/image':>9}{head}"]
    for r in rows:
        per_class = "".join(f" {r.classes[c]['iou']:>{max(9, len(c) + 4)}.4f}" for c in classes)
        per_class += "".join(f" {r.objects[k]:>7.4f}" for k in objects) if r.objects else ""
        lines.append(
            f"{r.graph:<14} {r.precision:<9} {r.iou:>7.4f} {r.dice:>7.4f} "
            f"{r.ms_per_image:>9.1f}{per_class}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    task = read_manifest(args.directory).task
    samples = load_split(args.data, args.split, task=task, val_dir=args.val_dir)
    rows = evaluate_repository(args.directory, samples, threads=args.threads)
    if args.json:
        print(
            json.dumps({"data": f"{args.data}:{args.split}", "graphs": [asdict(r) for r in rows]})
        )
    else:
        print(f"{args.data}:{args.split}, {rows[0].images if rows else 0} images")
        print(format_table(rows))
    return 0
