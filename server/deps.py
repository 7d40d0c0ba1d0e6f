"""Dependencies shared by the routers, as `Annotated` types."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from unetpp.server.errors import NotReady
from unetpp.server.service import Service
from unetpp.server.settings import Settings
from unetpp.server.state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


def get_service(state: StateDep) -> Service:
    if state.service is None:
        if state.error:
            raise NotReady(state.error)
        raise NotReady("the model is still loading", retry_after=1)
    return state.service


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[Service, Depends(get_service)]
