"""One request path for every entry point (/v1 segment, /v2 infer, jobs):

    (lease the model, receive the body) -> admit -> decode and preprocess -> plan -> route
    -> infer -> render

The entry points differ only in how their inputs arrive (an encoded image, tensors) and in how
the answer is rendered; both are arguments here. The caller leases the model's engine when the
request arrives (a reload or a drain lets it finish on that engine) and reads the body before
`segment` is called, so a slow upload never holds a queue slot. Rendering runs inside the
admission, so the memory it needs is bounded like the rest.

Decoding and rendering run in threads, except for plain PNGs (core.imageio.plain_png_size:
nothing to parse but pixels) of at most INLINE_PIXELS: their decoding and preprocessing (about a
millisecond at 256x256) and a cheap answer (a mask, RLE JSON) run on the event loop, since a hop
to a thread and back costs as much on an idle CPU and several times more on a busy one
(benchmarks/REPORT.md, `overhead`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from unetpp.core.cascade import CascadeResult
from unetpp.core.imageio import plain_png_size
from unetpp.core.manifest import Graph
from unetpp.core.pipeline import Plan, Prepared
from unetpp.core.routing import Choice, Route
from unetpp.server.admission import Admission
from unetpp.server.engine import Engine, Inference

T = TypeVar("T")
INLINE_PIXELS = 256 * 256


@dataclass(frozen=True)
class EncodedImage:
    """One image as the client sent it (PNG, JPEG, TIFF bytes)."""

    data: bytes

    def pixels(self) -> int | None:
        """A plain PNG's, from its header (None: another image, decoded in a thread)."""
        size = plain_png_size(self.data)
        return None if size is None else size[0] * size[1]

    def prepare(self, engine: Engine, admission: Admission) -> list[Prepared]:
        return [engine.prepare(self.data, admission)]


@dataclass(frozen=True)
class Pixels:
    """Images already decoded (a /v2 tensor): HxW or HxWxC arrays of raw pixels."""

    images: list[np.ndarray]

    def pixels(self) -> int | None:
        return sum(image.shape[0] * image.shape[1] for image in self.images)

    def prepare(self, engine: Engine, admission: Admission) -> list[Prepared]:
        admission.reserve(self.pixels() or 0)
        return [engine.preprocess(image) for image in self.images]


Inputs = EncodedImage | Pixels

HEADS = Route("heads", "format", "every head from one pass of the network (stage graphs 1-4)")


@dataclass(frozen=True)
class Outcome:
    """What a request produced, for its renderer: per image, the prepared input and logits."""

    engine: Engine
    route: Route
    plan: Plan
    prepared: list[Prepared]
    results: list[Inference]
    started: float  # time.monotonic() at admission
    prepare_ms: float  # decoding and preprocessing, with the hop to their thread, if any
    inferred: float = field(default_factory=time.monotonic)  # when every result was in

    @property
    def graph(self) -> Graph:
        """The graph that ran; for the cascade and the all-heads pass, the deepest they reach."""
        runners = self.engine.runners
        runner = runners.get(self.route.graph) or runners[self.engine.deepest]
        return runner.graph

    @property
    def cascade(self) -> CascadeResult | None:
        return self.results[0].cascade

    @property
    def logits(self) -> np.ndarray:
        """[N, K, H, W]: every image's logits (they share one size under /v2)."""
        return np.stack([r.logits for r in self.results])

    @property
    def queue_ms(self) -> float:
        return max(r.queue_ms for r in self.results)

    @property
    def inference_ms(self) -> float:
        return max(r.inference_ms for r in self.results)

    def headers(self) -> dict[str, str]:
        graph, route = self.graph, self.route
        headers = {
            "X-UNetPP-Model": self.engine.name,
            "X-UNetPP-Graph": route.graph,
            "X-UNetPP-Level": str(graph.level),
            "X-UNetPP-Precision": graph.precision,
            "X-UNetPP-Route-Reason": route.reason,
            "X-UNetPP-Inference-Ms": f"{self.inference_ms:.3f}",
            "X-UNetPP-Queue-Ms": f"{self.queue_ms:.3f}",
            "Server-Timing": self.server_timing(),
        }
        if route.missed:
            headers["X-UNetPP-Target-Missed"] = route.rule
        if self.cascade:  # the share of windows that went on to each level
            reached = self.cascade.reached()
            headers["X-UNetPP-Level"] = str(self.cascade.level)
            headers["X-UNetPP-Escalated"] = ",".join(
                f"L{k}={share:.3f}" for k, share in enumerate(reached[1:], 2)
            )
        return headers

    def server_timing(self) -> str:
        """The W3C Server-Timing header: where the time went, up to now (the answer is built
        when the headers are): decode (and preprocess), queue, infer (onnxruntime), render
        (with its thread hop, if any), total (from admission; the rest is planning, routing and the
        hops to the batcher and back)."""
        now = time.monotonic()
        spans = {
            "decode": self.prepare_ms,
            "queue": self.queue_ms,
            "infer": self.inference_ms,
            "render": 1000.0 * (now - self.inferred),
            "total": 1000.0 * (now - self.started),
        }
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in spans.items())

    def timings(self) -> dict[str, float | int]:
        return {
            "queue_ms": round(self.queue_ms, 3),
            "inference_ms": round(self.inference_ms, 3),
            "total_ms": round(1000.0 * (time.monotonic() - self.started), 3),
            "batches": sum(r.batches for r in self.results),
            "largest_batch": max(r.largest_batch for r in self.results),
            "tiles": self.plan.for_graph(self.route.graph).tiles,
        }


async def segment(
    engine: Engine,
    inputs: Inputs,
    choice: Choice,
    render: Callable[[Outcome], T],
    *,
    deadline_ms: float | None = None,
    heads: bool = False,
    cheap_render: bool = False,
) -> T:
    """Run `inputs` through a leased engine as `choice` routes them and return
    `render(outcome)`, computed in a thread (on the event loop for a small image when the
    caller says `cheap_render`). `heads`: every head from one pass of the whole network
    instead (the logits hold one channel per head), whatever `choice` says."""
    async with engine.gate.admit(deadline_ms) as admission:
        started = time.monotonic()
        pixels = inputs.pixels()
        small = pixels is not None and pixels <= INLINE_PIXELS
        prepared = await _call(small, inputs.prepare, engine, admission)
        prepare_ms = 1000.0 * (time.monotonic() - started)
        plan = engine.plan(prepared[0])
        route = HEADS if heads else engine.route(choice, plan)
        admission.submitting()
        results = await asyncio.gather(
            *(
                engine.infer_heads(p, plan)
                if heads
                else engine.infer(route.graph, p, plan, admission.deadline)
                for p in prepared
            )
        )
        outcome = Outcome(engine, route, plan, prepared, list(results), started, prepare_ms)
        return await _call(small and cheap_render, render, outcome)


async def _call(inline: bool, function: Callable[..., T], *args: object) -> T:
    """`function(*args)` here, or in a thread (the event loop goes on meanwhile)."""
    return function(*args) if inline else await asyncio.to_thread(function, *args)
