"""The gateway through TestClient with fakes: hand-worked sessions, every fallback and every 4xx/5xx path."""

from __future__ import annotations

import asyncio

import httpx2
import numpy as np
import pytest

from service.schemas import Readiness
from tests.service.conftest import build_gateway
from tests.service.fakes import FakeModel, FakeStore, pinned

JSON = {"content-type": "application/json"}


def videos(body: dict) -> list[int]:
    assert [item["rank"] for item in body["items"]] == [1, 2, 3, 4, 5]
    return [item["video_id"] for item in body["items"]]


# --- /recommend: the model path -------------------------------------------------------------------------------


def test_best_session_mapped_deduped_and_backfilled(gateway):
    response = gateway.client.post("/recommend", json={"user_id": "u1"}, headers={"X-Request-ID": "req-1"})
    assert response.status_code == 200
    body = response.json()
    # best (0,1)->20, (1,0)->30 seen, (0,1)->10 (20 taken); next (1,1)->40, (2,0)->70, (0,0)->50
    assert videos(body) == [20, 10, 40, 70, 50]
    assert body["source"] == "model" and body["model_version"] == "7" and body["fallback_reason"] is None
    assert body["request_id"] == "req-1" and response.headers["x-request-id"] == "req-1"
    stages = [part.split(";")[0] for part in response.headers["server-timing"].split(", ")]
    assert stages == ["redis", "triton", "mapping"]
    sent, exclude = gateway.model.calls[0]
    np.testing.assert_array_equal(sent, [[1, 0]])  # the history [30] as SIDs
    assert exclude is True
    assert gateway.metric("onerec_gateway_model_items_total") == 2
    assert gateway.metric("onerec_gateway_backfilled_items_total") == 3
    assert gateway.metric("onerec_gateway_collision_hits_total") == 2  # (0,1) twice in the best session
    assert gateway.metric("onerec_gateway_invalid_sids_total") == 0


def test_exclude_seen_false_keeps_history_items(gateway):
    body = gateway.client.post("/recommend", json={"user_id": "u1", "exclude_seen": False}).json()
    assert videos(body) == [20, 30, 10, 40, 70]
    assert gateway.model.calls[0][1] is False


def test_override_history_replaces_redis_and_unknown_videos_are_counted():
    gw = build_gateway(store=FakeStore(down=True))  # Redis is not even asked
    body = gw.client.post("/recommend", json={"user_id": "x", "history": [999, 40, 30, 12345]}).json()
    assert body["source"] == "model"
    np.testing.assert_array_equal(gw.model.calls[0][0], [[1, 1], [1, 0]])  # 40, 30 in order; unknowns dropped
    assert gw.metric("onerec_gateway_unknown_videos_total") == 2
    assert 40 not in videos(body) and 30 not in videos(body)


def test_history_truncated_to_the_models_length():
    gw = build_gateway(store=FakeStore({"u": [10, 20, 30, 40, 50, 60, 70]}))  # pinned max_history = 4
    gw.client.post("/recommend", json={"user_id": "u"})
    assert gw.model.calls[0][0].shape == (4, 2)


def test_invalid_sids_counted_and_answer_still_five_items():
    sessions = np.array([[[2, 2], [0, 0], [2, 1]]], dtype=np.int32)  # (2,2), (2,1) are not catalog SIDs
    gw = build_gateway(model=FakeModel(sessions=sessions))
    body = gw.client.post("/recommend", json={"user_id": "u1"}).json()
    assert videos(body) == [50, 20, 60, 40, 10]  # 50 from the model, then popular without 30 (seen)
    assert gw.metric("onerec_gateway_invalid_sids_total") == 2


# --- /recommend: fallbacks ---------------------------------------------------------------------------------------


POPULAR = [20, 60, 40, 10, 50]


def test_cold_start_user_gets_popular(gateway):
    body = gateway.client.post("/recommend", json={"user_id": "new-user"}).json()
    assert videos(body) == POPULAR
    assert body["source"] == "popular" and body["fallback_reason"] == "cold_start"
    assert gateway.model.calls == []
    assert gateway.metric("onerec_gateway_fallbacks_total", reason="cold_start") == 1


@pytest.mark.parametrize("reason", ["triton_unavailable", "triton_timeout", "triton_overloaded", "triton_error",
                                    "circuit_open"])
def test_triton_failures_degrade_to_popular(reason):
    gw = build_gateway(store=FakeStore({"u": [20]}), model=FakeModel(error=reason))
    response = gw.client.post("/recommend", json={"user_id": "u"})
    assert response.status_code == 200
    body = response.json()
    assert body["source"] == "popular" and body["fallback_reason"] == reason
    assert videos(body) == [60, 40, 10, 50, 70]  # popular minus the seen 20
    assert gw.metric("onerec_gateway_fallbacks_total", reason=reason) == 1


def test_redis_down_serves_popular(gateway):
    gateway.store.down = True
    body = gateway.client.post("/recommend", json={"user_id": "u1"}).json()
    assert body["source"] == "popular" and body["fallback_reason"] == "redis_unavailable"
    assert videos(body) == POPULAR


def test_catalog_mismatch_serves_popular_without_calling_triton():
    gw = build_gateway(pin=pinned(matched=False))
    body = gw.client.post("/recommend", json={"user_id": "u1"}).json()
    assert body["fallback_reason"] == "catalog_mismatch" and gw.model.calls == []


def test_answer_from_another_model_version_is_not_mapped():
    gw = build_gateway(model=FakeModel(version="8"))
    body = gw.client.post("/recommend", json={"user_id": "u1"}).json()
    assert body["source"] == "popular" and body["fallback_reason"] == "catalog_mismatch"
    assert gw.metric("onerec_gateway_catalog_mismatches_total") == 1
    assert gw.version_changes == [1]  # a re-sync was triggered


def test_no_catalog_at_all_is_503():
    gw = build_gateway(pin=None)
    response = gw.client.post("/recommend", json={"user_id": "u1"})
    assert response.status_code == 503
    assert response.json()["code"] == "catalog_unavailable" and "retry-after" in response.headers


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "status", "code", "field"), [
    ('{"user_id":', 400, "invalid_json", "body"),
    ("{}", 422, "missing_field", "user_id"),
    ('{"user_id": ""}', 422, "invalid_field", "user_id"),
    ('{"user_id": "has space"}', 422, "invalid_field", "user_id"),
    ('{"user_id": "' + "a" * 129 + '"}', 422, "invalid_field", "user_id"),
    ('{"user_id": 5}', 422, "invalid_field", "user_id"),
    ('{"user_id": "u", "exclude_seen": "maybe"}', 422, "invalid_field", "exclude_seen"),
    ('{"user_id": "u", "history": [1, -2]}', 422, "invalid_field", "history.1"),
    ('{"user_id": "u", "history": [' + ",".join(["1"] * 1025) + "]}", 422, "invalid_field", "history"),
    ('{"user_id": "u", "surprise": 1}', 422, "invalid_field", "surprise"),
    ("[1, 2]", 422, "invalid_field", "body"),
])
def test_recommend_bad_input(gateway, body, status, code, field):
    response = gateway.client.post("/recommend", content=body, headers=JSON)
    assert response.status_code == status, response.text
    error = response.json()
    assert (error["code"], error["field"]) == (code, field)
    assert error["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize(("body", "field"), [
    ({"user_id": "u"}, "video_ids"),
    ({"user_id": "u", "video_ids": []}, "video_ids"),
    ({"user_id": "u", "video_ids": list(range(257))}, "video_ids"),
    ({"user_id": "u", "video_ids": ["x"]}, "video_ids.0"),
    ({"user_id": "bad/id", "video_ids": [1]}, "user_id"),
])
def test_events_bad_input(gateway, body, field):
    response = gateway.client.post("/events", json=body)
    assert response.status_code == 422
    assert response.json()["field"] == field


@pytest.mark.parametrize("value", [False, True, 1.5, "3", None, [3], {"id": 3}, 2**63, -1])
@pytest.mark.parametrize(("route", "field"), [("/events", "video_ids"), ("/recommend", "history")])
def test_a_video_id_that_is_not_an_int64_is_422_naming_the_field(gateway, route, field, value):
    """Strict ids: lax pydantic stored `false` as video 0 and "3" as 3; nothing reaches the store or the model."""
    response = gateway.client.post(route, json={"user_id": "u1", field: [30, value]})
    assert response.status_code == 422, response.text
    error = response.json()
    assert (error["code"], error["field"]) == ("invalid_field", f"{field}.1")
    assert error["message"].startswith(f"{field}.1: ")
    assert gateway.store.histories == {"u1": [30]} and gateway.model.calls == []


@pytest.mark.parametrize(("body", "field"), [
    ({"user_id": "u1", "exclude_seen": 1}, "exclude_seen"),
    ({"user_id": "u1", "exclude_seen": "true"}, "exclude_seen"),
    ({"user_id": 196}, "user_id"),
])
def test_other_fields_are_strict_too(gateway, body, field):
    response = gateway.client.post("/recommend", json=body)
    assert response.status_code == 422 and response.json()["field"] == field


def test_a_whole_number_written_as_a_float_is_that_integer(gateway):
    """JSON Schema (draft 2020-12, OpenAPI 3.1) reads 40.0 as the integer 40, so the schema admits it."""
    assert gateway.client.post("/events", json={"user_id": "u1", "video_ids": [40.0]}).status_code == 200
    assert gateway.store.histories["u1"] == [40, 30] and all(type(v) is int for v in gateway.store.histories["u1"])


def test_the_int64_edge_is_accepted_and_stored_exactly(gateway):
    edge = 2**63 - 1
    response = gateway.client.post("/events", json={"user_id": "u1", "video_ids": [edge]})
    assert response.status_code == 200, response.text
    assert gateway.store.histories["u1"] == [edge, 30]
    body = gateway.client.post("/recommend", json={"user_id": "u1"}).json()
    assert body["source"] == "model" and len(set(videos(body))) == 5  # the unknown edge id is dropped, counted
    assert gateway.metric("onerec_gateway_unknown_videos_total") == 1
    body = gateway.client.post("/recommend", json={"user_id": "u2", "history": [edge, 30]}).json()
    assert body["source"] == "model"


def test_openapi_publishes_the_exact_int64_bound(gateway):
    """FastAPI's OpenAPI model rounds integer bounds through float (2**63-1 became 9.223372036854776e+18 = 2**63,
    and clients then sent ids above int64); the published schema carries pydantic's exact integers."""
    text = gateway.client.get("/openapi.json").text
    assert "e+18" not in text
    components = gateway.client.get("/openapi.json").json()["components"]["schemas"]
    item = components["EventsRequest"]["properties"]["video_ids"]["items"]
    assert (item["minimum"], item["maximum"]) == (0, 2**63 - 1) and type(item["minimum"]) is int
    history = components["RecommendRequest"]["properties"]["history"]["anyOf"][0]["items"]
    assert history["maximum"] == 2**63 - 1


def test_body_over_the_limit_is_413_with_or_without_content_length():
    gw = build_gateway(max_body_bytes=1024)
    big = '{"user_id": "u", "history": [' + ",".join(["1"] * 600) + "]}"
    response = gw.client.post("/recommend", content=big, headers=JSON)
    assert response.status_code == 413 and response.json()["code"] == "body_too_large"

    def chunks():
        for i in range(0, len(big), 100):
            yield big[i:i + 100].encode()

    response = gw.client.post("/recommend", content=chunks(), headers=JSON)  # chunked: no Content-Length
    assert response.status_code == 413
    assert gw.model.calls == []


def test_unknown_route_and_method_are_json(gateway):
    assert gateway.client.get("/nope").json()["code"] == "not_found"
    response = gateway.client.get("/recommend")
    assert response.status_code == 405 and response.json()["code"] == "method_not_allowed"


# --- API keys ------------------------------------------------------------------------------------------------------


def test_api_keys():
    gw = build_gateway(api_keys="k1, k2")
    assert gw.client.post("/recommend", json={"user_id": "u1"}).status_code == 401
    wrong = gw.client.post("/recommend", json={"user_id": "u1"}, headers={"X-API-Key": "k3"})
    assert wrong.status_code == 401 and wrong.json()["code"] == "unauthorized"
    assert gw.client.post("/events", json={"user_id": "u", "video_ids": [1]}).status_code == 401
    assert gw.client.post("/recommend", json={"user_id": "u1"}, headers={"X-API-Key": "k2"}).status_code == 200
    assert gw.client.get("/healthz").status_code == 200  # probes need no key


def test_settings_read_api_keys_from_the_environment(monkeypatch):
    from service.settings import Settings

    monkeypatch.setenv("ONEREC_API_KEYS", "a,b ,")
    monkeypatch.setenv("ONEREC_BEAM_WIDTH", "64")
    settings = Settings()
    assert settings.api_keys == ["a", "b"] and settings.beam_width == 64


# --- concurrency limit -----------------------------------------------------------------------------------------------


def test_over_the_concurrency_limit_is_503_at_once():
    async def scenario():
        gate = asyncio.Event()
        gw = build_gateway(model=FakeModel(gate=gate), max_concurrency=1)
        transport = httpx2.ASGITransport(app=gw.app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://gw") as client:
            held = asyncio.create_task(client.post("/recommend", json={"user_id": "u1"}))
            while not gw.model.calls:
                await asyncio.sleep(0.001)
            rejected = await client.post("/recommend", json={"user_id": "u1"})
            gate.set()
            first = await held
        return gw, first, rejected

    gw, first, rejected = asyncio.run(scenario())
    assert first.status_code == 200
    assert rejected.status_code == 503 and rejected.json()["code"] == "overloaded"
    assert rejected.headers["retry-after"] == "1"
    assert gw.metric("onerec_gateway_rejected_total", reason="overloaded") == 1


# --- /events ---------------------------------------------------------------------------------------------------------


def test_events_append_most_recent_first(gateway):
    response = gateway.client.post("/events", json={"user_id": "u1", "video_ids": [40, 50]})
    assert response.status_code == 200
    assert response.json()["stored"] == 2 and response.json()["history_length"] == 3
    assert gateway.store.histories["u1"] == [50, 40, 30]


def test_events_when_redis_is_down_are_503_and_not_acknowledged(gateway):
    gateway.store.down = True
    response = gateway.client.post("/events", json={"user_id": "u1", "video_ids": [40]})
    assert response.status_code == 503
    assert response.json()["code"] == "redis_unavailable" and response.headers["retry-after"] == "1"
    assert gateway.store.histories["u1"] == [30]


# --- probes, metrics, docs ---------------------------------------------------------------------------------


def test_probes_and_metrics(gateway):
    assert gateway.client.get("/healthz").json() == {"status": "ok"}
    assert gateway.client.get("/readyz").status_code == 200
    gateway.client.post("/recommend", json={"user_id": "u1"})
    text = gateway.client.get("/metrics").text
    for name in ("onerec_gateway_request_seconds_bucket", "onerec_gateway_stage_seconds_bucket",
                 "onerec_gateway_history_length_bucket", "onerec_gateway_fallbacks_total"):
        assert name in text
    assert 'onerec_gateway_requests_total{route="/recommend",status="200"} 1.0' in text


def test_known_label_values_exist_at_zero_before_anything_happens():
    """Dashboards rate() over these: every known reason, source and stage of a version is exported from the moment
    the gateway pins it (the version pin calls initialise_version), the rejections from the start."""
    gw = build_gateway()
    assert 'onerec_gateway_rejected_total{reason="body_too_large"} 0.0' in gw.client.get("/metrics").text
    gw.app.state.metrics.initialise_version("7")
    text = gw.client.get("/metrics").text
    for series in ('onerec_gateway_fallbacks_total{model_version="7",reason="cold_start"} 0.0',
                   'onerec_gateway_fallbacks_total{model_version="7",reason="version_unavailable"} 0.0',
                   'onerec_gateway_recommendations_total{model_version="7",source="model"} 0.0',
                   'onerec_gateway_stage_seconds_count{model_version="7",stage="triton"} 0.0',
                   'onerec_gateway_invalid_sids_total{model_version="7"} 0.0',
                   'onerec_gateway_recommend_seconds_count{model_version="7"} 0.0'):
        assert series in text


def test_readyz_503_says_what_is_missing():
    not_ready = Readiness(ready=False, redis=True, triton=False, catalog=False, model_version=None,
                          detail="triton model not ready")
    gw = build_gateway(readiness=not_ready)
    response = gw.client.get("/readyz")
    assert response.status_code == 503 and response.json()["detail"] == "triton model not ready"


def test_openapi_lists_every_status_code(gateway):
    paths = gateway.client.get("/openapi.json").json()["paths"]
    for route in ("/recommend", "/events"):
        assert set(paths[route]["post"]["responses"]) == {"200", "400", "401", "413", "422", "503"}
    assert set(paths["/readyz"]["get"]["responses"]) == {"200", "503"}
    assert gateway.client.get("/docs").status_code == 200
