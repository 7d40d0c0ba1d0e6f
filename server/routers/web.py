"""The web page (GET /) and its sample images (GET /v1/samples): no build step, no CDN."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, Response

from unetpp.core.datasets import synthetic_split
from unetpp.core.imageio import encode_png
from unetpp.core.render import display_rgb

router = APIRouter(tags=["web page"])
SAMPLE_COUNT = 4


@cache
def page() -> str:
    return resources.files("unetpp.server").joinpath("static/index.html").read_text("utf-8")


@cache
def samples() -> dict[str, bytes]:
    """A few images from the embedded synthetic generator (test split), as 8-bit PNGs
    stretched for display the way overlays are."""
    return {
        s.name: encode_png(display_rgb(s.image))
        for s in synthetic_split("test", count=SAMPLE_COUNT)
    }


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(page())


@router.get("/v1/samples", summary="Names of the bundled sample images")
async def sample_names() -> dict[str, list[str]]:
    return {"samples": list(samples())}


@router.get(
    "/v1/samples/{name}",
    summary="One bundled sample image (PNG)",
    responses={200: {"content": {"image/png": {}}}, 404: {"description": "No such sample"}},
)
async def sample(name: str) -> Response:
    try:
        return Response(samples()[name], media_type="image/png")
    except KeyError:
        raise HTTPException(404, f"no sample named {name!r}; see GET /v1/samples") from None
