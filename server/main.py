"""`unetpp serve` and `python -m unetpp.server`: settings from the command line and the
environment (`UNETPP_*`), then uvicorn."""

from __future__ import annotations

import argparse
import logging

import uvicorn
from unetpp.server.app import create_app
from unetpp.server.settings import Settings

log = logging.getLogger(__name__)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Command-line values override the environment's; unset ones leave it in charge."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    log.info("serving %s on http://%s:%d", settings.models, settings.host, settings.port)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=logging.getLevelName(logging.getLogger().level).lower(),
        access_log=False,
    )
    return 0
