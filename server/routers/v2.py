"""KServe v2 / Open Inference Protocol over HTTP, on the same service as /v1.

The model is the manifest's `name`; each served graph (L1..L4, ensemble, L1.int8, ...) is one
of its versions. Without a version, the request's `parameters` route it like /v1 (mode, level,
max_latency_ms, min_iou, precision, deadline_ms). Tensor contract (README, "KServe v2"):

- input `image`: [N, C, H, W] (C = 1..4) or [H, W]; raw pixels of any numeric datatype
  (UINT8, UINT16, FP32, ...), preprocessed by the manifest's recipe exactly like a decoded file;
- outputs `logits` and `probabilities` (FP32) and `mask` (UINT8, 0/1 at the manifest's
  threshold), each [N, K, H, W]; all three unless `outputs` names some.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from unetpp.core.errors import ImageTooLarge, UNetPPError
from unetpp.core.inference import logit_threshold
from unetpp.server import encoders, tensors
from unetpp.server.deps import ServiceDep, StateDep
from unetpp.server.errors import NotReady
from unetpp.server.routers.segment import RouteParams, route_headers
from unetpp.server.service import Service
from unetpp.server.tensors import InvalidTensor, Tensor

from unetpp import __version__

# The protocol is specified by the Open Inference Protocol itself (errors `{"error"}`, not the
# /v1 shape), so it stays out of this server's OpenAPI schema; README documents the contract.
public = APIRouter(prefix="/v2", include_in_schema=False)
router = APIRouter(prefix="/v2", include_in_schema=False)  # behind the API key (app.py)

INPUT = "image"
OUTPUTS = ("logits", "probabilities", "mask")
MODEL = "/models/{model_name}"
VERSION = "/models/{model_name}/versions/{model_version}"


class ModelNotFound(UNetPPError):
    status_code = 404
    error = "model_not_found"


class InferParameters(RouteParams):
    """The request-level `parameters` of an inference request."""

    binary_data_output: bool = False


def _graph(service: Service, model_name: str, version: str | None) -> str | None:
    """The graph a model name and optional version address (None: route by parameters)."""
    manifest = service.model.manifest
    if model_name != manifest.name:
        raise ModelNotFound(f"no model {model_name!r}; this server serves {manifest.name!r}")
    if version is not None and version not in service.runners:
        raise ModelNotFound(
            f"model {model_name!r} has no version {version!r}; versions: {', '.join(service.runners)}"
        )
    return version


@public.get("/health/live", summary="Liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@public.get("/health/ready", summary="Readiness (false while loading, failed or draining)")
async def ready(state: StateDep) -> dict[str, bool]:
    if state.draining:
        raise NotReady("the server is shutting down")
    state.current()
    return {"ready": True}


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "unetpp", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get(MODEL, summary="Model metadata: versions (the graphs), inputs, outputs")
@router.get(VERSION, summary="Metadata of one version (graph)")
async def model_metadata(
    model_name: str, service: ServiceDep, model_version: str | None = None
) -> dict[str, Any]:
    version = _graph(service, model_name, model_version)
    manifest = service.model.manifest
    k = manifest.num_classes
    return {
        "name": manifest.name,
        "versions": [version] if version else list(service.runners),
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": INPUT, "datatype": "FP32", "shape": [-1, manifest.in_channels, -1, -1]}
        ],
        "outputs": [
            {
                "name": name,
                "datatype": "UINT8" if name == "mask" else "FP32",
                "shape": [-1, k, -1, -1],
            }
            for name in OUTPUTS
        ],
    }


@router.get(MODEL + "/ready", summary="Model readiness")
@router.get(VERSION + "/ready", summary="Version readiness")
async def model_ready(
    model_name: str, service: ServiceDep, model_version: str | None = None
) -> dict[str, Any]:
    _graph(service, model_name, model_version)
    return {"name": model_name, "ready": True}


def _images(tensor: Tensor, max_pixels: int, max_side: int, max_images: int) -> list[np.ndarray]:
    """The `image` tensor -> HxW or HxWxC images, within the server's limits: each image's
    pixels and sides, and at most `max_images` (max_queue) per request, so one admission is
    bounded work."""
    array = tensor.array
    if array.dtype == np.bool_:
        raise InvalidTensor("input 'image' must hold numbers, not BOOL")
    if array.ndim == 2:
        array = array[None, None]
    if array.ndim != 4 or not 1 <= array.shape[1] <= 4 or 0 in array.shape:
        raise InvalidTensor(
            f"input 'image' must be [N, C, H, W] with C = 1..4 or [H, W]; got {list(tensor.array.shape)}"
        )
    h, w = array.shape[-2:]
    if h * w > max_pixels or max(h, w) > max_side:
        raise ImageTooLarge(
            f"{w}x{h} is above the limit ({max_pixels} pixels, {max_side} per side)"
        )
    if len(array) > max_images:
        raise ImageTooLarge(f"{len(array)} images in one request; the limit is {max_images}")
    if array.dtype.kind == "f":
        with np.errstate(over="ignore"):  # FP64 beyond float32 becomes inf: refused below
            finite = np.isfinite(array.astype(np.float32, copy=False)).all()
        if not finite:
            raise InvalidTensor("input 'image' holds NaN or infinite values (as FP32)")
    return [image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0) for image in array]


def _requested(header: dict[str, Any], binary_default: bool) -> list[tuple[str, bool]]:
    asked = header.get("outputs")
    if asked is None:
        return [(name, binary_default) for name in OUTPUTS]
    out = []
    for spec in asked if isinstance(asked, list) else [None]:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in OUTPUTS:
            raise InvalidTensor(f"outputs: each needs a 'name' among {', '.join(OUTPUTS)}")
        binary = tensors.parameters(spec, f"output {name!r}").get("binary_data", binary_default)
        out.append((name, bool(binary)))
    return out


def _outputs(
    logits: np.ndarray, threshold: float, requested: list[tuple[str, bool]]
) -> list[tuple[Tensor, bool]]:
    arrays = {
        "logits": lambda: logits,
        "probabilities": lambda: encoders.sigmoid(logits).astype(np.float32, copy=False),
        "mask": lambda: (logits > logit_threshold(threshold)).astype(np.uint8),
    }
    return [(Tensor(name, arrays[name]()), binary) for name, binary in requested]


@router.post(MODEL + "/infer", summary="Inference, routed by `parameters` like /v1")
@router.post(VERSION + "/infer", summary="Inference on one version (graph)")
async def infer(
    model_name: str, request: Request, service: ServiceDep, model_version: str | None = None
) -> Response:
    """JSON tensors, or the binary tensor extension (`Inference-Header-Content-Length`,
    `binary_data_size` on inputs, `binary_data` / `binary_data_output` for outputs)."""
    version = _graph(service, model_name, model_version)
    settings = service.settings
    async with service.admit() as admission:
        body = await request.body()
        header, inputs = await asyncio.to_thread(
            tensors.parse_request, body, request.headers.get(tensors.HEADER_LENGTH)
        )
        try:
            params = InferParameters.model_validate(header.get("parameters") or {})
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        admission.shorten(params.deadline_ms)
        if [t.name for t in inputs] != [INPUT]:
            raise InvalidTensor(f"give one input named {INPUT!r}; got {[t.name for t in inputs]}")
        requested = _requested(header, params.binary_data_output)
        images = _images(inputs[0], settings.max_pixels, settings.max_side, settings.max_queue)
        service.reserve(admission, sum(image.shape[0] * image.shape[1] for image in images))
        prepared = await asyncio.to_thread(lambda: [service.preprocess(i) for i in images])
        plan = service.plan(prepared[0])
        route = service.route(dataclasses.replace(params.choice(), graph=version), plan)
        admission.submitting()
        results = await asyncio.gather(
            *(service.infer(route.graph, p, plan, admission.deadline) for p in prepared)
        )
        graph = service.runners[route.graph].graph
        summary = dataclasses.replace(
            results[0],
            queue_ms=max(r.queue_ms for r in results),
            inference_ms=max(r.inference_ms for r in results),
        )
        body_json: dict[str, Any] = {
            "model_name": model_name,
            "model_version": route.graph,
            "parameters": {
                "graph": graph.name,
                "level": graph.level,
                "precision": graph.precision,
                "route_rule": route.rule,
                "route_reason": route.reason,
                "target_missed": route.missed,
                "queue_ms": round(summary.queue_ms, 3),
                "inference_ms": round(summary.inference_ms, 3),
            },
        }
        if isinstance(header.get("id"), str):
            body_json["id"] = header["id"]
        logits = np.stack([r.logits for r in results])
        threshold = service.model.manifest.threshold
        content, header_length = await asyncio.to_thread(
            lambda: tensors.encode_response(body_json, _outputs(logits, threshold, requested))
        )
    headers = route_headers(graph, route, summary)
    if header_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers[tensors.HEADER_LENGTH] = str(header_length)
    return Response(content, media_type="application/octet-stream", headers=headers)
