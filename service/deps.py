"""FastAPI dependencies as ``Annotated`` aliases; handlers touch no globals."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from service.curator import Curator
from service.errors import Unauthorized
from service.registry import Registry
from service.settings import Settings
from service.state import Services

# Every dependency is ``async def`` and reads the app's state: FastAPI runs a plain ``def`` dependency
# in a worker thread (one thread hop per request for a dict lookup), and any entry in
# ``app.dependency_overrides`` makes it rebuild each dependency's signature on every request.


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_registry(services: ServicesDep) -> Registry:
    return services.registry


RegistryDep = Annotated[Registry, Depends(get_registry)]


async def get_curator(services: ServicesDep) -> Curator:
    return services.curator


CuratorDep = Annotated[Curator, Depends(get_curator)]


# Declared as a security scheme (not a plain header) so OpenAPI carries it and Swagger UI offers
# "Authorize"; auto_error=False because a server without a key is open and the check below decides.
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key",
    scheme_name="apiKey",
    description="required on mutating routes when the server has a key",
    auto_error=False,
)


async def require_api_key(settings: SettingsDep, x_api_key: Annotated[str | None, Security(API_KEY_HEADER)]) -> None:
    """401 unless the configured key was sent in ``X-API-Key`` (no key configured: open)."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    if x_api_key is None or not secrets.compare_digest(x_api_key.encode(), expected):
        raise Unauthorized("missing or wrong API key: send it in the X-API-Key header")


ApiKeyDep = Depends(require_api_key)
