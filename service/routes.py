"""Every gateway route on one `APIRouter`; which paths are admitted and labelled is read off it, not kept by hand."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute

from service.deps import Guarded, get_history, get_readiness, get_recommender, get_settings, require_api_key
from service.errors import ApiError, request_id_of
from service.history import HistoryError
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
from service.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter()


def paths(api: APIRouter = router) -> tuple[str, ...]:
    """Every route's path, in declaration order: the metric route labels (other paths are labelled "other")."""
    return tuple(route.path for route in api.routes if isinstance(route, APIRoute))


def guarded_paths(api: APIRouter = router) -> tuple[str, ...]:
    """The paths of routes carrying the `Guarded` dependency: the work routes that count against the concurrency
    limit (probes and /metrics must answer while the gateway is saturated)."""
    return tuple(route.path for route in api.routes
                 if isinstance(route, APIRoute) and any(d.dependency is require_api_key for d in route.dependencies))


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "Invalid JSON", 401: "Missing or wrong X-API-Key (when keys are configured)",
            413: "Body over the size limit", 422: "A field is missing or invalid (`field` names it)",
            503: "Overloaded, or the dependency the route needs is down: retry after `Retry-After` seconds"}
    return {s: {"model": ErrorBody, "description": text[s]} for s in statuses}


def _json(model: RecommendResponse, timings: dict[str, float]) -> Response:
    """The body already is a validated model: serialise it once (FastAPI would validate it again). Stage times go
    out in a standard `Server-Timing` header (milliseconds), for debugging and benchmarks/gateway_overhead.py."""
    server_timing = ", ".join(f"{stage};dur={seconds * 1e3:.3f}" for stage, seconds in timings.items())
    headers = {"Server-Timing": server_timing} if server_timing else None
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)


@router.post("/recommend", response_model=RecommendResponse, dependencies=Guarded,
             responses=_errors(400, 401, 413, 422, 503), summary="A 5-video session for a user")
async def recommend(body: RecommendRequest, request: Request,
                    recommender: Annotated[Recommender, Depends(get_recommender)]) -> Response:
    request_id = request_id_of(request) or ""
    try:
        outcome = await recommender.recommend(body.user_id, body.exclude_seen, body.history, request_id,
                                              body.exclude)
    except NoCatalogError as e:
        raise ApiError(503, "catalog_unavailable", str(e), headers={"Retry-After": "5"}) from e
    return _json(RecommendResponse(
        user_id=body.user_id, items=[Item(video_id=v, rank=i + 1) for i, v in enumerate(outcome.video_ids)],
        source=outcome.source, model_version=outcome.model_version, request_id=request_id,
        fallback_reason=outcome.fallback_reason), outcome.timings)


@router.post("/events", response_model=EventsResponse, dependencies=Guarded,
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


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Readiness, summary="Redis reachable, Triton model ready, catalog matches",
            responses={503: {"model": Readiness, "description": "not ready (the body says what is missing)"}})
async def readyz(readiness: Annotated[Readiness, Depends(get_readiness)], response: Response) -> Readiness:
    if not readiness.ready:
        response.status_code = 503
    return readiness


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
