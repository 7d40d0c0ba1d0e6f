"""What the application holds between requests: the settings and the (loading) service.

Loading runs in the background so that /healthz answers at once and /readyz says what is
happening; a failure leaves `service` None and `error` saying why. The operations issue swaps
`service` here for hot reload.
"""

from __future__ import annotations

import asyncio
import logging

from unetpp.core.errors import UNetPPError
from unetpp.server.runtime import load_model
from unetpp.server.service import Service
from unetpp.server.settings import Settings

log = logging.getLogger(__name__)


class ServerState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service: Service | None = None
        self.error: str | None = None

    @property
    def status(self) -> str:
        if self.service is not None:
            return "ready"
        return "failed" if self.error else "loading"

    async def load(self) -> None:
        settings = self.settings
        if settings.models is None:
            self.error = "no model repository configured (--models or UNETPP_MODELS)"
            log.error(self.error)
            return
        try:
            model = await asyncio.to_thread(
                load_model,
                settings.models,
                settings.device,
                settings.threads,
                settings.memory_arena,
            )
            service = Service(model, settings)
            await asyncio.to_thread(service.calibrate)
        except UNetPPError as exc:
            self.error = exc.detail
            log.error("not ready: %s", exc.detail)
            return
        except Exception as exc:  # onnxruntime's own errors are untyped; stay up, say why
            self.error = f"loading failed: {type(exc).__name__}: {exc}"
            log.exception("not ready")
            return
        await service.start()
        self.service = service
        log.info("ready: %s", ", ".join(service.runners))

    async def close(self) -> None:
        if self.service is not None:
            await self.service.close()
            self.service = None
