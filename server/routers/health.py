"""Liveness and readiness, separately: alive while the process serves HTTP; ready once a model is
verified, its sessions are open and probed (the default model, when there is one), and not
draining. Both are public; with an API key set, why loading failed (which names files) is told
only to a caller that sends the key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from unetpp.server.deps import RegistryDep, SettingsDep, authorized, bearer_token
from unetpp.server.errors import ModelUnavailable, NotReady

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz(registry: RegistryDep) -> dict[str, str]:
    return {"status": "alive", "model": registry.status}


@router.get(
    "/readyz",
    summary="Readiness: the default model (else any model) is loaded, verified and probed",
    responses={503: {"description": "loading, failed (the detail says why), or shutting down"}},
)
async def readyz(request: Request, registry: RegistryDep, settings: SettingsDep) -> dict[str, Any]:
    if registry.draining:
        raise NotReady("the server is shutting down")
    states = {name: slot.state for name, slot in registry.slots.items()}
    if registry.error:
        if not authorized(settings, await bearer_token(request)):
            raise NotReady("the model repository failed to load: the reason is in the server log")
        raise NotReady(registry.error)
    default = registry.default
    if default is not None:
        slot = registry.slot(default)
        if slot.state != "ready":
            if slot.error and not authorized(settings, await bearer_token(request)):
                raise NotReady(f"model {default} failed to load: the reason is in the server log")
            try:
                registry.engine(default)
            except ModelUnavailable as exc:  # readiness says not_ready, whatever the reason
                raise NotReady(exc.detail) from exc
    elif not registry.ready:
        raise NotReady(f"no model is ready: {states or 'none found'}", retry_after=1)
    return {"status": "ready", "default": default, "models": states}
