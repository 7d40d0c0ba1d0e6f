"""Connection budgets at the HTTP edge: open connections below the open-file limit, and
deadlines for the request headers, the request body (a minimum rate) and the response's writes.

uvicorn bounds neither the connections it accepts nor the time before a request's headers are
in (its `limit_concurrency` answers 503 only once a request has arrived, and logs each one).
`GuardedH11Protocol` adds both to uvicorn's h11 protocol (`uvicorn.Config(http=guard.protocol)`):

- at most `limit` connections are open. A connection beyond it takes the place of the one that
  has waited longest for its request headers (a fresh or keep-alive connection with no request
  in progress); when every open connection is busy with a request, the new one is closed at
  once. Either way it is counted in `unetpp_connections_dropped_total`, never logged.
- a connection is closed when its request headers are not all in `header_timeout_s` after it
  opened or after its previous response;
- a connection whose client stops reading (the socket's send buffer stays full) is aborted after
  `write_timeout_s`, which frees the response bytes it held.

Its writes are `CoalescedWrites`: a response's status line and headers, body and end leave in one
send, not two.

`BodyDeadline` (ASGI middleware) answers 408 to a request body that arrives slower than
`min_body_rate` bytes a second after a grace of `body_timeout_s`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from unetpp.server.errors import BodyTimeout
from unetpp.server.settings import Settings

log = logging.getLogger(__name__)

# The listen backlog, which is also how many connections asyncio accepts in one pass of its
# event loop. An accepted socket holds an open file for about four passes before a refusal or an
# eviction closes it, so a flood keeps up to IN_FLIGHT_FILES more open than the cap: the cap
# leaves room for them under the open-file limit. (uvicorn's default of 2,048 let a flood of
# 6,000 connections pass a limit of 4,096 open files.)
BACKLOG = 256
IN_FLIGHT_FILES = 4 * BACKLOG
RESERVED_FILES = 256  # the process's own files: graphs, logs, onnxruntime's threads
DROP_REASONS = ("refused", "evicted", "header_timeout", "write_timeout")


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (each connection is an open file); the
    soft limit in effect after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


@dataclass
class ConnectionGuard:
    """The connection cap and deadlines of one server, and what they dropped."""

    limit: int
    header_timeout_s: float
    write_timeout_s: float
    waiting: dict[GuardedH11Protocol, None] = field(default_factory=dict)  # oldest first
    dropped: Counter[str] = field(default_factory=Counter)
    connections: set[Any] = field(default_factory=set)  # the server's, shared by its protocols

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionGuard:
        """`max_connections`, lowered to fit under the process's open-file limit."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        room = settings.max_connections if soft == resource.RLIM_INFINITY else soft
        limit = min(settings.max_connections, room - IN_FLIGHT_FILES - RESERVED_FILES)
        if limit < room // 4:  # a low limit (1024 in many containers): a quarter of it
            limit = min(settings.max_connections, max(room // 4, 1))
        if limit < settings.max_connections:
            log.warning(
                "at most %d connections: the open-file limit is %d (raise it, ulimit -n, above "
                "%d for max_connections=%d)",
                limit,
                soft,
                settings.max_connections + IN_FLIGHT_FILES + RESERVED_FILES,
                settings.max_connections,
            )
        return cls(limit, settings.header_timeout_s, settings.write_timeout_s)

    @property
    def protocol(self) -> Callable[..., GuardedH11Protocol]:
        """The protocol factory for `uvicorn.Config(http=...)`."""
        return functools.partial(GuardedH11Protocol, guard=self)

    def evict(self) -> bool:
        """Close the connection that has waited longest for its headers; False when none waits."""
        if not self.waiting:
            return False
        self.drop(next(iter(self.waiting)), "evicted")
        return True

    def drop(self, protocol: GuardedH11Protocol, reason: str) -> None:
        self.waiting.pop(protocol, None)
        self.connections.discard(protocol)  # its place is free now, not once the loop says so
        protocol.transport.abort()
        self.dropped[reason] += 1

    def metrics(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "unetpp_connections_open", "open HTTP connections", len(self.connections)
        )
        yield GaugeMetricFamily(
            "unetpp_connections_limit", "most HTTP connections open at once", self.limit
        )
        dropped = CounterMetricFamily(
            "unetpp_connections_dropped",
            "connections closed by the server's budgets: refused (at the cap, all busy), evicted "
            "(at the cap, the longest waiting for its headers), header_timeout, write_timeout",
            labels=["reason"],
        )
        for reason in DROP_REASONS:
            dropped.add_metric([reason], self.dropped[reason])
        yield dropped


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under a `ConnectionGuard`."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        guard.connections = self.connections
        self.header_deadline: asyncio.TimerHandle | None = None
        self.write_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.guard.limit and not self.guard.evict():
            self.transport = transport  # connection_lost closes it again, harmlessly
            transport.abort()
            self.guard.dropped["refused"] += 1
            return
        super().connection_made(transport)
        self.writes = CoalescedWrites(transport, self.loop)
        self.transport = self.writes  # type: ignore[assignment]
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.waiting.pop(self, None)
        for timer in (self.header_deadline, self.write_deadline):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        self.writes.flush()  # now, not after the access log and the metrics
        super().on_response_complete()
        if not self.transport.is_closing():
            self._track()

    def _track(self) -> None:
        """Waiting for headers (under the deadline, evictable) unless a request is in progress."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.guard.waiting.pop(self, None)
            if self.header_deadline is not None:
                self.header_deadline.cancel()
                self.header_deadline = None
        elif self.header_deadline is None:  # a keep-alive connection after its response
            self._await_headers()

    def _await_headers(self) -> None:
        self.guard.waiting.pop(self, None)
        self.guard.waiting[self] = None  # the newest waits last
        self.header_deadline = self.loop.call_later(
            self.guard.header_timeout_s, self.guard.drop, self, "header_timeout"
        )

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_deadline is None:
            self.write_deadline = self.loop.call_later(
                self.guard.write_timeout_s, self.guard.drop, self, "write_timeout"
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.write_deadline is not None:
            self.write_deadline.cancel()
            self.write_deadline = None


class CoalescedWrites:
    """A transport whose writes in one pass of the event loop leave in one send at its end,
    or at `flush()` (the protocol's, when a response is complete). uvicorn writes a response's
    head and body separately: two sends, and two wake-ups of the client, the first of which
    ends in a read of the head alone (0.5-1 ms of a 256x256 request's 5 ms at concurrency 1 on
    loopback; benchmarks/REPORT.md, `overhead`)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending and not self._transport.is_closing():
            self._transport.write(b"".join(self._pending))
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's
        return getattr(self._transport, name)


class BodyDeadline:
    """Fail the body's read (408, `body_timeout`) once fewer than `min_rate` bytes a second have
    arrived since the application started reading it, after a grace of `grace_s` seconds."""

    def __init__(self, app: ASGIApp, grace_s: float, min_rate: float) -> None:
        self.app = app
        self.grace_s = grace_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started: float | None = None
        seen = 0
        done = False

        async def timed() -> Message:
            nonlocal started, seen, done
            if done:  # after the body, receive() only waits for a disconnect
                return await receive()
            if started is None:
                started = time.monotonic()
            deadline = started + self.grace_s + seen / self.min_rate
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(
                    f"the request body came slower than {self.min_rate:.0f} bytes/s after "
                    f"{self.grace_s:g} s ({seen} bytes in {time.monotonic() - started:.1f} s)"
                ) from None
            seen += len(message.get("body", b""))
            done = not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)
