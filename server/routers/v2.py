"""KServe v2 / Open Inference Protocol over HTTP, on the same service as /v1.

The model is the manifest's `name`; each served graph (L1..L4, ensemble, L1.int8, ...) is one
of its versions. Without a version, the request's `parameters` route it like /v1 (mode, level,
max_latency_ms, min_iou, precision, deadline_ms). Tensor contract (docs/operations.md, "The tensor contract"):

- input `image`: [N, C, H, W] (C = 1..4) or [H, W]; raw pixels of any numeric datatype
  (UINT8, UINT16, FP32, ...), preprocessed by the manifest's recipe exactly like a decoded file;
- outputs `logits` and `probabilities` (FP32) and `mask` (UINT8, 0/1: the task's decision,
  the thresholded foreground or, for a multi-class model, the one-hot label map), each
  [N, K, H, W]; all three unless `outputs` names some.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from unetpp import __version__
from unetpp.core.errors import ImageTooLarge
from unetpp.core.task import Task
from unetpp.server import facade, tensors
from unetpp.server.deps import RegistryDep
from unetpp.server.errors import ModelNotFound, NotReady
from unetpp.server.facade import Outcome
from unetpp.server.registry import Registry
from unetpp.server.routers.segment import RouteParams
from unetpp.server.security import AdminAllowed
from unetpp.server.tensors import InvalidTensor, Tensor

# The protocol is specified by the Open Inference Protocol itself (errors `{"error"}`, not the
# /v1 shape), so it stays out of this server's OpenAPI schema; docs/api.md documents the contract.
public = APIRouter(prefix="/v2", include_in_schema=False)
router = APIRouter(prefix="/v2", include_in_schema=False)  # behind the API key (app.py)
# the model repository extension (Triton's): model control, for operators only
repository = APIRouter(
    prefix="/v2/repository", include_in_schema=False, dependencies=[AdminAllowed]
)

INPUT = "image"
OUTPUTS = ("logits", "probabilities", "mask")
MODEL = "/models/{model_name}"
VERSION = "/models/{model_name}/versions/{model_version}"


class InferParameters(RouteParams):
    """The request-level `parameters` of an inference request."""

    binary_data_output: bool = False


def _version(registry: Registry, model_name: str, version: str | None) -> str | None:
    """The graph a model name and optional version address (None: route by parameters)."""
    engine = registry.engine(model_name)
    if version is not None and version not in engine.runners:
        raise ModelNotFound(
            f"model {model_name!r} has no version {version!r}; versions: {', '.join(engine.runners)}"
        )
    return version


@public.get("/health/live", summary="Liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@public.get("/health/ready", summary="Readiness (false while loading, failed or draining)")
async def ready(registry: RegistryDep) -> dict[str, bool]:
    if not registry.ready:
        raise NotReady("no model is ready" if not registry.draining else "shutting down")
    return {"ready": True}


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {
        "name": "unetpp",
        "version": __version__,
        "extensions": ["binary_tensor_data", "model_repository"],
    }


@router.get(MODEL, summary="Model metadata: versions (the graphs), inputs, outputs")
@router.get(VERSION, summary="Metadata of one version (graph)")
async def model_metadata(
    model_name: str, registry: RegistryDep, model_version: str | None = None
) -> dict[str, Any]:
    version = _version(registry, model_name, model_version)
    engine = registry.engine(model_name)
    manifest = engine.model.manifest
    k = manifest.num_classes
    return {
        "name": model_name,
        "versions": [version] if version else list(engine.runners),
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
    model_name: str, registry: RegistryDep, model_version: str | None = None
) -> dict[str, Any]:
    _version(registry, model_name, model_version)
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
    logits: np.ndarray, task: Task, requested: list[tuple[str, bool]]
) -> list[tuple[Tensor, bool]]:
    arrays = {
        "logits": lambda: logits,
        "probabilities": lambda: task.probabilities(logits),
        "mask": lambda: task.masks(logits),
    }
    return [(Tensor(name, arrays[name]()), binary) for name, binary in requested]


def _answer(
    header: dict[str, Any], requested: list[tuple[str, bool]], outcome: Outcome
) -> Response:
    """The inference response (in a thread: see facade)."""
    graph, route = outcome.graph, outcome.route
    body: dict[str, Any] = {
        "model_name": outcome.engine.name,
        "model_version": route.graph,
        "parameters": {
            "graph": graph.name,
            "level": graph.level,
            "precision": graph.precision,
            "route_rule": route.rule,
            "route_reason": route.reason,
            "target_missed": route.missed,
            "queue_ms": round(outcome.queue_ms, 3),
            "inference_ms": round(outcome.inference_ms, 3),
        },
    }
    if isinstance(header.get("id"), str):
        body["id"] = header["id"]
    task = outcome.engine.model.manifest.task
    content, header_length = tensors.encode_response(
        body, _outputs(outcome.logits, task, requested)
    )
    headers = outcome.headers()
    if header_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers[tensors.HEADER_LENGTH] = str(header_length)
    return Response(content, media_type="application/octet-stream", headers=headers)


@router.post(MODEL + "/infer", summary="Inference, routed by `parameters` like /v1")
@router.post(VERSION + "/infer", summary="Inference on one version (graph)")
async def infer(
    model_name: str, request: Request, registry: RegistryDep, model_version: str | None = None
) -> Response:
    """JSON tensors, or the binary tensor extension (`Inference-Header-Content-Length`,
    `binary_data_size` on inputs, `binary_data` / `binary_data_output` for outputs)."""
    version = _version(registry, model_name, model_version)
    settings = registry.settings
    with registry.lease(model_name) as engine:
        async with registry.gate.receiving() as hold:
            if request.headers.get("content-length", "").isdigit():
                hold.grow(int(request.headers["content-length"]))
            body = await request.body()
            hold.grow(len(body))
            header, inputs = await asyncio.to_thread(
                tensors.parse_request, body, request.headers.get(tensors.HEADER_LENGTH)
            )
            try:
                params = InferParameters.model_validate(header.get("parameters") or {})
            except ValidationError as exc:
                raise RequestValidationError(exc.errors()) from exc
            if [t.name for t in inputs] != [INPUT]:
                names = [t.name for t in inputs]
                raise InvalidTensor(f"give one input named {INPUT!r}; got {names}")
            requested = _requested(header, params.binary_data_output)
            images = _images(inputs[0], settings.max_pixels, settings.max_side, settings.max_queue)
            return await facade.segment(
                engine,
                facade.Pixels(images),
                dataclasses.replace(params.choice(), graph=version),
                lambda outcome: _answer(header, requested, outcome),
                deadline_ms=params.deadline_ms,
            )


@repository.post("/index", summary="The models of the repository and their states")
async def index(registry: RegistryDep) -> list[dict[str, Any]]:
    registry.scan()
    out = []
    for slot in registry.slots.values():
        entry: dict[str, Any] = {"name": slot.name, "state": STATES[slot.state]}
        if slot.engine is not None:
            entry["version"] = str(slot.engine.model.manifest.version)
        if slot.error:
            entry["reason"] = slot.error
        out.append(entry)
    return out


STATES = {
    "ready": "READY",
    "loading": "LOADING",
    "failed": "UNAVAILABLE",
    "unloaded": "UNAVAILABLE",
}


@repository.post("/models/{model_name}/load", summary="Load (or reload) one model")
async def load(model_name: str, registry: RegistryDep) -> dict[str, Any]:
    """Loads the model from its folder beside what serves, then swaps it in; requests already
    running finish on the old version. A model that fails to load keeps its old version."""
    engine = await registry.load(model_name)
    return {"name": model_name, "state": "READY", "version": str(engine.model.manifest.version)}


@repository.post("/models/{model_name}/unload", summary="Unload one model")
async def unload(model_name: str, registry: RegistryDep) -> dict[str, Any]:
    """Stops serving it at once; its memory is freed when its last request ends."""
    await registry.unload(model_name)
    return {"name": model_name, "state": "UNAVAILABLE"}
