"""The serving engine of one loaded model: calibration, routing, admission, batched inference.

Lives on the event loop. CPU-heavy steps (decoding, preprocessing, encoding) are the caller's
to run in threads; inference runs in the batcher's threads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from unetpp.core import tiling
from unetpp.core.imageio import decode_image
from unetpp.core.inference import measure_latency
from unetpp.core.preprocess import crop_to, pad_to_multiple
from unetpp.core.routing import Candidate, Choice, Route, choose
from unetpp.server.batcher import Batcher, ItemResult
from unetpp.server.errors import DeadlineExceeded, NotReady, QueueFull
from unetpp.server.latency import LatencyPredictor
from unetpp.server.metrics import Metrics
from unetpp.server.runtime import LoadedModel, Runner
from unetpp.server.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """How an image of a given size runs: its padded size, and tiles when it is large."""

    height: int  # padded
    width: int
    tiles: int  # 0: whole image in one run
    run_pixels: int  # pixels of one network input

    def predict(self, predictor: LatencyPredictor, graph: str) -> float:
        return max(self.tiles, 1) * predictor.predict(graph, self.run_pixels)


@dataclass(frozen=True)
class Prepared:
    """A decoded image and the network input made from it (one thread hop for all of it)."""

    image: np.ndarray  # as decoded
    x: np.ndarray  # C x H x W preprocessed, padded to the multiple
    size: tuple[int, int]  # the image's own height and width


@dataclass(frozen=True)
class Inference:
    logits: np.ndarray  # K x H x W at the image's own size
    queue_ms: float
    inference_ms: float
    batches: int
    largest_batch: int


class Admission:
    """A request admitted to the queue; `submitting()` says it will not join further batches.
    `deadline` (time.monotonic()) is when the request gives up."""

    def __init__(self, batcher: Batcher, timeout: asyncio.Timeout, timeout_ms: float) -> None:
        self._batcher = batcher
        self._timeout = timeout
        self.timeout_ms = timeout_ms
        self.deadline = time.monotonic() + timeout_ms / 1000.0
        self._preparing = True
        self.pixels = 0  # reserved from the service's pixel budget (see Service.reserve)
        self.ended = False  # a decoding thread may outlive its request (deadline)
        batcher.preparing += 1

    def shorten(self, deadline_ms: float | None) -> None:
        """Bring the deadline forward to `deadline_ms` from now (a limit read from the body)."""
        if deadline_ms is None:
            return
        earlier = self.deadline - (time.monotonic() + deadline_ms / 1000.0)
        if earlier > 0:
            self.deadline -= earlier
            self.timeout_ms = deadline_ms
            when = self._timeout.when()
            assert when is not None
            self._timeout.reschedule(when - earlier)

    def submitting(self) -> None:
        if self._preparing:
            self._preparing = False
            self._batcher.preparing -= 1
            self._batcher.notify()


class Service:
    def __init__(self, model: LoadedModel, settings: Settings, metrics: Metrics) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self.predictor = LatencyPredictor()
        self.calibration: dict[str, dict[int, float]] = {}
        self.batcher = Batcher(
            self._run,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            workers=settings.workers,
            on_batch=self._observe,
        )
        self.in_flight = 0
        self.pixels_in_flight = 0  # of admitted requests' images; decoding threads add to it
        self._pixels_lock = threading.Lock()
        self.requests: dict[str, int] = dict.fromkeys(model.runners, 0)
        self.missed: dict[str, int] = dict.fromkeys(model.runners, 0)
        self.leases = 0  # requests holding this service (see `lease`)
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def runners(self) -> dict[str, Runner]:
        return self.model.runners

    def calibrate(self, stop: threading.Event | None = None) -> None:
        """Warm every graph up and measure it at the reference and the tile size (blocking).
        Setting `stop` abandons it between two measurements (a thread cannot be cancelled, and
        a process shutting down while it loads would otherwise wait for all of them)."""
        manifest = self.model.manifest
        sizes = sorted({manifest.reference_size, self.settings.tile_size})
        for name, runner in self.runners.items():
            for size in sizes:
                if stop is not None and stop.is_set():
                    raise NotReady("shutting down: calibration abandoned")
                ms = measure_latency(
                    runner.session,
                    size,
                    manifest.in_channels,
                    runner.graph.output,
                    repeats=self.settings.calibration_repeats,
                )
                self.predictor.seed(name, size * size, ms)
                self.calibration.setdefault(name, {})[size] = round(ms, 3)
            log.info("calibrated %s: %s ms", name, self.calibration[name])

    async def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()

    def _run(self, graph: str, batch: np.ndarray) -> np.ndarray:
        return self.runners[graph](batch)

    def _observe(self, graph: str, size: int, pixels: int, run_ms: float) -> None:
        self.predictor.observe(graph, pixels, run_ms / size)
        self.metrics.batch(graph, size, run_ms)

    @contextmanager
    def lease(self) -> Iterator[Service]:
        """Held by every request using this service; a replaced service closes when none is."""
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

    @asynccontextmanager
    async def admit(self, deadline_ms: float | None = None) -> AsyncIterator[Admission]:
        """Admit a request for at most `deadline_ms` (default and cap: the server's timeout):
        QueueFull when `max_queue` are in flight, DeadlineExceeded when its time is up."""
        if self.in_flight >= self.settings.max_queue:
            retry = (self.batcher.queue_wait_ms() + self.settings.max_wait_ms) / 1000.0
            raise QueueFull(
                f"{self.in_flight} requests in flight, the limit is {self.settings.max_queue}",
                retry_after=retry,
            )
        timeout_ms = min(deadline_ms or self.settings.timeout_ms, self.settings.timeout_ms)
        timeout = asyncio.timeout(timeout_ms / 1000.0)
        self.in_flight += 1
        admission = Admission(self.batcher, timeout, timeout_ms)
        try:
            async with timeout:
                yield admission
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"no result within the deadline of {admission.timeout_ms:g} ms; "
                "try a faster mode, a smaller image or a larger deadline_ms"
            ) from exc
        finally:
            admission.submitting()
            self.in_flight -= 1
            with self._pixels_lock:
                self.pixels_in_flight -= admission.pixels
                admission.pixels, admission.ended = 0, True

    def reserve(self, admission: Admission, pixels: int) -> None:
        """Take `pixels` from the budget of `max_pixels_in_flight` for this admission, or
        QueueFull: `max_queue` alone would let that many large images (a few kB each as PNG)
        be decoded and held at once, gigabytes in all."""
        with self._pixels_lock:
            if admission.ended:  # nothing would release it: give up decoding instead
                raise DeadlineExceeded("the request ended before its image was decoded")
            total = self.pixels_in_flight + pixels
            if self.pixels_in_flight and total > self.settings.max_pixels_in_flight:
                retry = (self.batcher.queue_wait_ms() + self.settings.max_wait_ms) / 1000.0
                raise QueueFull(
                    f"{self.pixels_in_flight} pixels of images in flight, {pixels} more would "
                    f"pass the limit of {self.settings.max_pixels_in_flight}",
                    retry_after=retry,
                )
            self.pixels_in_flight = total
            admission.pixels += pixels

    def prepare(self, data: bytes, admission: Admission) -> Prepared:
        """Decode (within the limits and the pixel budget), preprocess with the manifest's
        recipe, pad (blocking)."""
        image = decode_image(
            data,
            max_pixels=self.settings.max_pixels,
            max_side=self.settings.max_side,
            before_decoding=lambda width, height: self.reserve(admission, width * height),
        )
        return self.preprocess(image)

    def preprocess(self, image: np.ndarray) -> Prepared:
        """A decoded HxW or HxWxC image -> the padded network input (blocking)."""
        prep = self.model.manifest.preprocessing
        x, size = pad_to_multiple(prep(image), prep.multiple)
        return Prepared(image, x, size)

    def plan(self, prepared: Prepared) -> Plan:
        h, w = prepared.x.shape[-2:]
        if h * w <= self.settings.tile_above_pixels:
            return Plan(h, w, 0, h * w)
        tile, overlap = self.settings.tile_size, self.settings.tile_overlap
        return Plan(h, w, tiling.count(h, w, tile, overlap), min(tile, h) * min(tile, w))

    def candidates(self, plan: Plan) -> list[Candidate]:
        out = []
        for name, runner in self.runners.items():
            g = runner.graph
            iou = g.accuracy.iou if g.accuracy else None
            out.append(
                Candidate(
                    name, g.level, g.precision, g.output, iou, plan.predict(self.predictor, name)
                )
            )
        return out

    def route(self, choice: Choice, plan: Plan, *, serve: bool = True) -> Route:
        """The graph for a request; `serve=False` only looks (no queue wait, nothing counted)."""
        route = choose(
            self.candidates(plan),
            choice,
            default_mode=self.settings.default_mode,
            fast_tolerance=self.settings.fast_tolerance,
            queue_ms=self.batcher.queue_wait_ms() if serve else 0.0,
        )
        if not serve:
            return route
        self.requests[route.graph] += 1
        self.missed[route.graph] += route.missed
        policy = (choice.mode or self.settings.default_mode) if route.rule == "mode" else route.rule
        self.metrics.routes.labels(policy, route.graph, str(route.missed).lower()).inc()
        return route

    async def infer(self, graph: str, prepared: Prepared, plan: Plan, deadline: float) -> Inference:
        """The prepared input -> logits at the image's own size, via the batcher."""
        if time.monotonic() > deadline:
            raise DeadlineExceeded("the request's deadline passed before inference")
        padded = prepared.x
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
                padded,
                run,
                tile=self.settings.tile_size,
                overlap=self.settings.tile_overlap,
                in_flight=2 * self.settings.max_batch,
            )
        else:
            logits = await run(padded)
        wall_ms = 1000.0 * (time.monotonic() - start)
        batches = {r.batch_id: r for r in results}
        inference_ms = sum(r.run_ms for r in batches.values())
        queue_ms = results[0].queue_ms if len(results) == 1 else max(wall_ms - inference_ms, 0.0)
        self.metrics.queue_seconds.labels(graph).observe(queue_ms / 1000.0)
        return Inference(
            crop_to(logits, prepared.size),
            queue_ms,
            inference_ms,
            len(batches),
            max(r.batch_size for r in results),
        )

    def describe(self) -> dict[str, Any]:
        """What GET /v1/models shows: the model, each graph's figures, the queue."""
        manifest = self.model.manifest
        ref = manifest.reference_size
        ref_plan = Plan(ref, ref, 0, ref * ref)
        modes = {
            mode: self.route(Choice(mode=mode), ref_plan, serve=False).graph
            for mode in ("fast", "balanced", "accurate")
        }
        graphs = []
        for name, runner in self.runners.items():
            g = runner.graph
            stats = self.batcher.stats.get(name)
            graphs.append(
                {
                    "name": name,
                    "level": g.level,
                    "precision": g.precision,
                    "output": g.output,
                    "file": g.file,
                    "parameters": g.parameters,
                    "gflops": g.gflops,
                    "accuracy": None
                    if g.accuracy is None
                    else {
                        "iou": g.accuracy.iou,
                        "dice": g.accuracy.dice,
                        "images": g.accuracy.images,
                        "data": g.accuracy.data,
                    },
                    "latency_ms": {
                        "export": g.latency_ms,
                        "calibrated": {
                            str(k): v for k, v in self.calibration.get(name, {}).items()
                        },
                        "live": {
                            str(k): round(v, 3) for k, v in self.predictor.known(name).items()
                        },
                        "predicted_at_reference": round(ref_plan.predict(self.predictor, name), 3),
                    },
                    "served": {
                        "requests": self.requests[name],
                        "missed_targets": self.missed[name],
                        "observations": self.predictor.observations(name),
                        "batches": stats.batches if stats else 0,
                        "images": stats.images if stats else 0,
                        "max_batch": stats.max_batch if stats else 0,
                        "batch_sizes": {str(k): v for k, v in sorted(stats.sizes.items())}
                        if stats
                        else {},
                    },
                }
            )
        return {
            "model": {
                "name": manifest.name,
                "version": manifest.version,
                "arch": manifest.arch,
                "in_channels": manifest.in_channels,
                "num_classes": manifest.num_classes,
                "threshold": manifest.threshold,
                "reference_size": ref,
                "preprocessing": manifest.preprocessing.to_dict(),
                "directory": str(self.model.directory),
            },
            "device": self.model.device,
            "providers": list(self.model.providers),
            "modes_at_reference": modes,
            "graphs": graphs,
            "queue": {
                "in_flight": self.in_flight,
                "max_queue": self.settings.max_queue,
                "pixels_in_flight": self.pixels_in_flight,
                "max_pixels_in_flight": self.settings.max_pixels_in_flight,
                "queued_items": self.batcher.queued,
                "predicted_wait_ms": round(self.batcher.queue_wait_ms(), 3),
            },
        }
