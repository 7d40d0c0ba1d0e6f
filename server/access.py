"""Request ids, one structured log line per request, and the request metrics.

The id is the client's `X-Request-ID` when it is sane (1-128 of `A-Z a-z 0-9 . _ : -`), else a
new one; it is returned as `X-Request-ID` and kept in `request.state.request_id`. The log line
(logger `unetpp.access`, logfmt) carries id, method, path, status, error, graph and ms; the same
fields go to the record's `extra` for structured handlers.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from unetpp.server.metrics import Metrics

log = logging.getLogger("unetpp.access")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if REQUEST_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


class AccessLog:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid = request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status, graph = 500, ""

        async def tagged(message: Message) -> None:
            nonlocal status, graph
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = rid
                graph = headers.get("x-unetpp-graph", "")
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        finally:
            seconds = time.perf_counter() - start
            route = scope.get("route")  # unknown paths share one label (bounded cardinality)
            handler = getattr(route, "path", scope["path"] if status < 400 else "unmatched")
            method = scope["method"]
            error = state.get("error", "") if status >= 400 else ""
            if status >= 400 and not error:
                error = "internal_error" if status >= 500 else str(status)
            m = self.metrics
            m.requests.labels(handler, method, str(status), graph).inc()
            m.request_seconds.labels(handler, method).observe(seconds)
            if error:
                m.errors.labels(handler, str(status), error).inc()
            fields = {
                "request_id": rid,
                "method": method,
                "path": scope["path"],
                "status": status,
                "error": error,
                "graph": graph,
                "ms": round(1000.0 * seconds, 1),
            }
            log.info(
                "request id=%s method=%s path=%s status=%d error=%s graph=%s ms=%.1f",
                *fields.values(),
                extra=fields,
            )
