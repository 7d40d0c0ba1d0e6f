"""Dependencies shared by the routers, as `Annotated` types."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from unetpp.server.errors import Unauthorized
from unetpp.server.registry import Registry
from unetpp.server.settings import Settings


# async: FastAPI runs a plain `def` dependency in a worker thread, a hop on every request
async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


RegistryDep = Annotated[Registry, Depends(get_registry)]


async def get_settings(registry: RegistryDep) -> Settings:
    return registry.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]

_bearer = HTTPBearer(auto_error=False, description="UNETPP_API_KEY")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def bearer_token(request: Request) -> str | None:
    """The request's bearer token, parsed as the protected routes parse it, for a public route
    (as a dependency, the scheme would mark that route as protected in OpenAPI)."""
    credentials = await _bearer(request)
    return credentials.credentials if credentials else None


def authorized(settings: Settings, token: str | None) -> bool:
    """True without an `api_key`, else when the bearer token is it (a constant-time compare)."""
    if settings.api_key is None:
        return True
    expected = settings.api_key.get_secret_value().encode()
    return token is not None and hmac.compare_digest(token.encode(), expected)


async def require_token(settings: SettingsDep, credentials: BearerDep) -> None:
    """The request must carry `Authorization: Bearer <api_key>` (app.py adds this dependency
    to the protected routers when the server has an `api_key`)."""
    if credentials is None:
        raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
    if not authorized(settings, credentials.credentials):
        raise Unauthorized("the bearer token is not this server's API key")


Authorized = Depends(require_token)
