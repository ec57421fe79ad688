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
