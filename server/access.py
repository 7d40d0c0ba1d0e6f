"""Request ids, one structured log line per request, and the request metrics.

The id is the client's `X-Request-ID` when it is sane (1-128 of `A-Z a-z 0-9 . _ : -`), else a
new one; it is returned as `X-Request-ID` and kept in `request.state.request_id`. The log line
(logger `unetpp.access`, logfmt) carries id, method, path, status, error, graph and ms; the same
fields go to the record's `extra` for structured handlers. A client controls the method and the
path, so every value is cut to `FIELD_CHARS` and quoted and escaped as logfmt wants (a newline
or `" x=1` in a path cannot start a line or add a field). Metric labels are bounded too: the
route's template (one `unmatched` for every path no route serves) and the method among the
known ones (else `other`).
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
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
FIELD_CHARS = 256
QUOTED = re.compile(r'[\s"=\\]')  # a logfmt value with one of these needs quotes


def capped(text: str) -> str:
    return text if len(text) <= FIELD_CHARS else text[:FIELD_CHARS] + "..."


def _escape(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if c.isprintable() or c == " ":
        return c
    code = ord(c)
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (
        f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    )


def logfmt(fields: dict[str, object]) -> str:
    """`key=value ...`, a value quoted when it holds a space, `=`, a quote, a backslash or an
    unprintable character, which are escaped (`\\"`, `\\n`, `\\x1b`, `\\u2028`)."""
    out = []
    for key, value in fields.items():
        text = str(value)
        if text.isprintable() and not QUOTED.search(text):
            out.append(f"{key}={text}")
        else:
            out.append(f'{key}="{"".join(map(_escape, text))}"')
    return " ".join(out)


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
        status, model, graph = 500, "", ""

        async def tagged(message: Message) -> None:
            nonlocal status, model, graph
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = rid
                model = headers.get("x-unetpp-model", "")
                graph = headers.get("x-unetpp-graph", "")
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        finally:
            seconds = time.perf_counter() - start
            handler = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "other"
            error = state.get("error", "") if status >= 400 else ""
            if status >= 400 and not error:
                error = "internal_error" if status >= 500 else str(status)
            m = self.metrics
            m.requests.labels(handler, method, str(status), model, graph).inc()
            m.request_seconds.labels(handler, method).observe(seconds)
            if error:
                m.errors.labels(handler, str(status), error).inc()
            fields = {
                "method": capped(scope["method"]),
                "path": capped(scope["path"]),
                "status": status,
                "error": error,
                "model": model,
                "graph": graph,
                "ms": round(1000.0 * seconds, 1),
            }
            line = logfmt({"id": rid, **fields})
            log.info("request %s", line, extra={"request_id": rid, **fields})
