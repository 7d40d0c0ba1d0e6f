"""The FastAPI application: lifespan (load the model in the background), limits, routers, errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unetpp import __version__
from unetpp.server.access import AccessLog
from unetpp.server.connections import BodyDeadline, ConnectionGuard
from unetpp.server.deps import Authorized
from unetpp.server.errors import BodyTooLarge, error_response, install_handlers
from unetpp.server.jobs import Jobs, JobSettings
from unetpp.server.metrics import Metrics
from unetpp.server.registry import Registry
from unetpp.server.routers import admin, health, jobs, metrics, models, segment, v2, web
from unetpp.server.settings import Settings

DESCRIPTION = """
UNet++ segmentation with four pruned graphs (L1..L4, and the ensemble of their heads where the
export measured it better). Every request chooses its trade-off with **one** of `level`,
`mode` (fast, balanced, accurate), `max_latency_ms` or `min_iou`, plus `precision`; the
response headers say what was chosen and why. Errors are JSON `{"error", "detail"}`.
The same service speaks the KServe v2 / Open Inference Protocol under `/v2`, and exposes
Prometheus metrics at `/metrics`. With `UNETPP_API_KEY` set, everything but health, the web
page and (unless `UNETPP_METRICS_AUTH`) metrics needs `Authorization: Bearer <key>`.
"""


class BodyLimit:
    """Refuse bodies above `limit` bytes: by Content-Length before reading, and while streaming
    (a missing or lying Content-Length) by failing the read. Paths in `exempt` enforce their
    own limit (job uploads, streamed to disk)."""

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        detail = f"request body above the limit of {self.limit} bytes"
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.limit:
            scope.setdefault("state", {})["error"] = BodyTooLarge.error
            response = error_response(413, BodyTooLarge.error, detail, {"Connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(detail)
            return message

        await self.app(scope, limited, send)


async def single_query_values(request: Request) -> None:
    """Every query parameter at most once: `level=1&level=4` is a 422, not the last one.
    (async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request)"""
    names = Counter(name for name, _ in request.query_params.multi_items())
    repeated = sorted(name for name, count in names.items() if count > 1)
    if repeated:
        raise RequestValidationError(
            [
                {"loc": ("query", name), "msg": "given more than once", "type": "repeated"}
                for name in repeated
            ]
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    telemetry = Metrics()
    connections = ConnectionGuard.from_settings(settings)  # main.py gives uvicorn its protocol
    telemetry.watch(connections.metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = Registry(settings, telemetry)
        app.state.registry = registry
        loading = asyncio.create_task(registry.start())
        app.state.jobs = Jobs.from_settings(JobSettings(), registry)
        if app.state.jobs is not None:
            await app.state.jobs.start()
        try:
            yield
        finally:
            if app.state.jobs is not None:
                await app.state.jobs.close()
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await registry.close()

    app = FastAPI(
        title="unetpp",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        redirect_slashes=False,  # starlette builds the redirect from the client's Host header
        dependencies=[Depends(single_query_values)],
    )
    app.state.connections = connections
    install_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, exempt=("/v1/jobs",))
    app.add_middleware(
        BodyDeadline, grace_s=settings.body_timeout_s, min_rate=settings.min_body_rate
    )
    app.add_middleware(AccessLog, metrics=telemetry)  # outermost: sees every answer
    # the key is declared (and in the OpenAPI schema) only when the server has one
    guard = [Authorized] if settings.api_key is not None else []
    for public in (health.router, web.router, v2.public):
        app.include_router(public)
    for protected in (models.router, segment.router, v2.router, jobs.router):
        app.include_router(protected, dependencies=guard)
    for admin_only in (admin.router, v2.repository):  # AdminAllowed: the key, or admin_open
        app.include_router(admin_only)
    app.include_router(metrics.router, dependencies=guard if settings.metrics_auth else [])
    return app
