"""The serving engine of one loaded model: its sessions, latency and memory figures, routing,
and batched (tiled where needed) inference.

Lives on the event loop; the caller runs CPU-heavy steps (decoding, rendering) in threads and
inference runs in the batcher's threads. Ready in seconds: `probe()` runs each graph once at
the reference size (its latency and its activation bytes per input pixel), and other sizes are
estimated from the manifest's export-time latencies scaled by that probe; `refine()` measures
each graph at the candidate tile sides in the background while the engine is idle and chooses
its tile (side and batch) from them, and served batches keep refining.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from unetpp.core import cascade, pipeline, tiling
from unetpp.core.errors import BadParameter, ImageTooLarge
from unetpp.core.imageio import decode_image
from unetpp.core.inference import measure_latency
from unetpp.core.pipeline import Plan, Prepared
from unetpp.core.preprocess import MULTIPLE, crop_to
from unetpp.core.routing import Candidate, Choice, Route, choose
from unetpp.server import memory
from unetpp.server.admission import Admission, Gate, MemoryBudget
from unetpp.server.batcher import Batcher, ItemResult
from unetpp.server.errors import DeadlineExceeded, NotReady
from unetpp.server.latency import LatencyPredictor
from unetpp.server.metrics import Metrics
from unetpp.server.runtime import LoadedModel, Runner
from unetpp.server.settings import Settings

log = logging.getLogger(__name__)

# Activation bytes per input pixel assumed where the kernel cannot measure them: above what
# the largest graph (L4 fp32) was measured to take on this project's CPU (2,000-2,750).
UNMEASURED_BYTES_PER_PIXEL = 3200
# the largest tile calibration run, in input pixels (batch x side x side): bounds its time
CALIBRATION_PIXELS = 1 << 20


@dataclass(frozen=True)
class Inference:
    logits: np.ndarray  # K x H x W at the image's own size (all heads: one channel per head)
    queue_ms: float
    inference_ms: float
    batches: int
    largest_batch: int
    cascade: cascade.CascadeResult | None = None  # mode=adaptive: how deep each window went


@dataclass
class GraphFigures:
    """What the engine knows of one graph on this machine, and where each figure comes from."""

    bytes_per_pixel: int = UNMEASURED_BYTES_PER_PIXEL
    memory_source: str = "assumed"  # "measured" by the probe
    latency_source: dict[int, str] | None = None  # size -> "probe", "estimate", "calibrated"
    requests: int = 0
    missed: int = 0
    tile_runs: tuple[tiling.TileRun, ...] = ()  # measured by `refine`
    tile: tiling.TileRun | None = None  # the tile chosen from them (None: `tile_size`)

    def measured(self, peak: int | None, pixels: int) -> None:
        """A run of `pixels` input pixels peaked `peak` bytes above rest (None: unknown): the
        figure is the largest measured so far, with the margin."""
        if not peak:
            return
        per_pixel = memory.per_pixel(peak, pixels)
        if self.memory_source == "assumed":
            self.bytes_per_pixel, self.memory_source = per_pixel, "measured"
        else:
            self.bytes_per_pixel = max(self.bytes_per_pixel, per_pixel)


class Engine:
    def __init__(
        self,
        name: str,
        model: LoadedModel,
        settings: Settings,
        metrics: Metrics,
        gate: Gate,
        budget: MemoryBudget,
    ) -> None:
        self.name = name
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self.gate = gate
        self.budget = budget
        self.predictor = LatencyPredictor()
        self.cascade = (
            cascade.Cascade.open(
                model.directory,
                model.manifest,
                tile_above_pixels=settings.tile_above_pixels,
                tile=settings.tile_size,
                overlap=settings.tile_overlap,
                threads=settings.threads or None,
                backend=model.runtime,
            )
            if model.manifest.cascade and model.manifest.num_classes == 1
            else None
        )
        self.figures = {graph: GraphFigures(latency_source={}) for graph in model.runners}
        self.leases = 0  # requests holding this engine (see `lease`)
        self.closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.batcher = Batcher(
            _runner_call(model.runners),
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            workers=settings.workers,
            gate=gate,
            budget=budget,
            cost=_cost(self.figures),
            on_batch=_observer(name, self.predictor, metrics),
        )

    @property
    def runners(self) -> dict[str, Runner]:
        return self.model.runners

    # --- start-up: ready in seconds, refined in the background -------------------------------

    def probe(self, stop: threading.Event | None = None) -> None:
        """Run every graph once at the reference size (blocking): its peak memory gives its
        bytes per input pixel. Then time one more run of the graph the export measured fastest:
        every graph's latency is the export's figure scaled by that graph's speed here against
        the export's (a graph the export did not time keeps its first run, warm-up included)."""
        manifest = self.model.manifest
        ref = manifest.reference_size
        x = np.random.default_rng(0).random((1, manifest.in_channels, ref, ref), np.float32)
        first: dict[str, float] = {}
        for name, runner in self.runners.items():
            if stop is not None and stop.is_set():
                raise NotReady("shutting down: start-up abandoned")
            start = time.perf_counter()
            peak = memory.peak_during(lambda runner=runner: runner(x))
            first[name] = 1000.0 * (time.perf_counter() - start)
            self.figures[name].measured(peak, ref * ref)
        exported = {n: r.graph.latency_ms for n, r in self.runners.items()}
        timed = [n for n in self.runners if str(ref) in exported[n]]
        scale = None
        if timed:
            fastest = min(timed, key=lambda n: exported[n][str(ref)])
            start = time.perf_counter()
            self.runners[fastest](x)
            ms = 1000.0 * (time.perf_counter() - start)
            scale = ms / exported[fastest][str(ref)]
        for name in self.runners:
            if scale is None or not exported[name]:
                self._seed(name, ref, first[name], "estimate")
                continue
            for size, ms in exported[name].items():
                self._seed(name, int(size), ms * scale, "estimate")
        if scale is not None:
            self._seed(fastest, ref, exported[fastest][str(ref)] * scale, "probe")
        log.info(
            "%s: probed %s at %d px (bytes per pixel %s; latency %s the export's)",
            self.name,
            ", ".join(self.runners),
            ref,
            {n: f.bytes_per_pixel for n, f in self.figures.items()},
            "unknown against" if scale is None else f"{scale:.2f}x",
        )

    def _seed(self, graph: str, size: int, ms: float, source: str) -> None:
        self.predictor.seed(graph, size * size, ms)
        assert self.figures[graph].latency_source is not None
        self.figures[graph].latency_source[size] = source

    async def refine(self, stop: threading.Event) -> None:
        """Measure every graph, one at a time, at each of `tile_sides` at batch 1 and at the
        batch that fits (or at `tile_size` alone when there are none), each run when the
        engine is idle and the memory budget has room for it; then choose the graph's tile
        (background; a stop ends it between runs)."""
        for name, runner in self.runners.items():
            figures = self.figures[name]
            runs: list[tiling.TileRun] = []
            for side, batch in self._tile_candidates(figures.bytes_per_pixel):
                measured = await self._measure(runner, side, batch, stop)
                if measured is None:
                    return
                runs.append(measured)
                if batch == 1:
                    self._seed(name, side, measured.ms, "calibrated")
                log.debug(
                    "%s: calibrated %s at %dx%d px: %.1f ms",
                    self.name,
                    name,
                    batch,
                    side,
                    measured.ms,
                )
            if self.settings.tile_sides:
                self._choose_tile(name, runs)

    def _tile_candidates(self, bytes_per_pixel: int) -> list[tuple[int, int]]:
        """(side, batch) to measure: each side at batch 1 and at the largest batch up to
        `max_batch` whose activations fit the tiles' room and whose pixels stay within
        CALIBRATION_PIXELS (a side that does not fit alone is left out)."""
        if not self.settings.tile_sides:
            return [(self.settings.tile_size, 1)]
        out = []
        for side in self.settings.tile_sides:
            fits = self._tile_room // (bytes_per_pixel * side * side)
            batch = min(self.settings.max_batch, fits, CALIBRATION_PIXELS // (side * side))
            if fits >= 1:
                out.append((side, 1))
            if batch > 1:
                out.append((side, batch))
        return out

    @property
    def _tile_room(self) -> int:
        """Bytes of activations one image's tiles may hold at once."""
        return min(self.budget.capacity, self.settings.tile_bytes)

    async def _measure(
        self, runner: Runner, side: int, batch: int, stop: threading.Event
    ) -> tiling.TileRun | None:
        """One calibration run when the engine is idle and the budget has room (None: the
        server stops or the engine was closed, retired by a reload: its refinement ends, and
        with it the last reference that would keep its sessions alive)."""
        figures = self.figures[runner.graph.name]
        cost = figures.bytes_per_pixel * side * side * batch
        while not (stop.is_set() or self.closed) and (
            self.gate.in_flight or self.budget.room(cost, 1) == 0 or self.budget.in_use
        ):
            await asyncio.sleep(0.2)
        if stop.is_set() or self.closed:
            return None
        self.budget.take(cost)
        try:
            ms, peak = await asyncio.to_thread(self._calibrate, runner, side, batch)
        finally:
            self.budget.release(cost)
        figures.measured(peak, side * side * batch)
        return tiling.TileRun(side, batch, ms, int(memory.MEMORY_MARGIN * peak) if peak else 0)

    def _choose_tile(self, graph: str, runs: list[tiling.TileRun]) -> None:
        """The graph's tile from its runs (core/tiling.py `choose_tile`); the predictor learns
        its per-window time at the chosen batch, what served batches will report."""
        figures = self.figures[graph]
        figures.tile_runs = tuple(runs)
        figures.tile = tiling.choose_tile(
            runs,
            overlap=self.settings.tile_overlap,
            bytes_per_pixel=figures.bytes_per_pixel,
            room=self._tile_room,
        )
        if figures.tile is not None:
            tile = figures.tile
            self.predictor.seed(graph, tile.side * tile.side, tile.ms / tile.batch)
            log.info(
                "%s: %s tiles at %d px, batch %d (%.3f us per output pixel)",
                self.name,
                graph,
                tile.side,
                tile.batch,
                1000.0 * tile.ms_per_pixel(self.settings.tile_overlap),
            )

    def _calibrate(self, runner: Runner, size: int, batch: int = 1) -> tuple[float, int | None]:
        """Median ms of `runner` on a batch of size x size inputs, and the peak bytes above
        rest (blocking)."""
        timed: list[float] = []
        peak = memory.peak_during(
            lambda: timed.append(
                measure_latency(
                    runner,
                    size,
                    self.model.manifest.in_channels,
                    batch=batch,
                    repeats=self.settings.calibration_repeats,
                    warmup=1,
                )
            )
        )
        return timed[0], peak

    async def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        self.closed = True
        await self.batcher.close()

    # --- requests ------------------------------------------------------------------------

    @contextmanager
    def lease(self) -> Iterator[Engine]:
        """Held by every request using this engine; a retired engine closes when none is."""
        self.leases += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self.leases -= 1
            if not self.leases:
                self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()

    def prepare(self, data: bytes, admission: Admission) -> Prepared:
        """Decode (within the limits and the pixel budget), preprocess with the manifest's
        recipe, pad (blocking)."""
        image = decode_image(
            data,
            max_pixels=self.settings.max_pixels,
            max_side=self.settings.max_side,
            before_decoding=lambda width, height: admission.reserve(width * height),
        )
        return self.preprocess(image)

    def preprocess(self, image: np.ndarray) -> Prepared:
        """A decoded HxW or HxWxC image -> the padded network input (blocking)."""
        return pipeline.prepare(image, self.model.manifest.preprocessing)

    def plan(self, prepared: Prepared) -> Plan:
        """Today's rule (`_plan_unmeasured`), and for each graph whose tile is measured, its
        own plan: whole or tiled at its tile, whichever is predicted faster (`Plan.graphs`)."""
        h, w = prepared.x.shape[-2:]
        plan = self._plan_unmeasured(h, w)
        graphs = {name: self._plan_measured(name, h, w) for name in self.runners}
        return replace(plan, graphs={k: v for k, v in graphs.items() if v is not None})

    def _plan_unmeasured(self, h: int, w: int) -> Plan:
        """Whole when small enough and its activations fit the memory budget; otherwise tiled,
        with the largest tile (from `tile_size` down, halving) whose activations fit (the most
        demanding graph's, as the graph is chosen after planning), in batches that fit
        `tile_bytes`; ImageTooLarge (413) when not even the smallest tile fits."""
        per_pixel = max(f.bytes_per_pixel for f in self.figures.values())
        capacity = self.budget.capacity
        if h * w <= self.settings.tile_above_pixels and h * w * per_pixel <= capacity:
            return Plan(h, w, 0, 0, h * w)
        overlap = self.settings.tile_overlap
        tile = self.settings.tile_size
        while True:
            pixels = min(tile, h) * min(tile, w)
            if pixels * per_pixel <= capacity:
                batch = min(self.settings.max_batch, self._tile_room // (pixels * per_pixel))
                count = tiling.count(h, w, tile, overlap)
                return Plan(h, w, count, tile, pixels, max(batch, 1))
            smaller = tile // 2 // MULTIPLE * MULTIPLE
            if smaller <= 2 * overlap:
                raise ImageTooLarge(
                    f"even a {tile}x{tile} tile needs {pixels * per_pixel} bytes of activations, "
                    f"more than the memory budget of {capacity} bytes; raise UNETPP_MEMORY_LIMIT"
                )
            tile = smaller

    def _plan_measured(self, graph: str, h: int, w: int) -> Plan | None:
        """Tiled at the graph's measured tile and batch, or whole where that is allowed (up to
        `tile_above_pixels`, within the budget) and predicted no slower; None: not measured."""
        figures = self.figures[graph]
        if figures.tile is None:
            return None
        side, overlap = figures.tile.side, self.settings.tile_overlap
        pixels = min(side, h) * min(side, w)
        tiled = Plan(h, w, tiling.count(h, w, side, overlap), side, pixels, figures.tile.batch)
        if h * w <= self.settings.tile_above_pixels:
            whole = Plan(h, w, 0, 0, h * w)
            fits = h * w * figures.bytes_per_pixel <= self.budget.capacity
            if fits and self.predict_ms(whole, graph) <= self.predict_ms(tiled, graph):
                return whole
        return tiled

    def predict_ms(self, plan: Plan, graph: str) -> float:
        """The predicted inference time of an image so planned, on one graph."""
        return plan.for_graph(graph).predict(lambda pixels: self.predictor.predict(graph, pixels))

    def candidates(self, plan: Plan, *, adaptive: bool = True) -> list[Candidate]:
        """Every graph, and the cascade's targets unless `adaptive` is False."""
        graphs = [runner.graph for runner in self.runners.values()]
        out = pipeline.candidates(graphs, plan, self.predictor.predict)
        if adaptive and self.cascade and self.deepest in self.runners:  # tiled as `plan` says
            deepest_ms = plan.predict(lambda pixels: self.predictor.predict(self.deepest, pixels))
            out += cascade.candidates(self.cascade.record, deepest_ms)
        return out

    @property
    def deepest(self) -> str:
        """The deepest fp32 graph: the one the cascade and the all-heads pass end in."""
        return f"L{len(self.cascade.record.stages)}" if self.cascade else "L4"

    def route(
        self, choice: Choice, plan: Plan, *, serve: bool = True, adaptive: bool = True
    ) -> Route:
        """The graph for a request; `serve=False` only looks (no queue wait, nothing counted);
        `adaptive=False` leaves the cascade out."""
        route = choose(
            self.candidates(plan, adaptive=adaptive),
            choice,
            default_mode=self.settings.default_mode,
            fast_tolerance=self.settings.fast_tolerance,
            queue_ms=self.batcher.queue_wait_ms() if serve else 0.0,
        )
        if not serve:
            return route
        figures = self.figures.get(route.graph)  # none for the cascade
        if figures:
            figures.requests += 1
            figures.missed += route.missed
        policy = (choice.mode or self.settings.default_mode) if route.rule == "mode" else route.rule
        self.metrics.routes.labels(self.name, policy, route.graph, str(route.missed).lower()).inc()
        return route

    async def infer(self, graph: str, prepared: Prepared, plan: Plan, deadline: float) -> Inference:
        """The prepared input -> logits at the image's own size, via the batcher."""
        if time.monotonic() > deadline:
            raise DeadlineExceeded("the request's deadline passed before inference")
        if graph not in self.runners and self.cascade:
            target = self.cascade.target(float(graph.split("@")[1]))
            return await self.infer_cascade(
                prepared, plan, lambda x: self.cascade.infer(x, target.thresholds)
            )
        plan = plan.for_graph(graph)
        predicted = self.predictor.predict(graph, plan.run_pixels)
        results: list[ItemResult] = []

        async def run(window: np.ndarray) -> np.ndarray:
            future = self.batcher.submit(
                graph, np.ascontiguousarray(window), deadline=deadline, predicted_ms=predicted
            )
            result = await future
            results.append(result)
            return result.logits

        start = time.monotonic()
        if plan.tiles:
            logits = await tiling.infer_tiled(
                prepared.x,
                run,
                tile=plan.tile,
                overlap=self.settings.tile_overlap,
                in_flight=plan.batch,
            )
        else:
            logits = await run(prepared.x)
        wall_ms = 1000.0 * (time.monotonic() - start)
        batches = {r.batch_id: r for r in results}
        inference_ms = sum(r.run_ms for r in batches.values())
        queue_ms = results[0].queue_ms if len(results) == 1 else max(wall_ms - inference_ms, 0.0)
        self.metrics.queue_seconds.labels(self.name, graph).observe(queue_ms / 1000.0)
        return Inference(
            crop_to(logits, prepared.size),
            queue_ms,
            inference_ms,
            len(batches),
            max(r.batch_size for r in results),
        )

    async def infer_cascade(
        self,
        prepared: Prepared,
        plan: Plan,
        run: Callable[[np.ndarray], cascade.CascadeResult | list[np.ndarray]],
    ) -> Inference:
        """The cascade (or every head from one pass) on the prepared input, in a thread, one
        window at a time, holding the deepest graph's activation bytes for a window against
        the memory budget while it runs."""
        if not self.cascade:
            raise BadParameter("this model has no adaptive cascade (stage graphs)")
        cost = self.figures[self.deepest].bytes_per_pixel * plan.run_pixels
        while not self.budget.room(cost, 1):
            await self.budget.freed()
        self.budget.take(cost)
        try:
            start = time.perf_counter()
            out = await asyncio.to_thread(run, prepared.x)
            ms = 1000.0 * (time.perf_counter() - start)
        finally:
            self.budget.release(cost)
        if isinstance(out, cascade.CascadeResult):
            logits, result = out.logits, out
        else:
            logits, result = np.concatenate(out), None
        windows = max(plan.tiles, 1)
        return Inference(crop_to(logits, prepared.size), 0.0, ms, windows, 1, result)

    async def infer_heads(self, prepared: Prepared, plan: Plan) -> Inference:
        """Every head's logits (one channel per head) from one pass of the whole network."""
        return await self.infer_cascade(prepared, plan, lambda x: self.cascade.infer_heads(x))


def _runner_call(runners: dict[str, Runner]):
    def run(graph: str, batch: np.ndarray) -> np.ndarray:
        return runners[graph](batch)

    return run


def _cost(figures: dict[str, GraphFigures]):
    def cost(graph: str, shape: tuple[int, ...]) -> int:
        return shape[-1] * shape[-2] * figures[graph].bytes_per_pixel

    return cost


def _observer(model: str, predictor: LatencyPredictor, metrics: Metrics):
    def observe(graph: str, size: int, pixels: int, run_ms: float) -> None:
        predictor.observe(graph, pixels, run_ms / size)
        metrics.batch(model, graph, size, run_ms)

    return observe
