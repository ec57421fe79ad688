"""The routes' `Annotated` dependencies: settings, services, recommender, history, readiness and the API-key guard."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from service.errors import ApiError
from service.recommender import HistoryStore, Recommender
from service.schemas import Readiness
from service.services import Services
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_services(request: Request) -> Services:
    services = getattr(request.app.state, "services", None)
    if services is None:
        raise ApiError(503, "starting", "the gateway is starting", headers={"Retry-After": "1"})
    return services


async def get_recommender(services: Annotated[Services, Depends(get_services)]) -> Recommender:
    return services.recommender


async def get_history(services: Annotated[Services, Depends(get_services)]) -> HistoryStore:
    return services.history


async def get_readiness(services: Annotated[Services, Depends(get_services)]) -> Readiness:
    return await services.readiness()


async def require_api_key(settings: Annotated[Settings, Depends(get_settings)],
                    x_api_key: Annotated[str | None, Header(description="required when keys are configured")] = None,
                    ) -> None:
    """401 unless X-API-Key equals one of the configured keys (constant-time); open when none are configured."""
    if not settings.api_keys:
        return
    given = (x_api_key or "").encode()
    if not any(hmac.compare_digest(given, key.encode()) for key in settings.api_keys):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key", "X-API-Key",
                       headers={"WWW-Authenticate": "ApiKey"})


Guarded = [Depends(require_api_key)]  # a route with these dependencies also counts against the concurrency limit
