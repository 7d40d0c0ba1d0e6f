"""Who may call the admin endpoints (reload, model control): with an API key, its holder; without
one, nobody unless the operator opened them for a trusted network (`UNETPP_ADMIN_OPEN=true`).
A server with no key must not let any caller reload or unload its models."""

from __future__ import annotations

from fastapi import Depends

from unetpp.server.deps import BearerDep, SettingsDep, require_token
from unetpp.server.errors import AdminClosed


async def admin_allowed(settings: SettingsDep, credentials: BearerDep) -> None:
    if settings.api_key is not None:
        await require_token(settings, credentials)
    elif not settings.admin_open:
        raise AdminClosed(
            "admin endpoints need an API key: set UNETPP_API_KEY and send 'Authorization: "
            "Bearer <key>', or set UNETPP_ADMIN_OPEN=true on a trusted network"
        )


AdminAllowed = Depends(admin_allowed)
