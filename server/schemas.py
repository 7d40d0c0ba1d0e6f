"""The JSON answers of /v1 as typed models, so that /openapi.json documents every field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from unetpp.core.pipeline import Plan
from unetpp.core.routing import Choice, Route
from unetpp.server.engine import Engine
from unetpp.server.registry import Registry, Slot

LatencySource = Literal["probe", "estimate", "calibrated"]


class Accuracy(BaseModel):
    iou: float = Field(description="IoU measured at export (multi-class: mean over foreground)")
    dice: float
    images: int
    data: str = Field(description="the data split it was measured on")
    classes: dict[str, dict[str, float]] = Field(
        {}, description="multi-class: each foreground class's iou and dice"
    )


class Latency(BaseModel):
    export: dict[str, float] = Field(description="size -> ms measured at export (its machine)")
    known: dict[str, float] = Field(description="pixels -> ms the router predicts with now")
    sources: dict[str, LatencySource] = Field(
        description="size -> where the figure comes from: probe (one run at start-up), "
        "estimate (export's figure scaled by the probe), calibrated (measured here)"
    )
    observations: int = Field(description="served batches that refined the figures")
    predicted_at_reference: float


class Tile(BaseModel):
    side: int = Field(description="the graph's tile side, chosen from its measured runs")
    batch: int = Field(description="tiles of one image run together")
    us_per_output_pixel: float = Field(description="measured, per new pixel given the overlap")
    runs: dict[str, float] = Field(description="'<batch>x<side>' -> ms of each measured run")


class Served(BaseModel):
    requests: int
    missed_targets: int
    batches: int
    images: int
    max_batch: int
    batch_sizes: dict[str, int]


class GraphInfo(BaseModel):
    name: str
    level: int
    precision: str
    output: str
    file: str
    parameters: int
    gflops: float
    accuracy: Accuracy | None
    bytes_per_pixel: int = Field(description="activation bytes per input pixel (batch 1)")
    memory_source: Literal["measured", "assumed"]
    latency_ms: Latency
    tile: Tile | None = Field(description="measured in the background; none yet: `tile_size`")
    served: Served


class ModelInfo(BaseModel):
    name: str
    version: str
    arch: str
    in_channels: int
    num_classes: int
    threshold: float
    reference_size: int
    preprocessing: dict[str, Any]
    task: dict[str, Any] | None = None
    directory: str


class ModelDescription(BaseModel):
    """One model as served: its figures on this machine and what it served."""

    name: str = Field(description="the name it is served under")
    state: Literal["ready", "loading", "failed", "unloaded"]
    error: str | None = None
    loaded_at: float | None = Field(None, description="Unix time of its last (re)load")
    model: ModelInfo | None = None
    device: str | None = None
    backend: str | None = Field(None, description="the runtime of its graphs (UNETPP_BACKEND)")
    providers: list[str] = []
    modes_at_reference: dict[str, str] = Field(
        {}, description="the graph each mode picks for a reference-size image"
    )
    graphs: list[GraphInfo] = []


class Queue(BaseModel):
    in_flight: int
    max_queue: int
    pixels_in_flight: int
    max_pixels_in_flight: int
    body_bytes_in_flight: int
    memory_budget_bytes: int
    memory_in_use_bytes: int
    queued_items: int = Field(description="inputs waiting in the models' batchers")


class ModelList(BaseModel):
    default: str | None = Field(description="the model plain /v1/segment serves")
    models: list[ModelDescription]
    queue: Queue


def describe(slot: Slot) -> ModelDescription:
    engine = slot.engine
    base = ModelDescription(
        name=slot.name, state=slot.state, error=slot.error, loaded_at=slot.loaded_at
    )
    if engine is None:
        return base
    manifest = engine.model.manifest
    ref = manifest.reference_size
    plan = Plan(ref, ref, 0, 0, ref * ref)
    modes = {
        mode: engine.route(Choice(mode=mode), plan, serve=False).graph
        for mode in ("fast", "balanced", "accurate")
    }
    task = getattr(manifest, "task", None)
    return base.model_copy(
        update={
            "model": ModelInfo(
                name=manifest.name,
                version=str(manifest.version),
                arch=manifest.arch,
                in_channels=manifest.in_channels,
                num_classes=manifest.num_classes,
                threshold=manifest.threshold,
                reference_size=ref,
                preprocessing=manifest.preprocessing.to_dict(),
                task=task.to_dict() if task is not None else None,
                directory=str(engine.model.directory),
            ),
            "device": engine.model.device,
            "backend": engine.model.backend,
            "providers": list(engine.model.providers),
            "modes_at_reference": modes,
            "graphs": [_graph(engine, name, plan) for name in engine.runners],
        }
    )


def _graph(engine: Engine, name: str, reference: Plan) -> GraphInfo:
    g = engine.runners[name].graph
    figures = engine.figures[name]
    stats = engine.batcher.stats.get(name)
    return GraphInfo(
        name=name,
        level=g.level,
        precision=g.precision,
        output=g.output,
        file=g.file,
        parameters=g.parameters,
        gflops=g.gflops,
        accuracy=None
        if g.accuracy is None
        else Accuracy(
            iou=g.accuracy.iou,
            dice=g.accuracy.dice,
            images=g.accuracy.images,
            data=g.accuracy.data,
            classes=g.accuracy.classes,
        ),
        bytes_per_pixel=figures.bytes_per_pixel,
        memory_source=figures.memory_source,
        latency_ms=Latency(
            export=g.latency_ms,
            known={str(k): round(v, 3) for k, v in engine.predictor.known(name).items()},
            sources={str(k): v for k, v in (figures.latency_source or {}).items()},
            observations=engine.predictor.observations(name),
            predicted_at_reference=round(engine.predict_ms(reference, name), 3),
        ),
        tile=None
        if figures.tile is None
        else Tile(
            side=figures.tile.side,
            batch=figures.tile.batch,
            us_per_output_pixel=round(
                1000.0 * figures.tile.ms_per_pixel(engine.settings.tile_overlap), 4
            ),
            runs={f"{r.batch}x{r.side}": round(r.ms, 3) for r in figures.tile_runs},
        ),
        served=Served(
            requests=figures.requests,
            missed_targets=figures.missed,
            batches=stats.batches if stats else 0,
            images=stats.images if stats else 0,
            max_batch=stats.max_batch if stats else 0,
            batch_sizes={str(k): v for k, v in sorted(stats.sizes.items())} if stats else {},
        ),
    )


def queue(registry: Registry) -> Queue:
    gate = registry.gate
    return Queue(
        in_flight=gate.in_flight,
        max_queue=gate.max_queue,
        pixels_in_flight=gate.pixels_in_flight,
        max_pixels_in_flight=gate.max_pixels_in_flight,
        body_bytes_in_flight=gate.body_bytes_in_flight,
        memory_budget_bytes=registry.budget.capacity,
        memory_in_use_bytes=registry.budget.in_use,
        queued_items=sum(s.engine.batcher.queued for s in registry.slots.values() if s.engine),
    )


class RouteCandidate(BaseModel):
    name: str
    iou: float | None
    predicted_ms: float


class RouteInfo(BaseModel):
    rule: str = Field(description="graph, level, mode, max_latency_ms or min_iou")
    reason: str
    missed: bool = Field(description="the latency budget or the accuracy floor was missed")
    queue_ms: float = Field(description="predicted queue wait added to every candidate")
    candidates: list[RouteCandidate]

    @classmethod
    def of(cls, route: Route) -> RouteInfo:
        return cls(
            rule=route.rule,
            reason=route.reason,
            missed=route.missed,
            queue_ms=route.queue_ms,
            candidates=[
                RouteCandidate(name=c.name, iou=c.iou, predicted_ms=c.predicted_ms)
                for c in route.candidates
            ],
        )


class GraphRef(BaseModel):
    name: str
    level: int
    precision: str
    output: str


class Timings(BaseModel):
    queue_ms: float
    inference_ms: float
    total_ms: float
    batches: int
    largest_batch: int
    tiles: int = Field(description="0: the image ran whole")


class CocoImage(BaseModel):
    id: int
    width: int
    height: int


class CocoSegmentation(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO's compressed RLE (pycocotools.mask.decode reads it)")


class CocoAnnotation(BaseModel):
    id: int = Field(description="the object's number, 1..N, as in format=instances")
    image_id: int
    category_id: int
    segmentation: CocoSegmentation
    area: int
    bbox: list[int] = Field(description="[x, y, width, height] in pixels")
    score: float = Field(description="the object's mean foreground probability")
    iscrowd: int


class CocoCategory(BaseModel):
    id: int
    name: str


class CocoResult(BaseModel):
    """format=coco: a binary model's separate objects, COCO-style (docs/instances.md)."""

    images: list[CocoImage]
    annotations: list[CocoAnnotation]
    categories: list[CocoCategory]


class SegmentResult(BaseModel):
    """format=json: the answer and how it was made."""

    model: str
    width: int
    height: int
    graph: GraphRef
    route: RouteInfo
    threshold: float
    mask: dict[str, Any] = Field(
        description="the rendered result: RLE mask (binary) or per-class RLE (multi-class), "
        "with areas and bounding boxes"
    )
    timings: Timings
    cascade: list[dict[str, Any]] | None = Field(
        None,
        description="mode=adaptive: per window (the image, or each tile: y, x in the padded "
        "image), the level it stopped at and the uncertain share after each level it ran",
    )
