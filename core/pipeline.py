"""The local inference pipeline: preprocess -> plan -> route -> tile -> run, synchronous.

One pipeline, two front ends: `unetpp predict` runs it on a model repository on this machine;
the server wraps its pure steps (`prepare`, `plan`, `candidates`, `choose`) with admission and
batching. Torch-free (numpy and a backend, core/backends.py). Decoding (core/imageio.py) comes
before it and deciding and rendering (the task, core/render.py) after it, on the logits it
returns.

Routing here predicts a graph's latency from the manifest's export-time figures (scaled to the
request's pixels), since nothing is measured live; the rules are core/routing.py's.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unetpp.core import tiling
from unetpp.core.backends import OnnxRuntime, Session, backend, open_graphs
from unetpp.core.inference import shrinking_arena
from unetpp.core.manifest import DEFAULT_BACKEND, Graph, Manifest, load_repository
from unetpp.core.preprocess import Preprocessing, crop_to, network_input
from unetpp.core.routing import Candidate, Choice, Mode, Route, choose

# the server's Settings use the same defaults (a test holds them together)
DEFAULT_MODE: Mode = "balanced"
FAST_TOLERANCE = 0.02


@dataclass(frozen=True)
class Tiling:
    """Images above `above_pixels` (padded) run as `size` x `size` windows overlapping by
    `overlap` pixels (both multiples of 16)."""

    above_pixels: int = tiling.TILE_ABOVE_PIXELS
    size: int = tiling.TILE_SIZE
    overlap: int = tiling.TILE_OVERLAP


@dataclass(frozen=True)
class Prepared:
    """A decoded image and the network input made from it."""

    image: np.ndarray  # as decoded
    x: np.ndarray  # C x H x W preprocessed, padded to the multiple
    size: tuple[int, int]  # the image's own height and width


@dataclass(frozen=True)
class Plan:
    """How an image of a given size runs: its padded size, and tiles when it is large. A graph
    whose tile was measured (the server's calibration) may run otherwise: `graphs` holds its
    own plan (`for_graph`)."""

    height: int  # padded
    width: int
    tiles: int  # 0: whole image in one run
    tile: int  # the tile's side (when tiled)
    run_pixels: int  # pixels of one network input
    batch: int = 0  # windows in flight at once (0: the runner's default)
    graphs: Mapping[str, Plan] = field(default_factory=dict)

    def for_graph(self, graph: str) -> Plan:
        return self.graphs.get(graph, self)

    def predict(self, ms_for_pixels: Callable[[int], float]) -> float:
        """The whole image's inference time from one run's."""
        return max(self.tiles, 1) * ms_for_pixels(self.run_pixels)


def prepare(image: np.ndarray, preprocessing: Preprocessing) -> Prepared:
    """A decoded HxW or HxWxC image -> the padded network input."""
    x, size = network_input(image, preprocessing)
    return Prepared(image, x, size)


def plan(prepared: Prepared, tiles: Tiling) -> Plan:
    h, w = prepared.x.shape[-2:]
    if h * w <= tiles.above_pixels:
        return Plan(h, w, 0, 0, h * w)
    count = tiling.count(h, w, tiles.size, tiles.overlap)
    return Plan(h, w, count, tiles.size, min(tiles.size, h) * min(tiles.size, w))


def candidates(
    graphs: Iterable[Graph], plan: Plan, ms_for: Callable[[str, int], float]
) -> list[Candidate]:
    """The router's view of `graphs` for this plan; `ms_for(graph, pixels)` predicts one run."""
    return [
        Candidate(
            g.name,
            g.level,
            g.precision,
            g.output,
            g.accuracy.iou if g.accuracy else None,
            plan.for_graph(g.name).predict(lambda pixels, name=g.name: ms_for(name, pixels)),
        )
        for g in graphs
    ]


def export_latency_ms(graph: Graph, pixels: int, reference_size: int) -> float:
    """One run of `pixels` from the export-time figures: the nearest measured size, scaled in
    proportion to the pixels. Without figures, the GFLOPs stand in (they order the graphs)."""
    sizes = sorted(int(s) for s in graph.latency_ms)
    if not sizes:
        return graph.gflops * pixels / reference_size**2
    i = bisect.bisect_left(sizes, pixels**0.5)
    near = min(sizes[max(i - 1, 0) : i + 1], key=lambda s: abs(s * s - pixels))
    return graph.latency_ms[str(near)] * pixels / (near * near)


@dataclass(frozen=True)
class Prediction:
    """What one image came to: the logits at its own size, the graph, why, and timings."""

    image: np.ndarray
    logits: np.ndarray  # K x H x W at the image's own size
    route: Route
    graph: Graph
    tiles: int
    inference_ms: float


class LocalModel:
    """A model repository opened on this machine: the backend's sessions of the graphs it runs,
    by graph name (entries that share a file and precision, L4's `logits` and `ensemble`, share
    one session)."""

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        sessions: dict[str, Session],
        *,
        tiles: Tiling = Tiling(),
        default_mode: Mode = DEFAULT_MODE,
        fast_tolerance: float = FAST_TOLERANCE,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.sessions = sessions
        self.graphs = {g.name: g for g in manifest.graphs if g.name in sessions}
        self.tiles = tiles
        self.default_mode = default_mode
        self.fast_tolerance = fast_tolerance

    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        backend_name: str = DEFAULT_BACKEND,
        threads: int | None = None,
        **options: Any,
    ) -> LocalModel:
        """Verify the repository's hashes and open, on the CPU, the graphs the backend runs
        (core/backends.py `skipped`, the server's rule: bf16 on OpenVINO only, no fp16).
        onnxruntime's arena hands its memory back after each run."""
        directory = Path(directory)
        manifest = load_repository(directory)
        runtime = (
            OnnxRuntime(run_options=shrinking_arena())
            if backend_name == "onnxruntime"
            else backend(backend_name)
        )
        sessions = open_graphs(directory, manifest.graphs, runtime, threads)
        return cls(directory, manifest, sessions, **options)

    def prepare(self, image: np.ndarray) -> Prepared:
        return prepare(image, self.manifest.preprocessing)

    def route(self, choice: Choice, plan: Plan) -> Route:
        ref = self.manifest.reference_size

        def ms_for(name: str, pixels: int) -> float:
            return export_latency_ms(self.graphs[name], pixels, ref)

        return choose(
            candidates(self.graphs.values(), plan, ms_for),
            choice,
            default_mode=self.default_mode,
            fast_tolerance=self.fast_tolerance,
        )

    def run(self, graph: Graph, x: np.ndarray) -> np.ndarray:
        """C x H x W (multiples of 16) -> K x H x W logits."""
        return self.sessions[graph.name].run(x[None], graph.output)[0]

    def infer(self, graph: Graph, prepared: Prepared, plan: Plan) -> np.ndarray:
        """The prepared input -> logits at the image's own size (tiled when the plan says)."""
        if plan.tiles:
            logits = tiling.infer_tiled_sync(
                prepared.x,
                lambda window: self.run(graph, window),
                tile=plan.tile,
                overlap=self.tiles.overlap,
            )
        else:
            logits = self.run(graph, prepared.x)
        return crop_to(logits, prepared.size)

    def predict(self, image: np.ndarray, choice: Choice | None = None) -> Prediction:
        """A decoded image -> its logits through the graph `choice` routes to (default: the
        default mode)."""
        prepared = self.prepare(image)
        how = plan(prepared, self.tiles)
        route = self.route(choice or Choice(), how)
        graph = self.graphs[route.graph]
        start = time.perf_counter()
        logits = self.infer(graph, prepared, how)
        ms = 1000.0 * (time.perf_counter() - start)
        return Prediction(image, logits, route, graph, how.tiles, ms)
