"""POST /v1/admin/reload: load every model of the repository again (after an operator replaced
them on disk) and swap each in; the same as sending the server SIGHUP. One model's control is
the repository extension's (/v2/repository/models/{name}/load and /unload)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from unetpp.server.deps import RegistryDep
from unetpp.server.errors import LoadFailed
from unetpp.server.security import AdminAllowed

# an operator's endpoint, not part of the public API schema
router = APIRouter(prefix="/v1/admin", include_in_schema=False, dependencies=[AdminAllowed])


@router.post(
    "/reload",
    summary="Reload every model of the repository (UNETPP_MODELS) after it changed on disk",
)
async def reload(registry: RegistryDep) -> dict[str, Any]:
    """Each model loads beside its serving version, then swaps in; requests already running
    finish on the old one. A model that fails keeps serving its old version (its state says
    why). Concurrent reloads coalesce: while one runs, all further requests share the next."""
    failures = {name: exc for name, exc in (await registry.reload_all()).items() if exc}
    if failures:
        kept = all(registry.slots[name].engine is not None for name in failures)
        raise LoadFailed(
            f"reload failed, {'the previous model keeps serving' if kept else 'not serving'}: "
            + "; ".join(exc.detail for exc in failures.values())
        )
    return {
        "status": "reloaded",
        "models": {
            name: {
                "state": slot.state,
                "version": str(slot.engine.model.manifest.version) if slot.engine else None,
                "error": slot.error,
            }
            for name, slot in registry.slots.items()
        },
    }
