"""Server settings: every field also comes from the environment as `UNETPP_<FIELD>`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from unetpp.core.manifest import DEFAULT_BACKEND, BackendName
from unetpp.core.preprocess import MULTIPLE
from unetpp.core.routing import Mode
from unetpp.core.tiling import TILE_SIDES

Device = Literal["auto", "cpu", "cuda"]


class Settings(BaseSettings):
    """What `unetpp serve` reads. docs/settings.md is generated from these fields
    (`python docs/generate.py`), so each description is the documentation of its setting."""

    model_config = SettingsConfigDict(env_prefix="UNETPP_", frozen=True)

    models: Path | None = Field(
        None,
        description="model repository: one model (model.json + graphs) or a folder of them "
        "(<name>/model.json)",
    )
    default_model: str | None = Field(
        None, description="the model plain /v1/segment serves (default: the only one)"
    )
    host: str = Field("127.0.0.1", description="address to listen on (`--host`)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (`--port`)")
    device: Device = Field(
        "auto",
        description="auto: CUDA only if a session really runs on it, else CPU; cpu; cuda: not "
        "ready (with the reason) if CUDA cannot run",
    )
    backend: BackendName = Field(
        DEFAULT_BACKEND,
        description="the runtime of every graph: onnxruntime, or openvino (the openvino extra; "
        "CPU only; serves the bf16 graphs; docs/big-images.md#backends)",
    )
    threads: int = Field(0, ge=0, description="intra-op threads per session; 0: all")
    workers: int = Field(1, ge=1, description="batches run at the same time")
    memory_arena: bool = Field(
        True, description="onnxruntime's CPU arena: faster, but keeps the largest batch's memory"
    )

    max_batch: int = Field(8, ge=1, description="images (or tiles) per batch")
    max_wait_ms: float = Field(5.0, ge=0, description="longest a batch waits for more requests")
    max_queue: int = Field(64, ge=1, description="requests admitted at once; more get 503")
    timeout_ms: float = Field(30_000, gt=0, description="default and largest request deadline")

    max_body_bytes: int = Field(64 << 20, ge=1, description="request body limit (413)")
    max_body_bytes_in_flight: int = Field(
        256 << 20,
        ge=1,
        description="bytes of request bodies held at once; more get 503 (one alone is always "
        "taken: `max_body_bytes` bounds it)",
    )
    memory_limit: int | None = Field(
        None,
        ge=1,
        description="memory ceiling in bytes that the activation budget keeps the process under "
        "(default: the container's cgroup limit, else 4 GiB)",
    )
    max_pixels: int = Field(
        40_000_000,
        ge=1,
        description="pixels of one image, read from its header before decoding (413)",
    )
    max_side: int = Field(16_384, ge=1, description="longest side of one image (413)")
    max_pixels_in_flight: int = Field(
        40_000_000,
        ge=1,
        description="pixels of the images admitted at once; a request that would pass it gets "
        "503 (alone it is always taken: `max_pixels` bounds one image)",
    )

    tile_above_pixels: int = Field(1 << 20, ge=1, description="images larger than this are tiled")
    tile_size: int = Field(
        512, ge=MULTIPLE, description="tile side until a graph's tile is measured (`tile_sides`)"
    )
    tile_sides: tuple[int, ...] = Field(
        TILE_SIDES,
        description="tile sides (multiples of 16) the background calibration measures per graph, "
        "at batch 1 and the batch that fits; each graph then tiles at its fastest per output "
        "pixel (docs/models.md, Tiles per graph); empty: always `tile_size`",
    )
    tile_bytes: int = Field(
        1 << 30,
        ge=1,
        description="activation bytes one image's tiles may hold at once: a graph's tile side "
        "and batch are chosen within it (and only runs within it are measured)",
    )
    tile_overlap: int = Field(
        64, ge=0, description="overlap of neighbouring tiles, a multiple of 16, under half a tile"
    )

    default_mode: Mode = Field(
        "balanced", description="the mode of a request that names no rule (docs/routing.md)"
    )
    fast_tolerance: float = Field(0.02, ge=0, le=1, description="IoU below the best 'fast' accepts")
    calibration_repeats: int = Field(
        3, ge=1, description="timed runs per graph in the background calibration"
    )

    api_key: SecretStr | None = Field(
        None, description="bearer token required on everything but health (and metrics)"
    )
    metrics_auth: bool = Field(False, description="require the api_key on /metrics too")
    admin_open: bool = Field(
        False,
        description="serve the admin endpoints (reload, model control) without an API key: only "
        "on a trusted network; without either they answer 403",
    )

    max_connections: int = Field(
        1024,
        ge=1,
        description="open HTTP connections at once (lowered to fit the open-file limit); past "
        "it a new one replaces the one waiting longest for its headers, or is closed",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection's request headers must be in within this time"
    )
    body_timeout_s: float = Field(
        10.0, gt=0, description="grace before a request body must keep up `min_body_rate`"
    )
    min_body_rate: float = Field(
        8192, gt=0, description="bytes a second a request body must average (else 408)"
    )
    write_timeout_s: float = Field(
        30.0, gt=0, description="a client that reads none of its answer for this long is cut"
    )
    drain_delay_s: float = Field(
        2.0, ge=0, description="on SIGTERM, seconds not-ready but serving before listeners close"
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _no_empty_key(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _tiles(self) -> Settings:
        sides = (self.tile_size, self.tile_overlap, *self.tile_sides)
        if any(side % MULTIPLE for side in sides):
            raise ValueError(
                f"tile_size, tile_overlap and tile_sides must be multiples of {MULTIPLE}"
            )
        if self.tile_overlap * 2 >= min(sides[:1] + sides[2:]):
            raise ValueError("tile_overlap must be less than half of tile_size and of tile_sides")
        return self
