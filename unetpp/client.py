"""A Python client for a unetpp server: /v1 segmentation, KServe v2 inference, model control.

`Client` (blocking) and `AsyncClient` (asyncio) share everything but the sending loop: each
call is built once as a `Call` (method, path, body, how to read the answer), and both clients
send it with the same retry policy. docs/client.md is the user's page.

    with Client("http://localhost:8000", api_key="...") as client:
        result = client.segment("cells.png", mode="fast")
        result.array        # the mask as numpy (uint8, 0/255)
        result.graph        # "L2", and result.route_reason says why

Retries: a 503 (queue full, not ready) is retried for any call, after the server's Retry-After
when it sends one, else with a doubling back-off; a connection that could not be opened
likewise; a connection lost after the request went out only for calls without side effects
(everything but model control). Both bounded by `Retry.attempts` and `Retry.total_s`. A model
that failed to load or was unloaded (503 model_unavailable) is not retried.
Every error answer raises `APIError` with the status, the error code and the detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, Literal, TypedDict, TypeVar, Unpack

import httpx
import numpy as np
from PIL import Image

from unetpp.server.tensors import DATATYPES, HEADER_LENGTH, datatype_of

T = TypeVar("T")
CHUNK = 1 << 20  # bytes per read of a streamed upload or download
ImageInput = str | Path | bytes | np.ndarray
Format = Literal["png", "json", "overlay", "probabilities"] | str  # servers may add formats

MAGIC = {
    b"\x89PNG": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
    b"II*\x00": "image/tiff",
    b"MM\x00*": "image/tiff",
    b"II+\x00": "image/tiff",  # BigTIFF
    b"MM\x00+": "image/tiff",
}


class APIError(Exception):
    """An error answer (or no answer) from the server. `status` is 0 when none came."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{status} {error}: {detail}" if status else f"{error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.retry_after = retry_after
        self.request_id = request_id


@dataclass(frozen=True)
class Retry:
    """At most `attempts` tries within `total_s` seconds; without a Retry-After, waits of
    `backoff_s` doubling up to `max_wait_s`."""

    attempts: int = 5
    total_s: float = 60.0
    backoff_s: float = 0.25
    max_wait_s: float = 10.0

    def delay(self, attempt: int, elapsed: float, retry_after: float | None) -> float | None:
        """Seconds to wait before try `attempt + 1`, or None to give up."""
        if attempt >= self.attempts:
            return None
        wait = (
            retry_after
            if retry_after is not None
            else min(self.backoff_s * 2 ** (attempt - 1), self.max_wait_s)
        )
        return wait if elapsed + wait <= self.total_s else None


class RouteOptions(TypedDict, total=False):
    """Routing (at most one of level, mode, max_latency_ms, min_iou), precision, deadline."""

    level: int
    mode: str
    max_latency_ms: float
    min_iou: float
    precision: str
    deadline_ms: float


class SegmentOptions(RouteOptions, total=False):
    model: str | None  # None: the server's default model
    format: Format
    encoding: str  # format=probabilities: png16 or npy


class JobOptions(RouteOptions, total=False):
    model: str | None  # None: the server's default model


class InferOptions(RouteOptions, total=False):
    version: str | None  # a graph (L1, L4.int8, ...): no routing
    outputs: tuple[str, ...] | None  # of logits, probabilities, mask (default: all three)


@dataclass(frozen=True)
class SegmentResult:
    """One /v1 segmentation answer: the body and the route from the response headers.

    `array` is the body as numpy when it is an image or an NPY array (the mask, label map,
    overlay or probabilities; None otherwise); `json` is the body when it is JSON."""

    content: bytes
    media_type: str
    graph: str
    level: int | None
    precision: str
    route_reason: str
    target_missed: str | None  # the rule whose budget or floor was missed
    inference_ms: float
    queue_ms: float
    request_id: str | None

    @cached_property
    def array(self) -> np.ndarray | None:
        return decode_body(self.content, self.media_type)

    @cached_property
    def json(self) -> Any:
        return json.loads(self.content) if self.media_type.endswith("json") else None


@dataclass(frozen=True)
class InferResult:
    """One /v2 inference answer: the output tensors by name and the response's parameters
    (graph, level, precision, route_rule, route_reason, target_missed, queue_ms, ...)."""

    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request and how its answer becomes the caller's result."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    safe: bool = True  # no side effects: may be sent again after a lost connection
    upload: Path | None = None  # a file streamed as the body (blocking Client only)


def decode_body(content: bytes, media_type: str) -> np.ndarray | None:
    """An image (PNG, TIFF: every page, stacked) or NPY body as numpy; None for other types."""
    if media_type == "application/x-npy":
        return np.load(io.BytesIO(content), allow_pickle=False)
    if not media_type.startswith("image/"):
        return None
    with Image.open(io.BytesIO(content)) as img:
        pages = []
        for k in range(getattr(img, "n_frames", 1)):
            img.seek(k)
            pages.append(np.asarray(img).copy())
    return pages[0] if len(pages) == 1 else np.stack(pages)


def encode_image(image: ImageInput) -> tuple[bytes, str]:
    """The body and content type for an image: a file's bytes, bytes as they are, an array as
    a lossless 8- or 16-bit PNG (HxW grey, HxWx3 RGB or HxWx4 RGBA)."""
    if isinstance(image, np.ndarray):
        return png_of(image), "image/png"
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    kind = next((t for magic, t in MAGIC.items() if data.startswith(magic)), None)
    return data, kind or "application/octet-stream"


def png_of(array: np.ndarray) -> bytes:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * np.uint8(255)
    elif array.dtype.kind in "iu" and array.size and array.min() >= 0:
        top = int(array.max())
        if top <= 255:
            array = array.astype(np.uint8)
        elif top <= 65535 and array.ndim == 2:
            array = array.astype(np.uint16)
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"a {array.dtype} image (values {array.min()}..{array.max()}) has no lossless PNG: "
            "send 8-bit (or 16-bit grey) integers, or raw values with Client.infer"
        )
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _float(value: str | None) -> float:
    try:
        return float(value) if value is not None else 0.0
    except ValueError:
        return 0.0


def read_segment(response: httpx.Response) -> SegmentResult:
    h = response.headers
    level = h.get("X-UNetPP-Level")
    return SegmentResult(
        content=response.content,
        media_type=h.get("content-type", "").split(";")[0].strip(),
        graph=h.get("X-UNetPP-Graph", ""),
        level=int(level) if level and level.isdigit() else None,
        precision=h.get("X-UNetPP-Precision", ""),
        route_reason=h.get("X-UNetPP-Route-Reason", ""),
        target_missed=h.get("X-UNetPP-Target-Missed"),
        inference_ms=_float(h.get("X-UNetPP-Inference-Ms")),
        queue_ms=_float(h.get("X-UNetPP-Queue-Ms")),
        request_id=h.get("X-Request-ID"),
    )


def read_json(response: httpx.Response) -> Any:
    return response.json()


def read_optional_json(response: httpx.Response) -> Any:
    return response.json() if response.content else None


def _route_values(options: RouteOptions) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def segment_call(image: ImageInput, options: SegmentOptions) -> Call[SegmentResult]:
    params = dict(options)
    model = params.pop("model", None)
    content, content_type = encode_image(image)
    path = f"/v1/models/{model}/segment" if model else "/v1/segment"
    return Call(
        "POST",
        path,
        read_segment,
        params=_route_values(params),  # type: ignore[arg-type]
        content=content,
        headers={"content-type": content_type},
    )


def job_call(path: str | Path, options: JobOptions) -> Call[Any]:
    """POST /v1/jobs: the TIFF at `path`, streamed."""
    params = {k: v for k, v in options.items() if v is not None}
    return Call(
        "POST",
        "/v1/jobs",
        read_json,
        params=params,
        headers={"content-type": "image/tiff"},
        safe=False,
        upload=Path(path),
    )


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def infer_call(model: str, inputs: np.ndarray, options: InferOptions) -> Call[InferResult]:
    """A v2 inference request with the binary tensor extension both ways."""
    route = {k: v for k, v in options.items() if k not in ("version", "outputs")}
    array = np.ascontiguousarray(inputs)
    raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": "image",
                "datatype": datatype_of(array),
                "shape": list(array.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "parameters": {**_route_values(route), "binary_data_output": True},
    }
    outputs = options.get("outputs")
    if outputs is not None:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    body = json.dumps(header).encode()
    version = options.get("version")
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return Call(
        "POST",
        path,
        read_infer,
        content=body + raw,
        headers={"content-type": "application/octet-stream", HEADER_LENGTH: str(len(body))},
    )


def read_infer(response: httpx.Response) -> InferResult:
    data = response.content
    length = int(response.headers.get(HEADER_LENGTH, len(data)))
    header = json.loads(data[:length])
    offset = length
    outputs = {}
    for out in header.get("outputs", []):
        dtype = DATATYPES[out["datatype"]]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            array = np.asarray(out["data"], dtype=dtype)
        else:
            array = np.frombuffer(data, dtype, size // dtype.itemsize, offset)
            offset += size
        outputs[out["name"]] = array.reshape(out["shape"])
    return InferResult(
        header.get("model_name", ""),
        header.get("model_version", ""),
        outputs,
        header.get("parameters") or {},
    )


def api_error(response: httpx.Response) -> APIError:
    """The error of a non-2xx answer: /v1's {"error", "detail"} or /v2's {"error": "code: text"}."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        error, detail = body["error"], body.get("detail")
        if detail is None:
            error, _, detail = error.partition(": ")
    else:
        error, detail = "http_error", response.text[:500] or response.reason_phrase
    return APIError(
        response.status_code,
        error,
        str(detail),
        retry_after=retry_after(response.headers.get("Retry-After")),
        request_id=response.headers.get("X-Request-ID"),
    )


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return max(when.timestamp() - time.time(), 0.0) if when else None


class _Base:
    """What both clients hold: the server's address, the key, timeouts, the retry policy.
    `http` passes more options to the httpx client (verify, proxy, event_hooks, transport)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retry: Retry = Retry(),
        http: dict[str, Any] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retry = retry
        self._options: dict[str, Any] = {
            "base_url": self.url,
            "timeout": timeout,
            "headers": {"Authorization": f"Bearer {api_key}"} if api_key else {},
            **(http or {}),
        }

    def _settle(
        self,
        call: Call[T],
        tried: tuple[int, float],
        response: httpx.Response | None,
        failure: httpx.TransportError | None,
    ) -> tuple[bool, Any]:
        """After try `tried[0]` (the first began at `tried[1]`): (True, the result), or
        (False, seconds to wait before the next try); raises the APIError when giving up."""
        if response is not None and response.is_success:
            return True, call.read(response)
        if response is not None:
            error = api_error(response)
            # a model that failed to load or was unloaded stays so until an operator acts
            retryable = response.status_code == 503 and error.error != "model_unavailable"
        else:
            unsent = isinstance(failure, httpx.ConnectError | httpx.ConnectTimeout)
            where = f"{call.method} {self.url}{call.path}"
            error = APIError(0, "connection_error", f"{where}: {failure}")
            retryable = unsent or call.safe
        attempt, start = tried
        wait = self.retry.delay(attempt, time.monotonic() - start, error.retry_after)
        if not retryable or wait is None:
            raise error
        return False, wait

    def _request(self, call: Call[Any]) -> dict[str, Any]:
        return {
            "method": call.method,
            "url": call.path,
            "params": call.params,
            "content": _chunks(call.upload) if call.upload else call.content,
            "headers": call.headers,
        }


def ready_path(model: str | None) -> str:
    return "/readyz" if model is None else f"/v2/models/{model}/ready"


def _model_control(action: str, name: str | None = None) -> Call[Any]:
    """index, load NAME, unload NAME (the repository extension), reload (every model)."""
    paths = {"index": "/v2/repository/index", "reload": "/v1/admin/reload"}
    path = paths[action] if name is None else f"/v2/repository/models/{name}/{action}"
    return Call("POST", path, read_optional_json, safe=action == "index")


class Client(_Base):
    """A blocking client; use it as a context manager (or call `close`)."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self._http = httpx.Client(**self._options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, call: Call[T]) -> T:
        start, attempt = time.monotonic(), 0
        while True:
            attempt += 1
            try:
                response, failure = self._http.request(**self._request(call)), None
            except httpx.TransportError as exc:
                response, failure = None, exc
            done, value = self._settle(call, (attempt, start), response, failure)
            if done:
                return value
            time.sleep(value)

    def segment(self, image: ImageInput, **options: Unpack[SegmentOptions]) -> SegmentResult:
        """Segment one image (a path, encoded bytes, or an HxW[xC] array sent as lossless PNG)."""
        return self.send(segment_call(image, options))

    def infer(self, model: str, inputs: np.ndarray, **options: Unpack[InferOptions]) -> InferResult:
        """KServe v2 inference on [N, C, H, W] (or [H, W]) raw pixels of any numeric type."""
        return self.send(infer_call(model, inputs, options))

    def models(self) -> Any:
        return self.send(Call("GET", "/v1/models", read_json))

    def ready(self, model: str | None = None) -> bool:
        """Whether the server (or one of its models) is ready now (no retries)."""
        try:
            return self._http.get(ready_path(model)).is_success
        except httpx.TransportError:
            return False

    def index(self) -> Any:
        return self.send(_model_control("index"))

    def load(self, name: str) -> Any:
        return self.send(_model_control("load", name))

    def unload(self, name: str) -> Any:
        return self.send(_model_control("unload", name))

    def reload(self) -> Any:
        """Reload every model of the server's repository (as SIGHUP does)."""
        return self.send(_model_control("reload"))

    def submit_job(self, path: str | Path, **options: Unpack[JobOptions]) -> dict[str, Any]:
        """Submit a whole-slide TIFF as a job (streamed from disk); the job, queued."""
        return self.send(job_call(path, options))

    def job(self, job_id: str) -> dict[str, Any]:
        return self.send(Call("GET", f"/v1/jobs/{job_id}", read_json))

    def cancel_job(self, job_id: str) -> Any:
        """Cancel a queued or running job (the job), or delete a finished one (None)."""
        return self.send(Call("DELETE", f"/v1/jobs/{job_id}", read_optional_json, safe=False))

    def job_result(self, job_id: str, target: str | Path) -> Path:
        """Stream a done job's result (a tiled BigTIFF) into `target`."""
        with self._http.stream("GET", f"/v1/jobs/{job_id}/result") as response:
            if not response.is_success:
                response.read()
                raise api_error(response)
            with Path(target).open("wb") as out:
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
        return Path(target)

    def run_job(
        self,
        path: str | Path,
        target: str | Path,
        *,
        poll_s: float = 1.0,
        progress: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        **options: Unpack[JobOptions],
    ) -> dict[str, Any]:
        """Submit, poll (`progress(windows done, total)`), and write the result to `target`
        (through `<target>.partial`, renamed when whole). A job that fails or is cancelled raises
        APIError `job_failed` or `job_cancelled` with its reason; an interruption (Ctrl-C), or
        `cancelled()` turning true at a poll, cancels the job. Returns the finished job."""
        job = self.submit_job(path, **options)
        try:
            while job["state"] not in ("done", "failed", "cancelled"):
                time.sleep(poll_s)
                if cancelled is not None and cancelled():
                    raise APIError(0, "job_cancelled", f"job {job['id']}: cancelled by the caller")
                job = self.job(job["id"])
                if progress is not None:
                    progress(job["progress"]["done"], job["progress"]["total"])
        except BaseException:
            with contextlib.suppress(APIError):
                self.cancel_job(job["id"])
            raise
        if job["state"] != "done":
            error = job["error"] or "cancelled on the server"
            raise APIError(200, f"job_{job['state']}", f"job {job['id']}: {error}")
        partial = Path(f"{target}.partial")
        self.job_result(job["id"], partial)
        os.replace(partial, target)
        return job


class AsyncClient(_Base):
    """The asyncio client; `async with AsyncClient(url) as client: await client.segment(...)`."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self._http = httpx.AsyncClient(**self._options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def send(self, call: Call[T]) -> T:
        start, attempt = time.monotonic(), 0
        while True:
            attempt += 1
            try:
                response, failure = await self._http.request(**self._request(call)), None
            except httpx.TransportError as exc:
                response, failure = None, exc
            done, value = self._settle(call, (attempt, start), response, failure)
            if done:
                return value
            await asyncio.sleep(value)

    async def segment(self, image: ImageInput, **options: Unpack[SegmentOptions]) -> SegmentResult:
        return await self.send(segment_call(image, options))

    async def infer(
        self, model: str, inputs: np.ndarray, **options: Unpack[InferOptions]
    ) -> InferResult:
        return await self.send(infer_call(model, inputs, options))

    async def models(self) -> Any:
        return await self.send(Call("GET", "/v1/models", read_json))

    async def ready(self, model: str | None = None) -> bool:
        try:
            return (await self._http.get(ready_path(model))).is_success
        except httpx.TransportError:
            return False

    async def index(self) -> Any:
        return await self.send(_model_control("index"))

    async def load(self, name: str) -> Any:
        return await self.send(_model_control("load", name))

    async def unload(self, name: str) -> Any:
        return await self.send(_model_control("unload", name))

    async def reload(self) -> Any:
        """Reload every model of the server's repository (as SIGHUP does)."""
        return await self.send(_model_control("reload"))
