"""Response assertions: exactly 5 distinct video ids, status 200, the events acknowledgement."""

from __future__ import annotations

import pytest

from loadtest.checks import events_problem, fallback_reason, recommend_problem


def answer(videos: list, source: str = "model", reason: str | None = None) -> dict:
    return {"user_id": "1", "items": [{"video_id": v, "rank": i + 1} for i, v in enumerate(videos)],
            "source": source, "fallback_reason": reason, "model_version": "1", "request_id": "r"}


def test_good_recommend_answer():
    assert recommend_problem(200, answer([1, 2, 3, 4, 5])) is None
    assert recommend_problem(200, answer([1, 2, 3, 4, 5], "popular", "cold_start")) is None


@pytest.mark.parametrize(("status", "body", "problem"), [
    (503, {"code": "overloaded"}, "HTTP 503 overloaded"),
    (500, None, "HTTP 500"),
    (200, None, "no items list"),
    (200, answer([1, 2, 3, 4]), "4 items, not 5"),
    (200, answer([1, 2, 3, 4, 5, 6]), "6 items, not 5"),
    (200, answer([1, 2, 3, 4, 4]), "repeated video ids"),
    (200, answer([1, 2, 3, 4, "5"]), "an item without an integer video_id"),
    (200, answer([1, 2, 3, 4, True]), "an item without an integer video_id"),
    (200, answer([1, 2, 3, 4, 5], "cache"), "unknown source 'cache'"),
])
def test_bad_recommend_answers_are_failures(status, body, problem):
    assert recommend_problem(status, body) == problem


def test_fallback_reason_only_for_popular():
    assert fallback_reason(answer([1, 2, 3, 4, 5])) is None
    assert fallback_reason(answer([1, 2, 3, 4, 5], "popular", "redis_unavailable")) == "redis_unavailable"
    assert fallback_reason(answer([1, 2, 3, 4, 5], "popular")) == "unspecified"
    assert fallback_reason(None) is None


def test_events_answers():
    assert events_problem(200, {"stored": 2, "history_length": 9}, sent=2) is None
    assert events_problem(200, {"stored": 1, "history_length": 9}, sent=2) == (
        "stored count differs from the videos sent")
    assert events_problem(200, {"stored": 2}, sent=2) == "no history_length"
    assert events_problem(503, {"code": "redis_unavailable"}, sent=2) == "HTTP 503 redis_unavailable"
