"""The FastAPI app: routes, dependencies, admission (API keys, concurrency, body size) and the lifespan."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, install_handlers, request_id_of
from service.history import HistoryError
from service.metrics import Metrics
from service.recommender import HistoryStore, NoCatalogError, Recommender
from service.schemas import (
    ErrorBody,
    EventsRequest,
    EventsResponse,
    Health,
    Item,
    Readiness,
    RecommendRequest,
    RecommendResponse,
)
from service.services import Services
from service.settings import Settings

log = logging.getLogger(__name__)
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "Invalid JSON", 401: "Missing or wrong X-API-Key (when keys are configured)",
            413: "Body over the size limit", 422: "A field is missing or invalid (`field` names it)",
            503: "Overloaded, or the dependency the route needs is down: retry after `Retry-After` seconds"}
    return {s: {"model": ErrorBody, "description": text[s]} for s in statuses}


# --- dependencies -------------------------------------------------------------------------------------------


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


class Admission:
    """At most `limit` guarded requests in flight; the next one gets 503 + Retry-After at once, never a queue."""

    def __init__(self, limit: int, retry_after: int) -> None:
        self.limit, self.retry_after, self.in_flight = limit, retry_after, 0


Guarded = [Depends(require_api_key)]
ADMITTED = ("/recommend", "/events")  # routes that count against the concurrency limit


# --- the edge: request id, body limit, latency -----------------------------------------------------------------


class Edge:
    """Pure ASGI middleware: request id (X-Request-ID in and out), concurrency limit, body size limit, latency and
    status metrics. Kept out of FastAPI's dependency machinery: it runs on every request."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body: int, admission: Admission) -> None:
        self.app, self.metrics, self.max_body, self.admission = app, metrics, max_body, admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        route = self.metrics.route_label(scope.get("path", ""))
        status = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        admitted = scope.get("path") in ADMITTED
        if admitted and self.admission.in_flight >= self.admission.limit:
            self.metrics.rejected.labels("overloaded").inc()
            status["code"] = 503
            await self._refuse(scope, receive, send, request_id, 503, "overloaded",
                               f"more than {self.admission.limit} requests in flight; retry shortly",
                               {"Retry-After": str(self.admission.retry_after)})
            return
        self.admission.in_flight += admitted
        self.metrics.in_flight.inc()
        try:
            body = await self._read_body(receive, headers)
            if body is None:
                status["code"] = 413
                self.metrics.rejected.labels("body_too_large").inc()
                await self._refuse(scope, receive, send, request_id, 413, "body_too_large",
                                   f"body over {self.max_body} bytes", None, "body")
                return
            await self.app(scope, _replay(body, receive), send_with_id)
        finally:
            self.admission.in_flight -= admitted
            self.metrics.in_flight.dec()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, str(status["code"])).inc()

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, request_id: str, status: int, code: str,
                      message: str, headers: dict[str, str] | None, field: str | None = None) -> None:
        body = ErrorBody(code=code, message=message, field=field, request_id=request_id).model_dump()
        await JSONResponse(body, status, {**(headers or {}), "x-request-id": request_id})(scope, receive, send)

    async def _read_body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes | None:
        """The whole body, or None once it exceeds the limit (checked on Content-Length first)."""
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = {"done": False}

    async def replay() -> Message:
        if not sent["done"]:
            sent["done"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# --- the app ------------------------------------------------------------------------------------------------


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
    app.state.metrics = Metrics()
    app.state.metrics.initialise()
    app.state.admission = Admission(settings.max_concurrency, settings.retry_after_s)
    app.state.services = None
    install_handlers(app)
    app.add_middleware(Edge, metrics=app.state.metrics, max_body=settings.max_body_bytes,
                       admission=app.state.admission)
    _routes(app)
    return app


def _json(model: RecommendResponse, timings: dict[str, float]) -> Response:
    """The body already is a validated model: serialise it once (FastAPI would validate it again). Stage times go
    out in a standard `Server-Timing` header (milliseconds), for debugging and benchmarks/gateway_overhead.py."""
    server_timing = ", ".join(f"{stage};dur={seconds * 1e3:.3f}" for stage, seconds in timings.items())
    headers = {"Server-Timing": server_timing} if server_timing else None
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)


def _routes(app: FastAPI) -> None:
    @app.post("/recommend", response_model=RecommendResponse, dependencies=Guarded,
              responses=_errors(400, 401, 413, 422, 503), summary="A 5-video session for a user")
    async def recommend(body: RecommendRequest, request: Request,
                        recommender: Annotated[Recommender, Depends(get_recommender)]) -> Response:
        request_id = request_id_of(request) or ""
        try:
            outcome = await recommender.recommend(body.user_id, body.exclude_seen, body.history, request_id)
        except NoCatalogError as e:
            raise ApiError(503, "catalog_unavailable", str(e), headers={"Retry-After": "5"}) from e
        return _json(RecommendResponse(
            user_id=body.user_id, items=[Item(video_id=v, rank=i + 1) for i, v in enumerate(outcome.video_ids)],
            source=outcome.source, model_version=outcome.model_version, request_id=request_id,
            fallback_reason=outcome.fallback_reason), outcome.timings)

    @app.post("/events", response_model=EventsResponse, dependencies=Guarded,
              responses=_errors(400, 401, 413, 422, 503), summary="Append watched videos to a user's history")
    async def events(body: EventsRequest, request: Request,
                     store: Annotated[HistoryStore, Depends(get_history)],
                     settings: Annotated[Settings, Depends(get_settings)]) -> EventsResponse:
        try:
            length = await store.append(body.user_id, body.video_ids)
        except HistoryError as e:
            log.warning("events for %s not stored: %s", body.user_id, e)
            raise ApiError(503, "redis_unavailable", "history store unavailable; the events were not "
                           "acknowledged, retry", headers={"Retry-After": str(settings.retry_after_s)}) from e
        request.app.state.metrics.events_stored.inc(len(body.video_ids))
        return EventsResponse(user_id=body.user_id, stored=len(body.video_ids), history_length=length,
                              request_id=request_id_of(request) or "")

    @app.get("/healthz", response_model=Health, summary="The process is alive")
    async def healthz() -> Health:
        return Health()

    @app.get("/readyz", response_model=Readiness, summary="Redis reachable, Triton model ready, catalog matches",
             responses={503: {"model": Readiness, "description": "not ready (the body says what is missing)"}})
    async def readyz(readiness: Annotated[Readiness, Depends(get_readiness)], response: Response) -> Readiness:
        if not readiness.ready:
            response.status_code = 503
        return readiness

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
