"""Circuit breaker states on a fake clock and the Triton error -> fallback reason mapping."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from service.model_client import CircuitBreaker, failure_reason


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_n_failures_then_probes_once():
    clock = Clock()
    breaker = CircuitBreaker(failures=3, reset_s=2.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 1.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.state == "half_open"
    assert breaker.allow()  # the one probe
    assert not breaker.allow()  # no second while it is out
    breaker.failure()  # probe failed: open again, for another reset_s
    assert breaker.state == "open"
    clock.now += 2.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_success_resets_the_failure_count():
    breaker = CircuitBreaker(failures=2, reset_s=1.0, clock=Clock())
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert breaker.state == "closed"


@pytest.mark.parametrize(("status", "message", "reason"), [
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", "triton_timeout"),
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", "triton_unavailable"),
    ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", "triton_overloaded"),
    ("StatusCode.UNAVAILABLE", "Request timeout expired (queue)", "triton_overloaded"),
    ("StatusCode.INVALID_ARGUMENT", "HISTORY_SIDS: codes must lie in [0, 32)", "triton_error"),
    ("StatusCode.INTERNAL", "engine failed", "triton_error"),
])
def test_failure_reasons(status, message, reason):
    assert failure_reason(InferenceServerException(msg=message, status=status)) == reason


class _Param:
    def __init__(self, value: str) -> None:
        self.string_value = value


class _Tensor:
    def __init__(self, name: str) -> None:
        self.name = name


class _Config:
    def __init__(self, params: dict[str, str]) -> None:
        self.parameters = {key: _Param(value) for key, value in params.items()}
        self.input = [_Tensor("HISTORY_SIDS"), _Tensor("BANNED_SIDS")]


class _ConfigClient:
    """The two calls `served()` makes, answering from a parameters dict and a set of ready versions."""

    def __init__(self, params: dict[str, str], ready: set[str]) -> None:
        self.params, self.ready = params, ready

    async def get_model_config(self, model_name, client_timeout=None):
        return type("Response", (), {"config": _Config(self.params)})()

    async def is_model_ready(self, model_name, model_version="", client_timeout=None):
        return model_version in self.ready


@pytest.mark.parametrize(("params", "ready", "canary", "share"), [
    ({"canary_version": "4", "canary_share": "0.2", "catalog_hash_4": "c4"}, {"3", "4"}, "4", 0.2),
    ({"canary_version": "4", "canary_share": "0.2", "catalog_hash_4": "c4"}, {"3"}, None, 0.0),  # not loaded yet
    ({"canary_version": "4", "canary_share": "0", "catalog_hash_4": "c4"}, {"3", "4"}, None, 0.0),
    ({"canary_version": "4", "canary_share": "x", "catalog_hash_4": "c4"}, {"3", "4"}, None, 0.0),
    ({"canary_version": "", "canary_share": "0"}, {"3"}, None, 0.0),
    ({}, {"3"}, None, 0.0),  # a config written before canaries
])
def test_served_reads_the_primary_and_the_canary(params, ready, canary, share):
    import asyncio

    from service.model_client import TritonModel

    async def ask():
        model = TritonModel("127.0.0.1:9", "onerec", 1.0, 16, 4, CircuitBreaker(3, 1.0))
        await model.client.close()
        model.client = _ConfigClient({"model_version": "3", "catalog_hash": "c3", "catalog_hash_3": "c3", **params},
                                     ready)
        return await model.served()

    served = asyncio.run(ask())
    assert (served.version, served.catalog_hash, served.bans_in_beam) == ("3", "c3", True)
    assert (served.canary_version, served.canary_share) == (canary, share)
    assert served.canary_catalog_hash == ("c4" if canary else "")
