"""GET /v1/models and /v1/models/{model}: what is served and how it performs."""

from __future__ import annotations

from fastapi import APIRouter

from unetpp.server.deps import RegistryDep
from unetpp.server.schemas import ModelDescription, ModelList, describe, queue

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", summary="Every model: its graphs' figures, state and what it served")
async def models(registry: RegistryDep) -> ModelList:
    """Per model and graph: manifest figures (IoU/Dice on the export's validation data,
    parameters, GFLOPs, export-time latency), this machine's figures and where each comes from
    (probe, estimate, calibrated; live batches refine them), activation bytes per pixel, and
    what was served. `modes_at_reference` is what each mode picks for a reference-size image."""
    registry.scan()
    return ModelList(
        default=registry.default,
        models=[describe(slot) for slot in registry.slots.values()],
        queue=queue(registry),
    )


@router.get(
    "/models/{model}", summary="One model", responses={404: {"description": "no such model"}}
)
async def model(model: str, registry: RegistryDep) -> ModelDescription:
    return describe(registry.slot(model))
