"""The FastAPI app: the lifespan and `create_app` (the router, the error handlers and the Edge middleware)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from service import schemas
from service.edge import Admission, Edge
from service.errors import install_handlers
from service.metrics import Metrics
from service.routes import guarded_paths, paths, router
from service.services import Services
from service.settings import Settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    services = await Services(settings, app.state.metrics).open()
    app.state.services = services
    log.info("gateway up: redis %s, triton %s, model %s, repo %s", settings.redis_url, settings.triton_url,
             settings.model_name, settings.model_repo)
    try:
        yield
    finally:
        app.state.services = None
        await services.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway; `settings` default to the ONEREC_* environment."""
    settings = settings or Settings()
    app = FastAPI(title="OneRec gateway", version="0.1.0", lifespan=lifespan,
                  description="Generative recommendation: POST /recommend returns a 5-video session.")
    app.state.settings = settings
    app.state.metrics = Metrics(_route_labels(app))
    app.state.metrics.initialise()
    app.state.admission = Admission(settings.max_concurrency, settings.retry_after_s, guarded_paths(router))
    app.state.services = None
    install_handlers(app)
    app.add_middleware(Edge, metrics=app.state.metrics, max_body=settings.max_body_bytes,
                       admission=app.state.admission)
    app.include_router(router)
    app.openapi = lambda: exact_openapi(app)  # type: ignore[method-assign]
    return app


def exact_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI, with the numbers of every component schema as pydantic wrote them.

    FastAPI's OpenAPI model types `minimum`/`maximum` as float, so a video id's bound 2**63-1 was published as
    9.223372036854776e+18 (= 2**63): a client reading the schema sent ids up to 2**63 + 1023, which the gateway
    then refused. The bodies' own JSON schemas are exact, and their numbers replace the rounded ones."""
    if app.openapi_schema is None:
        document = FastAPI.openapi(app)
        components = document.get("components", {}).get("schemas", {})
        for name, published in components.items():
            model = getattr(schemas, name, None)
            if isinstance(model, type) and issubclass(model, BaseModel):
                _restore_numbers(published, model.model_json_schema(ref_template="#/components/schemas/{model}"))
        app.openapi_schema = document
    return app.openapi_schema


def _restore_numbers(published: Any, exact: Any) -> None:
    """Walk both schemas in step; where FastAPI holds a float and pydantic the int it came from, take the int."""
    if isinstance(published, dict) and isinstance(exact, dict):
        for key, value in published.items():
            original = exact.get(key)
            if isinstance(value, float) and isinstance(original, int) and not isinstance(original, bool):
                published[key] = original
            else:
                _restore_numbers(value, original)
    elif isinstance(published, list) and isinstance(exact, list):
        for value, original in zip(published, exact, strict=False):
            _restore_numbers(value, original)


def _route_labels(app: FastAPI) -> tuple[str, ...]:
    """The router's paths plus the docs pages: every other path is labelled "other" (bounded label values)."""
    return tuple(path for path in (*paths(router), app.docs_url, app.openapi_url) if path)
