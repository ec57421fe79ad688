"""The chaos harness's locustfile: loadtest/locustfile.py's users, each /events attempt also written (with whether it
was acknowledged) to OUT/events-<pid>.jsonl, one file per locust process, so the harness can look for every
acknowledged event in Redis afterwards."""

from __future__ import annotations

import json
import os
from typing import Any

import loadtest.locustfile as base
from loadtest.chaos_events import EVENTS_PREFIX
from loadtest.checks import events_problem


class ChaosShape(base.StepLoadShape):
    """The same step schedule as the plain load test."""


class ChaosUser(base.GatewayUser):
    """A GatewayUser whose /events attempts are logged, acknowledged (200 and the right `stored`) or not."""

    def post_events(self) -> None:
        state = base.STATE
        assert state.users is not None and state.videos is not None
        videos = state.videos.sample_many(int(state.rng.integers(1, 4)))
        body = {"user_id": state.users.sample(), "video_ids": videos}
        with self.client.post("/events", json=body, name="/events", catch_response=True) as response:
            problem = base.no_answer(response) or events_problem(response.status_code, base.parsed(response),
                                                                 len(videos))
            self.settle(response, problem)
        write_attempt(body["user_id"], [int(v) for v in videos], problem is None)


_FILE: Any = None


def write_attempt(user_id: str, videos: list[int], acked: bool) -> None:
    """Append one attempt to this process's events file (flushed at once: a killed locust keeps what it wrote)."""
    global _FILE
    if base.STATE.out_dir is None:
        return
    if _FILE is None:
        base.STATE.out_dir.mkdir(parents=True, exist_ok=True)
        _FILE = (base.STATE.out_dir / f"{EVENTS_PREFIX}{os.getpid()}.jsonl").open("a", buffering=1)
    _FILE.write(json.dumps({"user_id": user_id, "video_ids": videos, "acked": acked}) + "\n")
