"""Server settings: every field also comes from the environment as `UNETPP_<FIELD>`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from unetpp.core.preprocess import MULTIPLE
from unetpp.core.routing import Mode

Device = Literal["auto", "cpu", "cuda"]


class Settings(BaseSettings):
    """What `unetpp serve` reads; README's "Serving" section documents each field."""

    model_config = SettingsConfigDict(env_prefix="UNETPP_", frozen=True)

    models: Path | None = Field(None, description="model repository folder (model.json + graphs)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Device = "auto"
    threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per session; 0: all")
    workers: int = Field(1, ge=1, description="batches run at the same time")
    memory_arena: bool = Field(
        True, description="onnxruntime's CPU arena: faster, but keeps the largest batch's memory"
    )

    max_batch: int = Field(8, ge=1)
    max_wait_ms: float = Field(5.0, ge=0, description="longest a batch waits for more requests")
    max_queue: int = Field(64, ge=1, description="requests admitted at once; more get 503")
    timeout_ms: float = Field(30_000, gt=0, description="default and largest request deadline")

    max_body_bytes: int = Field(64 << 20, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    max_side: int = Field(16_384, ge=1)
    max_pixels_in_flight: int = Field(
        40_000_000,
        ge=1,
        description="pixels of the images admitted at once; a request that would pass it gets "
        "503 (alone it is always taken: `max_pixels` bounds one image)",
    )

    tile_above_pixels: int = Field(1 << 20, ge=1, description="images larger than this are tiled")
    tile_size: int = Field(512, ge=MULTIPLE)
    tile_overlap: int = Field(64, ge=0)

    default_mode: Mode = "balanced"
    fast_tolerance: float = Field(0.02, ge=0, le=1, description="IoU below the best 'fast' accepts")
    calibration_repeats: int = Field(3, ge=1)

    api_key: SecretStr | None = Field(
        None, description="bearer token required on everything but health (and metrics)"
    )
    metrics_auth: bool = Field(False, description="require the api_key on /metrics too")
    drain_delay_s: float = Field(
        2.0, ge=0, description="on SIGTERM, seconds not-ready but serving before listeners close"
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _no_empty_key(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _tiles(self) -> Settings:
        if self.tile_size % MULTIPLE or self.tile_overlap % MULTIPLE:
            raise ValueError(f"tile_size and tile_overlap must be multiples of {MULTIPLE}")
        if self.tile_overlap * 2 >= self.tile_size:
            raise ValueError("tile_overlap must be less than half of tile_size")
        return self
