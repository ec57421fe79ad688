"""Per-request `exclude` and the global blocklist: hand-worked answers on the fake catalog, what reaches the beam
search (BANNED_SIDS), and a property: no excluded or blocked video in any answer, whatever its source."""

from __future__ import annotations

import asyncio

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.metrics import Metrics
from service.recommender import Recommender
from tests.service.conftest import build_gateway
from tests.service.fakes import VIDEOS, FakeBlocklist, FakeModel, FakeStore, catalog, pinned

# The fake catalog (tests/service/fakes.py): leaves (0,0)->[50] (0,1)->[20,10] (1,0)->[30] (1,1)->[40] (1,2)->[60]
# (2,0)->[70]; popularity 20, 60, 40, 10, 50, 70, 30. The model answers (0,1) (1,0) (0,1) | (1,1) (2,0) (0,0), and
# user u1 has watched 30: the plain answer is [20, 10, 40, 70, 50].


def videos(body: dict) -> list[int]:
    return [item["video_id"] for item in body["items"]]


def test_excluded_videos_are_banned_in_the_beam_and_filtered_from_the_answer(gateway):
    body = gateway.client.post("/recommend", json={"user_id": "u1", "exclude": [40]}).json()
    # (1,1)->40 excluded: the next session gives 70, 50, then popularity 60 (20, 40 and 10 are taken or out)
    assert body["source"] == "model" and videos(body) == [20, 10, 70, 50, 60]
    np.testing.assert_array_equal(gateway.model.banned[0], [[1, 1]])


def test_a_sid_two_videos_share_is_banned_only_when_both_are(gateway):
    body = gateway.client.post("/recommend", json={"user_id": "u1", "exclude": [20]}).json()
    assert gateway.model.banned[0] is None  # 10 shares (0,1) and is still allowed: the beam may generate it
    assert videos(body) == [10, 40, 70, 50, 60]
    gateway.client.post("/recommend", json={"user_id": "u1", "exclude": [10, 20]})
    np.testing.assert_array_equal(gateway.model.banned[1], [[0, 1]])


def test_blocked_videos_are_never_served_from_the_model_backfill_or_popular(gateway):
    gateway.blocklist.ids = {70, 60}
    body = gateway.client.post("/recommend", json={"user_id": "u1"}).json()
    assert body["source"] == "model" and videos(body) == [20, 10, 40, 50]  # 70 and 60 gone; nothing else left
    np.testing.assert_array_equal(gateway.model.banned[0], [[1, 2], [2, 0]])
    cold = gateway.client.post("/recommend", json={"user_id": "never-seen"}).json()
    assert cold["source"] == "popular" and videos(cold) == [20, 40, 10, 50, 30]


def test_excluded_and_blocked_together_and_the_popular_fallback_when_triton_fails():
    gw = build_gateway(model=FakeModel(error="triton_unavailable"))
    gw.blocklist.ids = {20}
    body = gw.client.post("/recommend", json={"user_id": "u1", "exclude": [60]}).json()
    assert body["fallback_reason"] == "triton_unavailable" and videos(body) == [40, 10, 50, 70, 30]


def test_unknown_excluded_ids_are_ignored_and_counted(gateway):
    body = gateway.client.post("/recommend", json={"user_id": "u1", "exclude": [999, 40, 2**63 - 1]}).json()
    assert videos(body) == [20, 10, 70, 50, 60]
    assert gateway.metric("onerec_gateway_unknown_excluded_videos_total") == 2


def test_exclude_is_strict_and_bounded(gateway):
    for bad, field in (([False], "exclude.0"), (["3"], "exclude.0"), ([1.5], "exclude.0"), ([-1], "exclude.0"),
                       (list(range(1025)), "exclude"), ("40", "exclude")):
        response = gateway.client.post("/recommend", json={"user_id": "u1", "exclude": bad})
        assert response.status_code == 422 and response.json()["field"] == field, (bad, response.text)
    assert gateway.client.post("/recommend", json={"user_id": "u1", "exclude": list(range(1024))}).status_code == 200


def test_a_version_without_banned_sids_still_never_serves_them():
    gw = build_gateway(pin=pinned(bans_in_beam=False))
    body = gw.client.post("/recommend", json={"user_id": "u1", "exclude": [40]}).json()
    assert gw.model.banned == [None] and videos(body) == [20, 10, 70, 50, 60]


def test_the_request_s_own_exclusions_go_first_when_over_the_ban_limit():
    gw = build_gateway(max_banned_sids=1)
    gw.blocklist.ids = {70}
    body = gw.client.post("/recommend", json={"user_id": "u1", "exclude": [40]}).json()
    np.testing.assert_array_equal(gw.model.banned[0], [[1, 1]])  # 40's SID; 70's is only filtered afterwards
    assert 70 not in videos(body) and 40 not in videos(body)


def test_a_video_blocked_while_triton_answers_is_filtered_from_that_answer():
    class BlocksMidway(FakeModel):
        async def infer(self, *args, **kwargs):
            gw.blocklist.ids.add(20)  # an operator's SADD lands while the beam search runs
            return await super().infer(*args, **kwargs)

    gw = build_gateway(model=BlocksMidway())
    body = gw.client.post("/recommend", json={"user_id": "u1"}).json()
    assert gw.model.banned == [None] and 20 not in videos(body) and len(videos(body)) == 5


def test_blocklist_metrics_exist_before_anything_happens():
    gw = build_gateway()
    gw.app.state.metrics.initialise_version("7")  # what pinning a version does
    text = gw.client.get("/metrics").text
    for series in ('onerec_gateway_unknown_excluded_videos_total{model_version="7"} 0.0',
                   "onerec_gateway_blocklist_size 0.0",
                   "onerec_gateway_blocklist_stale 0.0", "onerec_gateway_blocklist_refresh_failures_total 0.0"):
        assert series in text


# --- property: across every source ---------------------------------------------------------------------------

CATALOG = catalog()
UNKNOWN = [999, 12345, 2**63 - 1]
SCENARIOS = ("model", "cold_start", "redis_down", "triton_unavailable", "circuit_open", "catalog_mismatch",
             "other_version")
sid = st.tuples(st.integers(0, 2), st.integers(0, 2))  # valid and invalid SIDs alike (the model may err)


@st.composite
def sessions(draw) -> np.ndarray:
    R, m = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    return np.array(draw(st.lists(st.lists(sid, min_size=m, max_size=m), min_size=R, max_size=R)), dtype=np.int32)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(scenario=st.sampled_from(SCENARIOS), answer=sessions(),
       history=st.lists(st.sampled_from(VIDEOS + UNKNOWN), max_size=6),
       exclude=st.lists(st.sampled_from(VIDEOS + UNKNOWN), max_size=6),
       blocked=st.sets(st.sampled_from(VIDEOS + UNKNOWN), max_size=5), exclude_seen=st.booleans())
def test_no_excluded_or_blocked_video_in_any_answer(scenario, answer, history, exclude, blocked, exclude_seen):
    model = FakeModel(sessions=answer, version="8" if scenario == "other_version" else "7",
                      error=scenario if scenario in ("triton_unavailable", "circuit_open") else None)
    store = FakeStore({"u": history}, down=scenario == "redis_down")
    pin = pinned(matched=scenario != "catalog_mismatch")
    recommender = Recommender(store, model, lambda *_: pin, Metrics(), 256, blocklist=FakeBlocklist(blocked))
    user_history = [] if scenario == "cold_start" else history
    outcome = asyncio.run(recommender.recommend("u", exclude_seen, None if scenario == "redis_down" else user_history,
                                                exclude=exclude))
    never = set(exclude) | blocked
    served = outcome.video_ids
    assert not set(served) & never, (outcome, never)
    assert len(set(served)) == len(served) and set(served) <= set(VIDEOS)
    allowed = set(VIDEOS) - never
    if outcome.source == "model":
        allowed -= set(user_history) if exclude_seen else set()
    assert len(served) == min(5, len(allowed))  # five whenever the catalog still has five to give
    for banned in model.banned:  # what the beam search was told: exactly the SIDs none of whose videos is allowed
        sids = set() if banned is None else {tuple(row) for row in banned.tolist()}
        fully = {tuple(CATALOG.unique_sids[leaf].tolist()) for leaf in range(CATALOG.num_leaves)
                 if set(CATALOG.videos_of_leaf(leaf).tolist()) <= never}
        assert sids == fully
