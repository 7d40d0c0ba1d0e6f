"""The server's own failures and the one place where every exception becomes an HTTP answer.

Every error body is `{"error": <short code>, "detail": <sentence>}`, FastAPI's own 404, 405 and
422 included; under /v2 it is the Open Inference Protocol's `{"error": "<code>: <sentence>"}`.
A client's bad input is always a 4xx; only a bug in this code is a 500. The code is also left
in `request.state.error` for the access log and the metrics.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from unetpp.core.errors import ImageTooLarge, UNetPPError, UnsupportedImage

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for a request whose client closed the connection


class BodyTooLarge(ImageTooLarge):
    """A request body above `max_body_bytes`."""

    error = "body_too_large"


class UnsupportedMediaType(UnsupportedImage):
    """A request whose content type is neither an image nor multipart with an `image` field."""


class Unavailable(UNetPPError):
    """The server cannot take the request now; `retry_after` seconds is a hint for the client."""

    status_code = 503
    error = "unavailable"

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class NotReady(Unavailable):
    error = "not_ready"


class ModelUnavailable(Unavailable):
    """A model that failed to load or was unloaded: retrying will not help until an operator
    loads it (so no Retry-After), unlike a model still loading (NotReady)."""

    error = "model_unavailable"


class QueueFull(Unavailable):
    error = "queue_full"


class ModelNotFound(UNetPPError):
    """A model name (or a model's version) that this server does not hold."""

    status_code = 404
    error = "model_not_found"


class LoadFailed(UNetPPError):
    """A model that could not be loaded; what served before keeps serving."""

    status_code = 422
    error = "load_failed"


class Unauthorized(UNetPPError):
    """A missing or wrong bearer token (the server has UNETPP_API_KEY set)."""

    status_code = 401
    error = "unauthorized"


class BodyTimeout(UNetPPError):
    """A request body that arrived slower than the server's minimum rate (`min_body_rate`)."""

    status_code = 408
    error = "body_timeout"


class AdminClosed(UNetPPError):
    """An admin endpoint on a server without an API key that was not opened (`admin_open`)."""

    status_code = 403
    error = "admin_closed"


class DeadlineExceeded(UNetPPError):
    """The request's deadline passed before its result was ready."""

    status_code = 504
    error = "deadline_exceeded"


# the jobs API (server/jobs.py, server/routers/jobs.py)
class JobNotFound(UNetPPError):
    status_code = 404
    error = "job_not_found"


class JobNotDone(UNetPPError):
    status_code = 409
    error = "job_not_done"


class JobsFull(UNetPPError):
    """The jobs directory holds its limit of jobs or bytes."""

    status_code = 429
    error = "jobs_full"


class UploadTooLarge(ImageTooLarge):
    error = "upload_too_large"


class JobsDisabled(UNetPPError):
    """This server has no jobs directory: for it, /v1/jobs does not exist."""

    status_code = 404
    error = "jobs_disabled"


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None):
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _answer(
    request: Request, status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    request.state.error = error
    if request.url.path.startswith("/v2/") or request.url.path == "/v2":
        return JSONResponse({"error": f"{error}: {detail}"}, status_code=status, headers=headers)
    return error_response(status, error, detail, headers)


async def _domain(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UNetPPError)
    headers = None
    if isinstance(exc, Unavailable) and exc.retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    if isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="unetpp"'}
    if isinstance(exc, BodyTimeout):  # the rest of the body is not read: the connection ends
        headers = {"Connection": "close"}
    if exc.status_code >= 500 and not isinstance(exc, Unavailable):
        log.warning("%s %s: %s (%s)", request.method, request.url.path, exc.error, exc.detail)
    return _answer(request, exc.status_code, exc.error, exc.detail, headers)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    # Starlette's own 400s are bodies it cannot parse (multipart without a boundary, ...)
    codes = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}
    error = codes.get(exc.status_code, "http_error")
    return _answer(request, exc.status_code, error, str(exc.detail), dict(exc.headers or {}))


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return _answer(request, 422, "invalid_parameter", "; ".join(parts))


async def _disconnected(request: Request, exc: Exception) -> JSONResponse:
    """The client went away before its body was in: a client event (status 499, as nginx logs
    it), not a failure of the server; nobody reads the answer."""
    return _answer(
        request, CLIENT_CLOSED, "client_disconnected", "the client closed the connection"
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    # uvicorn drops the connection after an unhandled exception: say so, or a client reusing it
    # for its next request gets a reset
    detail = f"{type(exc).__name__}: the server failed"
    return _answer(request, 500, "internal_error", detail, {"Connection": "close"})


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(UNetPPError, _domain)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ClientDisconnect, _disconnected)
    app.add_exception_handler(Exception, _unexpected)
