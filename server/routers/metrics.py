"""GET /metrics: Prometheus text format (behind the API key only with UNETPP_METRICS_AUTH)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from unetpp.server.deps import RegistryDep

router = APIRouter(tags=["operations"], include_in_schema=False)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(registry: RegistryDep) -> Response:
    return Response(registry.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
