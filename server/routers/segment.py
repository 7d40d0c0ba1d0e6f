"""POST /v1/segment and /v1/models/{model}/segment: one image in, a mask (label map,
probabilities, ...) out, from the graph the request's routing parameters choose."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from unetpp.core import cascade
from unetpp.core.errors import BadParameter
from unetpp.core.imageio import encode_png
from unetpp.core.manifest import LEVELS
from unetpp.core.render import render
from unetpp.core.routing import Choice, Mode, Precision
from unetpp.server import facade
from unetpp.server.admission import BodyHold
from unetpp.server.deps import RegistryDep
from unetpp.server.errors import UnsupportedMediaType
from unetpp.server.facade import Outcome
from unetpp.server.registry import Registry
from unetpp.server.schemas import CocoResult, GraphRef, RouteInfo, SegmentResult, Timings

router = APIRouter(prefix="/v1", tags=["segmentation"])

IMAGE_TYPES = ("image/png", "image/jpeg", "image/tiff")


class RouteParams(BaseModel):
    """Routing (at most one of level, mode, max_latency_ms, min_iou; none: the default mode),
    precision and deadline; shared by /v1/segment (query) and /v2 infer (`parameters`)."""

    model_config = ConfigDict(extra="forbid")

    level: int | None = Field(
        None, ge=LEVELS[0], le=LEVELS[-1], description="pruning depth L1..L4, explicitly"
    )
    mode: Mode | None = Field(
        None,
        description="accurate: best measured IoU; balanced: knee of the accuracy/latency front "
        "among graphs no slower than accurate's; fast: fastest within the IoU tolerance of "
        "balanced's pick, no slower and no more accurate (docs/routing.md); adaptive: the "
        "cascade, each image or tile only as deep as it needs (docs/adaptive.md)",
    )
    target: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="mode=adaptive: the IoU the cascade may lose against the deepest graph, one "
        "of the calibrated targets (GET /v1/models; default the middle one)",
    )
    max_latency_ms: float | None = Field(
        None, gt=0, description="latency budget incl. queue wait; the most accurate graph that fits"
    )
    min_iou: float | None = Field(
        None,
        ge=0,
        le=1,
        description="accuracy floor; the fastest graph whose measured IoU reaches it",
    )
    precision: Precision = Field("auto", description="fp32, int8, bf16, or auto (any)")
    deadline_ms: float | None = Field(
        None, gt=0, description="give up after this long (default and cap: the server's timeout)"
    )

    def choice(self) -> Choice:
        return Choice(
            self.level,
            self.mode,
            self.max_latency_ms,
            self.min_iou,
            self.precision,
            target=self.target,
        )


class SegmentParams(RouteParams):
    """The routing parameters, plus the output format."""

    format: Literal[
        "png",
        "json",
        "overlay",
        "probabilities",
        "instances",
        "geojson",
        "coco",
        "uncertainty",
        "levels",
    ] = Field(
        "png",
        description="png: 0/255 mask (multi-class: 8-bit label map, 0 background); json: "
        "RLE mask, area, bbox (multi-class: per class), graph, timings; overlay: the image "
        "with the mask (each class) drawn in its colour; probabilities: see `encoding`. "
        "Binary models only, separate objects (touching ones split): instances: 16-bit PNG "
        "label image (0 background, 1..N); geojson: FeatureCollection, one Polygon per "
        "object in pixel coordinates (QuPath detections: objectType, classification, area, "
        "probability); coco: COCO images/annotations/categories with compressed RLE masks, "
        "bbox, area, score. Binary models with a cascade, from one pass of the whole network "
        "whatever the routing says: uncertainty: 16-bit PNG of the heads' disagreement (max - "
        "min probability, x 65535); levels: JSON with the L1..L4 masks (RLE) at once",
    )
    encoding: Literal["png16", "npy"] = Field(
        "png16",
        description="for format=probabilities: 16-bit PNG, p * 65535 (multi-class: a 16-bit TIFF, "
        "one page per class), or float32 NPY [H, W] (multi-class: [K, H, W])",
    )


REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"image": {"type": "string", "format": "binary"}},
                "required": ["image"],
            }
        },
        **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
    },
    "description": "PNG, JPEG or TIFF; 8/16-bit; grey, RGB, RGBA or palette. Multipart field "
    "`image`, or the raw body with an image content type.",
}

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": SegmentResult | CocoResult,  # format=json | format=coco
        "description": "The result; headers X-UNetPP-Model, -Graph, -Level, -Precision, -Route-Reason, "
        "-Inference-Ms, -Queue-Ms (and -Target-Missed when a budget or floor was missed), "
        "Server-Timing (decode, queue, infer, render, total)",
        "content": {
            "image/png": {},
            "image/tiff": {},
            "application/json": {},
            "application/geo+json": {},
            "application/x-npy": {},
        },
    },
    400: {"description": "undecodable image"},
    404: {"description": "no such model"},
    408: {"description": "the body arrived slower than the minimum rate"},
    413: {"description": "body, pixels or a side above the limits"},
    415: {"description": "not an image content type, or an unsupported image format"},
    422: {"description": "bad or conflicting parameters"},
    503: {"description": "not ready, or queue full (Retry-After)"},
    504: {"description": "deadline exceeded"},
}


async def _stream(request: Request, hold: BodyHold) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        hold.grow(size)
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


@contextlib.asynccontextmanager
async def image_field(request: Request) -> AsyncIterator[UploadFile]:
    """The multipart body's file field `image` (spooled to disk above 1 MB by the parser)."""
    async with request.form(max_files=1, max_fields=16) as form:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise BadParameter("the multipart body needs a file field named 'image'")
        yield upload


async def read_image_bytes(request: Request, hold: BodyHold) -> bytes:
    """The image of a /v1 request (multipart field `image`, or the raw body), held against the
    budget of bodies in flight as it arrives."""
    content_type = media_type(request)
    if content_type == "multipart/form-data":
        async with image_field(request) as upload:
            hold.grow(upload.size or 0)
            return await upload.read()
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return await _stream(request, hold)
    raise UnsupportedMediaType(
        f"content type {content_type or '(none)'!r}: send the image as multipart field 'image' "
        f"or as the body with an image content type ({', '.join(IMAGE_TYPES)})"
    )


def _answer(params: SegmentParams, outcome: Outcome) -> Response:
    """Render one image's result in the requested format (in a thread: see facade)."""
    engine, prepared = outcome.engine, outcome.prepared[0]
    manifest = engine.model.manifest
    if params.format in HEADS_FORMATS:
        return _heads_answer(params, outcome)
    rendered = render(
        manifest.task,
        outcome.results[0].logits,
        prepared.image,
        params.format,
        encoding=params.encoding,
    )
    headers = outcome.headers()
    if params.format != "json":
        return Response(rendered.content, media_type=rendered.media_type, headers=headers)
    graph = outcome.graph
    assert isinstance(rendered.content, dict)
    body = SegmentResult(
        model=engine.name,
        width=int(prepared.image.shape[1]),
        height=int(prepared.image.shape[0]),
        graph=GraphRef(
            name=outcome.route.graph,
            level=outcome.cascade.level if outcome.cascade else graph.level,
            precision=graph.precision,
            output="adaptive" if outcome.cascade else graph.output,
        ),
        route=RouteInfo.of(outcome.route),
        threshold=manifest.threshold,
        mask=rendered.content,
        timings=Timings(**outcome.timings()),
        cascade=_windows(outcome),
    )
    return JSONResponse(body.model_dump(mode="json"), headers=headers)


HEADS_FORMATS = ("uncertainty", "levels")


def _windows(outcome: Outcome) -> list[dict[str, Any]] | None:
    """mode=adaptive: how deep each window (the image, or each tile) went."""
    if outcome.cascade is None:
        return None
    return [
        {"y": w.y, "x": w.x, "level": w.level, "uncertain": [round(s, 4) for s in w.shares]}
        for w in outcome.cascade.windows
    ]


def _heads_answer(params: SegmentParams, outcome: Outcome) -> Response:
    """format=uncertainty or levels, from every head's logits (one channel each)."""
    engine, prepared = outcome.engine, outcome.prepared[0]
    manifest = engine.model.manifest
    logits = outcome.results[0].logits
    heads = [logits[k : k + 1] for k in range(logits.shape[0])]
    headers = outcome.headers()
    quality = None
    if engine.cascade and cascade.quality_ships(engine.cascade.record):
        quality = round(cascade.agreement(heads[-2], heads[-1], manifest.threshold), 4)
        headers["X-UNetPP-Quality"] = f"{quality:.4f}"
    if params.format == "uncertainty":
        png = encode_png(cascade.disagreement_u16(heads))
        return Response(png, media_type="image/png", headers=headers)
    body = {
        "model": engine.name,
        "width": int(prepared.image.shape[1]),
        "height": int(prepared.image.shape[0]),
        "threshold": manifest.threshold,
        "quality": quality,
        "levels": {
            f"L{k}": render(manifest.task, head, prepared.image, "json").content
            for k, head in enumerate(heads, 1)
        },
        "timings": outcome.timings(),
    }
    return JSONResponse(body, headers=headers)


async def _segment(
    request: Request, params: SegmentParams, registry: Registry, model: str | None
) -> Response:
    with registry.lease(model) as engine:  # an unknown model is a 404 before the body is read
        async with registry.gate.receiving() as hold:
            data = await read_image_bytes(request, hold)
            return await facade.segment(
                engine,
                facade.EncodedImage(data),
                params.choice(),
                partial(_answer, params),
                deadline_ms=params.deadline_ms,
                heads=params.format in HEADS_FORMATS,
                cheap_render=params.format in ("png", "json"),
            )


SEGMENT = {
    "openapi_extra": {"requestBody": REQUEST_BODY},
    "responses": RESPONSES,
    "response_class": Response,
}


@router.post("/segment", summary="Segment one image with the default model", **SEGMENT)
async def segment(
    request: Request, params: Annotated[SegmentParams, Query()], registry: RegistryDep
) -> Response:
    """Decode, preprocess (the manifest's recipe), choose a graph, run it batched with other
    requests (tiled when large), decide and render. The result has the input's size."""
    return await _segment(request, params, registry, None)


@router.post("/models/{model}/segment", summary="Segment one image with a named model", **SEGMENT)
async def segment_with(
    model: str,
    request: Request,
    params: Annotated[SegmentParams, Query()],
    registry: RegistryDep,
) -> Response:
    """As /v1/segment, with the model named in the path (GET /v1/models lists them)."""
    return await _segment(request, params, registry, model)
