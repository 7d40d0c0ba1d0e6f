"""`unetpp serve` and `python -m unetpp.server`: settings from the command line and the
environment (`UNETPP_*`), then uvicorn, with the operations signals:

- SIGTERM: readiness goes false at once; the server keeps answering for `drain_delay_s` (load
  balancers still route to it until they see that), then uvicorn stops accepting connections,
  answers every request in flight (up to the request timeout), closes the model and exits.
  The process then exits with status 0. A second SIGTERM, or SIGINT (Ctrl+C), skips the delay.
- SIGHUP: reload every model of the repository, like POST /v1/admin/reload; a storm of
  signals coalesces into at most one running and one pending reload per model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Generator
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from unetpp.core.errors import InvalidInput
from unetpp.server.app import create_app
from unetpp.server.connections import BACKLOG, raise_open_file_limit
from unetpp.server.settings import Settings

log = logging.getLogger(__name__)


class Server(uvicorn.Server):
    """uvicorn's server with a readiness-first drain on SIGTERM and reload on SIGHUP."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_delay_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_delay_s = drain_delay_s
        self.drain_at: float | None = None
        self.reload_wanted = False
        self._reloads: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGHUP, self._hangup)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGHUP, previous)

    def _hangup(self, sig: int, frame: FrameType | None) -> None:
        self.reload_wanted = True  # picked up by on_tick, on the event loop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        registry = getattr(self.app.state, "registry", None)
        if registry is not None and not registry.draining:
            registry.draining = True
            log.info("signal %s: not ready any more, draining", signal.Signals(sig).name)
            if sig == signal.SIGTERM:  # a drained server exits with status 0
                self.drain_at = time.monotonic() + self.drain_delay_s
                return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_at is not None and time.monotonic() >= self.drain_at:
            self.should_exit = True
        if self.reload_wanted:
            self.reload_wanted = False
            task = asyncio.create_task(self._reload())
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)
        return await super().on_tick(counter)

    async def _reload(self) -> None:
        # a model that fails to reload is logged and keeps its old version; reloads coalesce
        await self.app.state.registry.reload_all()


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Command-line values override the environment's; unset ones leave it in charge."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"UNETPP_{'_'.join(map(str, e['loc'])).upper() or 'SETTINGS'}: {e['msg']}"
            for e in exc.errors()
        )
        raise InvalidInput(f"bad settings: {problems}") from exc
    if settings.models is None:
        raise InvalidInput("no model repository: give --models DIR or set UNETPP_MODELS")
    return settings


def main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    log.info("serving %s on http://%s:%d", settings.models, settings.host, settings.port)
    raise_open_file_limit()  # before the app sizes its connection cap under it
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=logging.getLevelName(logging.getLogger().level).lower(),
        access_log=False,  # unetpp.access logs every request, with its id
        http=app.state.connections.protocol,  # the connection cap and deadlines
        backlog=BACKLOG,
        timeout_graceful_shutdown=int(settings.timeout_ms / 1000) + 10,
    )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: uvicorn re-raises SIGINT when done
        Server(config, app, settings.drain_delay_s).run()
    return 0
