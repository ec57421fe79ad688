"""Response assertions: what makes a gateway answer a failure in the load test (pure functions, no locust)."""

from __future__ import annotations

from typing import Any

SESSION_ITEMS = 5  # the API contract: every /recommend answer holds exactly 5 distinct videos


def status_problem(status: int, body: Any) -> str | None:
    """A non-200 answer, named by status and the error body's stable `code` (stable text groups failures)."""
    if status == 200:
        return None
    code = body.get("code") if isinstance(body, dict) else None
    return f"HTTP {status}" + (f" {code}" if code else "")


def recommend_problem(status: int, body: Any) -> str | None:
    """None for a good /recommend answer: 200 and exactly 5 distinct integer video ids; else why not."""
    problem = status_problem(status, body)
    if problem is not None:
        return problem
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        return "no items list"
    videos = [item.get("video_id") if isinstance(item, dict) else None for item in body["items"]]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in videos):
        return "an item without an integer video_id"
    if len(videos) != SESSION_ITEMS:
        return f"{len(videos)} items, not {SESSION_ITEMS}"
    if len(set(videos)) != SESSION_ITEMS:
        return "repeated video ids"
    if body.get("source") not in ("model", "popular"):
        return f"unknown source {body.get('source')!r}"
    return None


def fallback_reason(body: Any) -> str | None:
    """Why popular items were served (`fallback_reason`, or "unspecified"), None for a model answer."""
    if not isinstance(body, dict) or body.get("source") != "popular":
        return None
    return str(body.get("fallback_reason") or "unspecified")


def events_problem(status: int, body: Any, sent: int) -> str | None:
    """None for a good /events answer: 200, `stored` equal to the videos sent, and a history length."""
    problem = status_problem(status, body)
    if problem is not None:
        return problem
    if not isinstance(body, dict) or body.get("stored") != sent:
        return "stored count differs from the videos sent"
    if not isinstance(body.get("history_length"), int) or body["history_length"] < 1:
        return "no history_length"
    return None
