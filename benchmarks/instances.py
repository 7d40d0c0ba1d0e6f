"""Separate objects on HeLa (core/instances.py): object AP@0.5, precision, recall and F1 per
level and per way of splitting touching nuclei, on the HeLa test frames 17-19 (whole frames,
instance labels from the Cell Tracking Challenge's ERR_SEG), and the time of post-processing
beside inference on a whole 700x1100 frame and on a 256x256 crop.

    .venv/bin/python -m benchmarks.instances --models runs/hela/models [--trained TEXT] [--quick]

The ways of splitting, each applied to every graph's thresholded mask and to the reference's
own binary mask (what splitting alone can reach):

- components: 4-connected components of the mask, nothing split;
- distance (served, `instances.split`): seeds at the maxima of the smoothed distance
  transform; a component with several seeds is cut between them (nearest seed);
- watershed-distance: scikit-image's watershed of the smoothed distance from the same seeds;
- watershed-probability: scikit-image's watershed of the probability map from the same seeds.

Every method drops objects under `instances.MIN_AREA` pixels. The served method is also scored
with the objects that touch the image border left out of both sides: the reference labels
leave out most nuclei cut by the border, which the model finds.

Timing (interleaved, medians): L1's onnxruntime run, `instances.split` alone, and the whole
rendering (split, per-object scores, encoding) of each object format, on the same logits.
Needs the `bench` extra (scikit-image) for the two watersheds.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from benchmarks.common import Study, interleaved_ms, shown, summary_ms
from unetpp.core import instances
from unetpp.core.datasets import load_split
from unetpp.core.inference import create_session, network_input, predict_logits, run_batch
from unetpp.core.manifest import load_repository
from unetpp.core.metrics import ObjectAccumulator, ScoreAccumulator
from unetpp.core.render import render
from unetpp.core.task import OBJECT_FORMATS, sigmoid

FOUR = ndi.generate_binary_structure(2, 1)
FOOTPRINTS = (15, 21, 31)  # the served method's footprint, varied on the deepest graph


def components(mask: np.ndarray, probability: np.ndarray) -> np.ndarray:
    return instances.drop_small(ndi.label(mask, FOUR)[0], instances.MIN_AREA)


def distance(mask: np.ndarray, probability: np.ndarray) -> np.ndarray:
    return instances.split(mask)


def watershed_distance(mask: np.ndarray, probability: np.ndarray) -> np.ndarray:
    from skimage.segmentation import watershed

    depth, seeds = instances.maxima(mask)
    return instances.drop_small(watershed(-depth, seeds, mask=mask), instances.MIN_AREA)


def watershed_probability(mask: np.ndarray, probability: np.ndarray) -> np.ndarray:
    from skimage.segmentation import watershed

    _, seeds = instances.maxima(mask)
    return instances.drop_small(watershed(-probability, seeds, mask=mask), instances.MIN_AREA)


METHODS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "components": components,
    "distance": distance,
    "watershed-distance": watershed_distance,
    "watershed-probability": watershed_probability,
}


def interior(labels: np.ndarray) -> np.ndarray:
    """The label image without the objects that touch the image's border."""
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return np.where(np.isin(labels, edge[edge > 0]), 0, labels)


def scores(models: Path, samples: list, graphs: list[str]) -> list[dict[str, Any]]:
    """Object scores of every (graph, method) with the graph's pixel IoU; the reference mask's
    too; the served method with the objects touching the image border left out on both sides
    (the reference leaves out most of them); its footprint and min_area varied on the last
    graph."""
    manifest = load_repository(models)
    cut = manifest.task.labels
    rows: dict[tuple[str, str], ObjectAccumulator] = {}
    pixels: dict[str, ScoreAccumulator] = {}

    def add(graph: str, method: str, labels: np.ndarray, true: np.ndarray) -> None:
        rows.setdefault((graph, method), ObjectAccumulator()).update(labels, true)

    for s in samples:
        for name, method in METHODS.items():
            add("reference mask", name, method(s.mask, s.mask.astype(np.float32)), s.objects)
    for name in graphs:
        graph = manifest.graph(name)
        session = create_session(models / graph.file)
        for s in samples:
            logits = predict_logits(session, s.image, manifest.preprocessing, graph.output)
            mask, probability = cut(logits) > 0, sigmoid(logits[0])
            pixels.setdefault(name, ScoreAccumulator()).update(mask, s.mask)
            for method_name, method in METHODS.items():
                labels = method(mask, probability)
                add(name, method_name, labels, s.objects)
                if method is distance:
                    add(
                        name,
                        "distance, border objects left out",
                        interior(labels),
                        interior(s.objects),
                    )
            if name == graphs[-1]:
                for min_area in (0, instances.MIN_AREA):
                    labels = instances.split(mask, min_area=min_area)
                    add(name, f"distance, min_area {min_area}", labels, s.objects)
                for footprint in FOOTPRINTS:
                    labels = instances.split(mask, footprint=footprint)
                    add(name, f"distance, footprint {footprint}", labels, s.objects)
    iou = {g: round(acc.iou, 6) for g, acc in pixels.items()}
    return [
        {"graph": g, "method": m, "pixel_iou": iou.get(g, 1.0), **acc.as_dict()}
        for (g, m), acc in rows.items()
    ]


def timing(models: Path, sample: Any, graph: str, repeats: int) -> dict[str, Any]:
    """Inference of `graph` beside post-processing, on the whole frame and a 256x256 crop."""
    manifest = load_repository(models)
    task, prep = manifest.task, manifest.preprocessing
    entry = manifest.graph(graph)
    session = create_session(models / entry.file)
    out: dict[str, Any] = {}
    for size, image in (("whole", sample.image), ("256x256", sample.image[:256, :256])):
        chw, _ = network_input(image, prep)
        logits = predict_logits(session, image, prep, entry.output)
        mask = task.labels(logits) > 0
        steps: dict[str, Callable[[], object]] = {
            "split": lambda mask=mask: instances.split(mask),
        }
        for fmt in OBJECT_FORMATS:
            steps[f"render {fmt}"] = lambda fmt=fmt, lg=logits, im=image: render(task, lg, im, fmt)
        run = {"inference": lambda chw=chw: run_batch(session, chw[None], entry.output)}
        times = {k: summary_ms(v) for k, v in interleaved_ms(run | steps, repeats).items()}
        inference = times["inference"]["median"]
        out[size] = {
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
            "graph": graph,
            "objects": int(instances.split(mask).max()),
            "ms": times,
            "share_of_inference": {
                k: round(v["median"] / inference, 3) for k, v in times.items() if k in steps
            },
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="a HeLa model repository")
    parser.add_argument("--trained", default="", help="how the model was trained (the report)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one frame, two repeats")
    args = parser.parse_args()
    study = Study("instances", args.quick)
    samples = load_split("hela", args.split)[: 1 if args.quick else None]
    manifest = load_repository(args.models)
    graphs = [g.name for g in manifest.graphs if g.precision == "fp32"]
    study.save(
        models=shown(args.models.resolve()),
        trained=args.trained,
        data=f"hela:{args.split}",
        frames=[s.name for s in samples],
        objects_in_reference=int(sum(len(np.unique(s.objects)) - 1 for s in samples)),
        split_parameters={
            "footprint": instances.FOOTPRINT,
            "min_radius": instances.MIN_RADIUS,
            "smoothing": instances.SMOOTHING,
            "min_area": instances.MIN_AREA,
        },
        scores=scores(args.models, samples, graphs),
        timing=timing(args.models, samples[0], "L1", 2 if args.quick else args.repeats),
    )


if __name__ == "__main__":
    main()
