"""Liveness and readiness, separately: alive while the process serves HTTP; ready once the model
repository is verified, its sessions are open and calibrated. Both are public; with an API key
set, why loading failed (which names files) is told only to a caller that sends the key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from unetpp.server.deps import SettingsDep, StateDep, authorized, bearer_token
from unetpp.server.errors import NotReady

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz(state: StateDep) -> dict[str, str]:
    return {"status": "alive", "model": state.status}


@router.get(
    "/readyz",
    summary="Readiness: the model is loaded, verified and calibrated",
    responses={503: {"description": "loading, failed (the detail says why), or shutting down"}},
)
async def readyz(request: Request, state: StateDep, settings: SettingsDep) -> dict[str, Any]:
    if state.draining:
        raise NotReady("the server is shutting down")
    if state.error and not authorized(settings, await bearer_token(request)):
        raise NotReady("the model repository failed to load: the reason is in the server log")
    service = state.current()
    return {
        "status": "ready",
        "device": service.model.device,
        "graphs": list(service.runners),
    }
