"""What the application holds between requests: the settings, the metrics and the service.

Loading runs in the background so that /healthz answers at once and /readyz says what is
happening; a failure leaves `service` None and `error` saying why. `reload()` builds a new
service beside the serving one and swaps it in atomically (one assignment on the event loop);
requests that already hold the old service (a lease, see `deps.get_service`) finish on it, and
it is closed once the last of them is done. A repository that fails to load leaves the old
service serving. `draining` (set on SIGTERM) makes readiness false while requests finish.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator

from prometheus_client.core import Metric
from unetpp.core.errors import UNetPPError
from unetpp.server.errors import NotReady
from unetpp.server.metrics import Metrics, gauge, info
from unetpp.server.runtime import load_model
from unetpp.server.service import Service
from unetpp.server.settings import Settings

log = logging.getLogger(__name__)


class ReloadFailed(UNetPPError):
    """The model repository on disk could not be loaded; the previous one keeps serving."""

    status_code = 422
    error = "reload_failed"


class ServerState:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.service: Service | None = None
        self.error: str | None = None
        self.draining = False
        self.loaded_at: float | None = None  # time.time() of the swap
        self._lock = asyncio.Lock()  # one load or reload at a time
        self.stopping = threading.Event()  # set on shutdown
        self._retiring: set[asyncio.Task[None]] = set()
        metrics.watch(self._gauges)

    @property
    def status(self) -> str:
        if self.draining:
            return "draining"
        if self.service is not None:
            return "ready"
        return "failed" if self.error else "loading"

    def current(self) -> Service:
        """The serving service, or NotReady saying why there is none."""
        if self.service is None:
            if self.error:
                raise NotReady(self.error)
            raise NotReady("the model is still loading", retry_after=1)
        return self.service

    async def _build(self) -> Service:
        settings = self.settings
        if settings.models is None:
            raise ReloadFailed("no model repository configured (--models or UNETPP_MODELS)")
        try:
            model = await asyncio.to_thread(
                load_model,
                settings.models,
                settings.device,
                settings.threads,
                settings.memory_arena,
            )
            service = Service(model, settings, self.metrics)
            await asyncio.to_thread(service.calibrate, self.stopping)
        except UNetPPError as exc:
            raise ReloadFailed(exc.detail) from exc
        except Exception as exc:  # onnxruntime's own errors are untyped; stay up, say why
            log.exception("loading %s failed", settings.models)
            raise ReloadFailed(f"loading failed: {type(exc).__name__}: {exc}") from exc
        await service.start()
        return service

    def _swap(self, service: Service) -> None:
        old, self.service = self.service, service
        self.error, self.loaded_at = None, time.time()
        if old is not None:
            task = asyncio.create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def load(self) -> None:
        async with self._lock:
            try:
                service = await self._build()
            except ReloadFailed as exc:
                self.error = exc.detail
                log.error("not ready: %s", exc.detail)
                return
            self._swap(service)
        log.info("ready: %s", ", ".join(service.runners))

    async def reload(self) -> Service:
        """Load the configured repository again (an operator replaced it) and swap it in."""
        async with self._lock:
            log.info("reloading %s", self.settings.models)
            try:
                service = await self._build()
            except ReloadFailed as exc:
                self.metrics.reloads.labels("failed").inc()
                kept = "the previous model keeps serving" if self.service else "still not ready"
                log.error("reload failed, %s: %s", kept, exc.detail)
                raise ReloadFailed(f"reload failed, {kept}: {exc.detail}") from exc
            self._swap(service)
            self.metrics.reloads.labels("ok").inc()
        log.info("reloaded: %s", ", ".join(service.runners))
        return service

    async def _retire(self, service: Service) -> None:
        await service.idle()
        await service.close()
        log.info("the previous model is closed (its requests finished)")

    async def close(self) -> None:
        self.stopping.set()  # a load or reload still calibrating gives up
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        if self.service is not None:
            await self.service.close()
            self.service = None

    def _gauges(self) -> Iterator[Metric]:
        service = self.service
        ready = service is not None and not self.draining
        yield gauge(
            "unetpp_ready", "1 when a model is loaded and the server is not draining", ready
        )
        yield gauge(
            "unetpp_requests_in_flight",
            "requests admitted: uploading, decoding, queued or running",
            service.in_flight if service else 0,
        )
        yield gauge(
            "unetpp_queue_items",
            "inputs waiting in the batcher",
            service.batcher.queued if service else 0,
        )
        yield gauge(
            "unetpp_queue_predicted_wait_seconds",
            "predicted wait before a new input starts running",
            service.batcher.queue_wait_ms() / 1000.0 if service else 0.0,
        )
        if service is not None:
            manifest = service.model.manifest
            yield info(
                "unetpp_model",
                "the model served",
                {
                    "name": manifest.name,
                    "version": str(manifest.version),
                    "graphs": ",".join(service.runners),
                    "device": service.model.device,
                },
            )
