"""Acknowledged /events against Redis afterwards: the attempts the chaos load logged, the histories before and after."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EVENTS_PREFIX = "events-"  # OUT/events-<pid>.jsonl: {"user_id", "video_ids", "acked"} a line, in send order
HISTORY_PREFIX = "onerec:history:"  # DESIGN.md §4: onerec:history:{user_id}, most recent first
HISTORY_CAP = 256


def histories(client: Any, users: Sequence[str]) -> dict[str, list[int]]:
    """Every user's history (a redis-py client, standalone or cluster)."""
    return {user: [int(v) for v in client.lrange(f"{HISTORY_PREFIX}{{{user}}}", 0, -1)] for user in users}


def read_attempts(out: Path) -> list[dict[str, Any]]:
    """Every /events attempt the chaos load's processes logged in `out`."""
    attempts = []
    for path in sorted(out.glob(f"{EVENTS_PREFIX}*.jsonl")):
        attempts += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return attempts


def missing_events(before: dict[str, list[int]], after: dict[str, list[int]], attempts: Sequence[dict[str, Any]],
                   cap: int = HISTORY_CAP) -> dict[str, Any]:
    """Every acknowledged event must be in its user's history afterwards. Per user, the history after must hold
    the acknowledged videos on top of what was kept of the history before (the newest `cap - sent` of it, `sent`
    counting every video sent, acknowledged or not, so the check never expects more than LTRIM kept). A user sent
    more than `cap` videos (`over_cap_users`) is checked on its latest events only, those with at most `cap // 2`
    videos sent from them on (concurrent requests may land in another order than they were sent); the older
    acknowledged ones were trimmed by design (`acknowledged_unchecked`)."""
    per_user: dict[str, list[dict[str, Any]]] = {}
    for attempt in attempts:
        per_user.setdefault(attempt["user_id"], []).append(attempt)
    acked = missing = over_cap = unchecked = 0
    examples: list[dict[str, Any]] = []
    for user, sent in per_user.items():
        acked += sum(a["acked"] for a in sent)
        sent_videos = sum(len(a["video_ids"]) for a in sent)
        if sent_videos <= cap:
            checked = sent
            available = Counter(after.get(user, [])) - Counter(before.get(user, [])[:cap - sent_videos])
        else:
            over_cap += 1
            checked, newer = [], 0
            for attempt in reversed(sent):
                newer += len(attempt["video_ids"])
                if newer > cap // 2:
                    break
                checked.append(attempt)
            unchecked += sum(a["acked"] for a in sent) - sum(a["acked"] for a in checked)
            available = Counter(after.get(user, []))
        for attempt in (a for a in checked if a["acked"]):
            need = Counter(attempt["video_ids"])
            if all(available[v] >= n for v, n in need.items()):
                available -= need
            else:
                missing += 1
                if len(examples) < 10:
                    examples.append({"user_id": user, "video_ids": attempt["video_ids"]})
    return {"attempted": len(attempts), "acknowledged": acked, "missing": missing, "over_cap_users": over_cap,
            "acknowledged_unchecked": unchecked, "missing_examples": examples}
