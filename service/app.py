"""The FastAPI app: the lifespan and `create_app` (the router, the error handlers and the Edge middleware)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

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
    return app


def _route_labels(app: FastAPI) -> tuple[str, ...]:
    """The router's paths plus the docs pages: every other path is labelled "other" (bounded label values)."""
    return tuple(path for path in (*paths(router), app.docs_url, app.openapi_url) if path)
