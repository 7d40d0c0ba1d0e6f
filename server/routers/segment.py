"""POST /v1/segment: one image in, a mask (or probabilities) out, from the graph the request's
routing parameters choose."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from unetpp.core.errors import BadParameter
from unetpp.core.inference import logit_threshold
from unetpp.core.manifest import Graph
from unetpp.core.routing import Choice, Mode, Precision, Route
from unetpp.server import encoders
from unetpp.server.deps import ServiceDep
from unetpp.server.errors import UnsupportedMediaType
from unetpp.server.service import Inference

router = APIRouter(prefix="/v1", tags=["segmentation"])

IMAGE_TYPES = ("image/png", "image/jpeg", "image/tiff")


class RouteParams(BaseModel):
    """Routing (at most one of level, mode, max_latency_ms, min_iou; none: the default mode),
    precision and deadline; shared by /v1/segment (query) and /v2 infer (`parameters`)."""

    model_config = ConfigDict(extra="forbid")

    level: int | None = Field(None, ge=1, le=4, description="pruning depth L1..L4, explicitly")
    mode: Mode | None = Field(
        None,
        description="fast: fastest within the IoU tolerance of the best; balanced: knee of the "
        "accuracy/latency front; accurate: best measured IoU",
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
    precision: Precision = Field("auto", description="fp32, int8, or auto (either)")
    deadline_ms: float | None = Field(
        None, gt=0, description="give up after this long (default and cap: the server's timeout)"
    )

    def choice(self) -> Choice:
        return Choice(self.level, self.mode, self.max_latency_ms, self.min_iou, self.precision)


class SegmentParams(RouteParams):
    """The routing parameters, plus the output format."""

    format: Literal["png", "json", "overlay", "probabilities"] = Field(
        "png",
        description="png: 0/255 mask; json: RLE mask, area, bbox, graph, timings; overlay: the "
        "image with the mask drawn; probabilities: see `encoding`",
    )
    encoding: Literal["png16", "npy"] = Field(
        "png16", description="for format=probabilities: 16-bit PNG (p * 65535) or float32 NPY"
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
        "description": "The result; headers X-UNetPP-Graph, -Level, -Precision, -Route-Reason, "
        "-Inference-Ms, -Queue-Ms (and -Target-Missed when a budget or floor was missed)",
        "content": {
            "image/png": {},
            "application/json": {},
            "application/x-npy": {},
        },
    },
    400: {"description": "undecodable image"},
    413: {"description": "body, pixels or a side above the limits"},
    415: {"description": "not an image content type, or an unsupported image format"},
    422: {"description": "bad or conflicting parameters"},
    503: {"description": "not ready, or queue full (Retry-After)"},
    504: {"description": "deadline exceeded"},
}


async def read_image_bytes(request: Request) -> bytes:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async with request.form(max_files=1, max_fields=16) as form:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise BadParameter("the multipart body needs a file field named 'image'")
            return await upload.read()
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return await request.body()
    raise UnsupportedMediaType(
        f"content type {content_type or '(none)'!r}: send the image as multipart field 'image' "
        f"or as the body with an image content type ({', '.join(IMAGE_TYPES)})"
    )


@router.post(
    "/segment",
    summary="Segment one image",
    openapi_extra={"requestBody": REQUEST_BODY},
    responses=RESPONSES,
    response_class=Response,
)
async def segment(
    request: Request,
    params: Annotated[SegmentParams, Query()],
    service: ServiceDep,
) -> Response:
    """Decode, preprocess (the manifest's recipe), choose a graph, run it batched with other
    requests (tiled above the size limit), threshold and encode. The mask has the input's size."""
    start = time.monotonic()
    manifest = service.model.manifest
    async with service.admit(params.deadline_ms) as admission:
        data = await read_image_bytes(request)
        prepared = await asyncio.to_thread(service.prepare, data, admission)
        plan = service.plan(prepared)
        route = service.route(params.choice(), plan)
        admission.submitting()
        result = await service.infer(route.graph, prepared, plan, admission.deadline)
        cut = logit_threshold(manifest.threshold)
        mask, content, media_type = await asyncio.to_thread(
            _render, params, prepared.image, result.logits[0], cut
        )
        graph = service.runners[route.graph].graph
        headers = route_headers(graph, route, result)
        if params.format == "json":
            timings = {
                "queue_ms": round(result.queue_ms, 3),
                "inference_ms": round(result.inference_ms, 3),
                "total_ms": round(1000.0 * (time.monotonic() - start), 3),
                "batches": result.batches,
                "largest_batch": result.largest_batch,
                "tiles": plan.tiles,
            }
            body = {
                "width": int(mask.shape[1]),
                "height": int(mask.shape[0]),
                "graph": {
                    "name": graph.name,
                    "level": graph.level,
                    "precision": graph.precision,
                    "output": graph.output,
                },
                "route": route_json(route),
                "threshold": manifest.threshold,
                "mask": content,
                "timings": timings,
            }
            # rendering a large mask's RLE takes a while: off the event loop too
            return await asyncio.to_thread(JSONResponse, body, headers=headers)
        return Response(content, media_type=media_type, headers=headers)


def route_headers(graph: Graph, route: Route, result: Inference) -> dict[str, str]:
    headers = {
        "X-UNetPP-Graph": graph.name,
        "X-UNetPP-Level": str(graph.level),
        "X-UNetPP-Precision": graph.precision,
        "X-UNetPP-Route-Reason": route.reason,
        "X-UNetPP-Inference-Ms": f"{result.inference_ms:.3f}",
        "X-UNetPP-Queue-Ms": f"{result.queue_ms:.3f}",
    }
    if route.missed:
        headers["X-UNetPP-Target-Missed"] = route.rule
    return headers


def route_json(route: Route) -> dict[str, Any]:
    return {
        "rule": route.rule,
        "reason": route.reason,
        "missed": route.missed,
        "queue_ms": route.queue_ms,
        "candidates": [
            {"name": c.name, "iou": c.iou, "predicted_ms": c.predicted_ms} for c in route.candidates
        ],
    }


def _render(
    params: SegmentParams, image: np.ndarray, logits: np.ndarray, cut: float
) -> tuple[np.ndarray, Any, str]:
    """Threshold and encode in one go (one thread hop): the mask, the content, its media type
    (for format=json the content is the mask's JSON object)."""
    mask = logits > cut
    if params.format == "json":
        return mask, encoders.mask_json(mask), "application/json"
    if params.format == "png":
        return mask, encoders.mask_png(mask), "image/png"
    if params.format == "overlay":
        return mask, encoders.overlay_png(image, mask), "image/png"
    probabilities = encoders.sigmoid(logits)
    if params.encoding == "npy":
        return mask, encoders.probabilities_npy(probabilities), "application/x-npy"
    return mask, encoders.probabilities_png16(probabilities), "image/png"
