"""POST /v1/admin/reload: load the configured model repository again and swap it in."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from unetpp.server.deps import StateDep
from unetpp.server.security import AdminAllowed

# an operator's endpoint, not part of the public API schema; behind the API key (app.py)
router = APIRouter(prefix="/v1/admin", include_in_schema=False, dependencies=[AdminAllowed])


@router.post(
    "/reload",
    summary="Reload the model repository (UNETPP_MODELS) after it was replaced on disk",
    responses={422: {"description": "the repository does not load; the old one keeps serving"}},
)
async def reload(state: StateDep) -> dict[str, Any]:
    """Loads, verifies and calibrates the repository beside the serving one, then swaps it in;
    requests already running finish on the old model. Same as sending the server SIGHUP."""
    service = await state.reload()
    manifest = service.model.manifest
    return {
        "status": "reloaded",
        "model": {"name": manifest.name, "version": manifest.version},
        "graphs": list(service.runners),
        "directory": str(service.model.directory),
    }
