"""/v1/jobs: segment a whole-slide TIFF asynchronously (server/jobs.py; docs/jobs.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import Field

from unetpp.core import slide
from unetpp.core.errors import BadParameter
from unetpp.server.errors import JobNotDone, JobsDisabled, UnsupportedMediaType
from unetpp.server.jobs import CHUNK, DONE, TERMINAL, Jobs, JobStore
from unetpp.server.routers import segment
from unetpp.server.routers.segment import RouteParams

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

TIFF_TYPES = ("image/tiff", "application/octet-stream")
BINARY = {"type": "string", "format": "binary"}


MULTIPART = segment.REQUEST_BODY["content"]["multipart/form-data"]  # field `image`
REQUEST_BODY: dict[str, Any] = {
    **segment.REQUEST_BODY,
    "content": {"multipart/form-data": MULTIPART, **{t: {"schema": BINARY} for t in TIFF_TYPES}},
    "description": "A TIFF (BigTIFF, OME-TIFF; tiled or stripped), streamed to disk: the raw "
    "body, or multipart field `image`.",
}
NOT_FOUND = {404: {"description": "no such job (or expired), or the server runs no jobs"}}


class JobParams(RouteParams):
    """The routing options of /v1/segment; the output is a tiled BigTIFF label image."""

    model: str | None = Field(
        None, description="a model this server holds (default: the one /v1/segment serves)"
    )
    format: Literal["tiff"] = Field(
        "tiff", description="tiff: a tiled BigTIFF, uint8 labels (a mask is 0/1), one page per page"
    )


def get_jobs(request: Request) -> Jobs:
    jobs: Jobs | None = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise JobsDisabled("this server runs no jobs: set UNETPP_JOBS_DIR")
    return jobs


def get_store(jobs: Annotated[Jobs, Depends(get_jobs)]) -> JobStore:
    return jobs.store


JobsDep = Annotated[Jobs, Depends(get_jobs)]
StoreDep = Annotated[JobStore, Depends(get_store)]


async def _body(request: Request) -> AsyncIterator[bytes]:
    """The upload as it arrives: the raw body, or the multipart field `image` (spooled to disk
    by the multipart parser)."""
    content_type = segment.media_type(request)
    if content_type == "multipart/form-data":
        async with segment.image_field(request) as upload:
            while chunk := await upload.read(CHUNK):
                yield chunk
        return
    if content_type not in TIFF_TYPES:
        raise UnsupportedMediaType(
            f"content type {content_type or '(none)'!r}: a job takes a TIFF (BigTIFF, OME-TIFF) "
            f"as the body ({', '.join(TIFF_TYPES)}) or as multipart field 'image'"
        )
    async for chunk in request.stream():
        yield chunk


def _readable(path: Path) -> None:
    """Refuse at submission what is not a TIFF tifffile can read (ImageDecodeError: 400)."""
    with slide.open_slide(path):
        pass


def _location(job_id: str) -> dict[str, str]:
    return {"Location": f"/v1/jobs/{job_id}"}


@router.post(
    "",
    status_code=202,
    summary="Submit a whole-slide TIFF; answers at once with the job's id",
    openapi_extra={"requestBody": REQUEST_BODY},
    responses={
        202: {"description": "accepted; Location: /v1/jobs/{id}"},
        400: {"description": "not a readable TIFF"},
        413: {"description": "the upload is above the job size limit"},
        415: {"description": "not a TIFF content type"},
        422: {"description": "bad or conflicting parameters"},
        429: {"description": "the jobs directory is full (jobs or bytes)"},
        503: {"description": "the model is still loading, or failed to load or was unloaded"},
        **NOT_FOUND,
    },
)
async def submit(
    request: Request, params: Annotated[JobParams, Query()], jobs: JobsDep
) -> JSONResponse:
    if params.deadline_ms is not None:
        raise BadParameter("deadline_ms does not apply to jobs (finished jobs have a TTL)")
    options = params.model_dump()
    if jobs.check is not None:
        jobs.check(options)
    job = await jobs.store.create(options, _body(request), check=_readable)
    return JSONResponse(job.public(), status_code=202, headers=_location(job.id))


@router.get(
    "/{job_id}",
    summary="A job's state and progress (windows done / total)",
    responses=NOT_FOUND,
)
async def status(job_id: str, store: StoreDep) -> JSONResponse:
    job = await asyncio.to_thread(store.get, job_id)
    return JSONResponse(job.public(), headers=_location(job.id))


@router.get(
    "/{job_id}/result",
    summary="The job's output: a tiled BigTIFF label image",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/tiff": {}}},
        409: {"description": "not done"},
        **NOT_FOUND,
    },
)
async def result(job_id: str, store: StoreDep) -> Response:
    job = await asyncio.to_thread(store.get, job_id)
    if job.state != DONE:
        why = f": {job.error}" if job.error else ""
        raise JobNotDone(f"job {job_id} is {job.state}{why}")
    return FileResponse(job.result, media_type="image/tiff", filename=f"{job_id}.tif")


@router.delete(
    "/{job_id}",
    summary="Cancel a queued or running job; delete a finished one",
    responses={
        202: {"description": "cancelled, or cancelling"},
        204: {"description": "deleted"},
        **NOT_FOUND,
    },
)
async def cancel(job_id: str, store: StoreDep) -> Response:
    job = await asyncio.to_thread(store.get, job_id)
    if job.state in TERMINAL:
        await asyncio.to_thread(store.delete, job_id)
        return Response(status_code=204)
    job = await asyncio.to_thread(store.cancel, job_id)
    body: dict[str, Any] = job.public()
    return JSONResponse(body, status_code=202, headers=_location(job.id))
