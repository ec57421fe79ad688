"""The canary split: a stable hash of user_id, the same in every process, honouring the share."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.canary import bucket, in_canary

USERS = [f"u{i}" for i in range(20_000)]


def test_bucket_is_stable_across_processes():
    """Python's hash() is salted per process; the split must not be (every gateway worker agrees)."""
    code = ("from service.canary import bucket; "
            "print(','.join(f'{bucket(u, \"3\"):.12f}' for u in ['196', 'alice', 'u:42', '']))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "random")}
    assert len(outputs) == 1
    assert outputs.pop().strip() == ",".join(f"{bucket(u, '3'):.12f}" for u in ["196", "alice", "u:42", ""])


@pytest.mark.parametrize("share", [0.01, 0.05, 0.2, 0.5, 0.9])
def test_share_is_honoured(share):
    chosen = sum(in_canary(u, "3", share) for u in USERS) / len(USERS)
    assert abs(chosen - share) < 4 * (share * (1 - share) / len(USERS)) ** 0.5 + 1e-3


def test_edges_and_monotone_ramp():
    assert not any(in_canary(u, "3", 0.0) for u in USERS[:1000])
    assert all(in_canary(u, "3", 1.0) for u in USERS[:1000])
    at_10 = {u for u in USERS if in_canary(u, "3", 0.1)}
    at_30 = {u for u in USERS if in_canary(u, "3", 0.3)}
    assert at_10 < at_30  # raising one candidate's share only adds users to it


def test_each_candidate_draws_its_own_slice():
    """The salt is the candidate version: the next canary does not land on the same users again."""
    first = {u for u in USERS if in_canary(u, "3", 0.2)}
    second = {u for u in USERS if in_canary(u, "4", 0.2)}
    overlap = len(first & second) / len(first)
    assert 0.15 < overlap < 0.25  # independent slices overlap by about the share
    assert all(0.0 <= bucket(u, "3") < 1.0 for u in USERS[:100])


def test_each_user_is_answered_and_counted_by_its_own_version():
    """The Recommender asks Triton for the version pinned for the user, and labels every series with it."""
    import asyncio

    from service.metrics import Metrics
    from service.recommender import Recommender
    from tests.service.fakes import FakeModel, FakeStore, pinned

    primary, candidate = pinned(version="7"), pinned(version="8")
    users = [f"u{i}" for i in range(200)]
    route = {user: candidate if in_canary(user, "8", 0.3) else primary for user in users}
    metrics = Metrics()
    model = FakeModel()

    async def answer_all() -> dict[str, str]:
        versions = {}
        for user in users:
            model.version = route[user].version  # Triton answers with the version it was asked for
            outcome = await Recommender(FakeStore({user: [30]}), model, lambda who: route[who], metrics,
                                        256).recommend(user)
            versions[user] = outcome.model_version
        return versions

    versions = asyncio.run(answer_all())
    assert versions == {user: route[user].version for user in users}
    assert model.versions == [route[user].version for user in users]  # each call named its version
    on_candidate = sum(v == "8" for v in versions.values())
    get = metrics.registry.get_sample_value
    assert get("onerec_gateway_recommendations_total", {"source": "model", "model_version": "8"}) == on_candidate
    assert get("onerec_gateway_recommendations_total", {"source": "model", "model_version": "7"}) == 200 - on_candidate
    assert get("onerec_gateway_recommend_seconds_count", {"model_version": "8"}) == on_candidate
    assert get("onerec_gateway_model_items_total", {"model_version": "7"}) > 0


def test_a_version_triton_no_longer_holds_falls_back_and_resyncs():
    import asyncio

    from service.metrics import Metrics
    from service.recommender import Recommender
    from tests.service.fakes import FakeModel, FakeStore, pinned

    resyncs = []

    async def resync() -> None:
        resyncs.append(1)

    async def ask():
        recommender = Recommender(FakeStore({"u1": [30]}), FakeModel(error="version_unavailable"),
                                  lambda _: pinned(), Metrics(), 256, on_version_change=resync)
        outcome = await recommender.recommend("u1")
        await asyncio.gather(*recommender._resyncs)
        return outcome

    outcome = asyncio.run(ask())
    assert (outcome.source, outcome.fallback_reason, outcome.model_version) == ("popular", "version_unavailable", "7")
    assert resyncs == [1]
