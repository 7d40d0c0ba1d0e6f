"""`unetpp serve` and `python -m unetpp.server`: settings from the command line and the
environment (`UNETPP_*`), then uvicorn."""

from __future__ import annotations

import argparse
import logging

import uvicorn
from pydantic import ValidationError
from unetpp.core.errors import InvalidInput
from unetpp.server.app import create_app
from unetpp.server.settings import Settings

log = logging.getLogger(__name__)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Command-line values override the environment's; unset ones leave it in charge."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"UNETPP_{'_'.join(map(str, e['loc'])).upper() or 'SETTINGS'}: {e['msg']}"
            for e in exc.errors()
        )
        raise InvalidInput(f"bad settings: {problems}") from exc
    if settings.models is None:
        raise InvalidInput("no model repository: give --models DIR or set UNETPP_MODELS")
    return settings


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
