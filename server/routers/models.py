"""GET /v1/models: what is served and how it performs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from unetpp.server.deps import ServiceDep

router = APIRouter(prefix="/v1", tags=["models"])


@router.get(
    "/models",
    summary="Graphs with measured accuracy, calibrated and live latency, parameters, batching",
)
async def models(service: ServiceDep) -> dict[str, Any]:
    """Per graph: manifest figures (IoU/Dice on the export's validation data, parameters,
    GFLOPs, export-time latency), latency calibrated at start-up on this machine, the live
    per-pixel-count figures the router predicts with, and what was served (requests, batches,
    batch sizes). `modes_at_reference` is what each mode picks for a reference-size image."""
    return service.describe()
