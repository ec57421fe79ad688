"""The locustfile: FastHttpUser sending /recommend and /events for Zipf-drawn users, a step LoadTestShape, and an
exact per-request record written at the end (`steps.json`, `records.csv` in --out-dir).

Run through `python -m loadtest.run`, or by hand from the repository root (the `loadtest` package importable):
    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8080 \
        --users-file users.txt --videos-file videos.txt --steps 1x10,2x10 --out-dir /tmp/lt
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from locust import FastHttpUser, LoadTestShape, events, task
from locust.env import Environment

from loadtest.checks import events_problem, fallback_reason, recommend_problem
from loadtest.stats import SLO_ENDPOINT, Record, run_stats, write_records
from loadtest.steps import DEFAULT_STEPS, Step, StepTicker, format_steps, parse_steps, step_index_at, total_duration
from loadtest.zipf import DEFAULT_EXPONENT, ZipfSampler, shuffled

log = logging.getLogger("loadtest")
STEPS_JSON = "steps.json"
RECORDS_CSV = "records.csv"
NO_ANSWER_BACKOFF_S = 0.1


@dataclass
class LoadState:
    """What the users share in this locust process: the samplers, the schedule and every request's record."""

    users: ZipfSampler[str] | None = None
    videos: ZipfSampler[int] | None = None
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    steps: list[Step] = field(default_factory=list)
    recommend_share: float = 0.8
    wait_max_s: float = 0.0
    warmup_s: float = 3.0
    slo_endpoint: str | None = SLO_ENDPOINT
    out_dir: Path | None = None
    started_at: float | None = None  # time.time() when the shape started
    records: list[Record] = field(default_factory=list)
    user_errors: int = 0
    written: bool = False


STATE = LoadState()


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("loadtest", "the OneRec gateway load test (loadtest/locustfile.py)")
    group.add_argument("--steps", env_var="LOADTEST_STEPS", default=DEFAULT_STEPS,
                       help="USERSxSECONDS[@SPAWN_RATE],... (default %(default)s)")
    group.add_argument("--users-file", env_var="LOADTEST_USERS_FILE", default="",
                       help="loaded user ids, one a line")
    group.add_argument("--videos-file", env_var="LOADTEST_VIDEOS_FILE", default="",
                       help="catalog video ids, most popular first, one a line")
    group.add_argument("--zipf-s", env_var="LOADTEST_ZIPF_S", type=float, default=DEFAULT_EXPONENT,
                       help="Zipf exponent over user and video ranks")
    group.add_argument("--seed", env_var="LOADTEST_SEED", type=int, default=0, help="fixes the user ranking")
    group.add_argument("--recommend-weight", env_var="LOADTEST_RECOMMEND_WEIGHT", type=float, default=4.0)
    group.add_argument("--events-weight", env_var="LOADTEST_EVENTS_WEIGHT", type=float, default=1.0)
    group.add_argument("--wait-max-s", env_var="LOADTEST_WAIT_MAX_S", type=float, default=0.0,
                       help="think time between a user's requests, uniform in [0, this]")
    group.add_argument("--warmup-s", env_var="LOADTEST_WARMUP_S", type=float, default=3.0,
                       help="seconds left out at the start of every step in steps.json")
    group.add_argument("--slo-endpoint", env_var="LOADTEST_SLO_ENDPOINT", default=SLO_ENDPOINT,
                       help="whose p50/p99 the max-QPS criterion reads ('total': all requests)")
    group.add_argument("--out-dir", env_var="LOADTEST_OUT_DIR", default="",
                       help="where steps.json and records.csv go (nothing written when empty)")


def read_lines(path: str, what: str) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    ids = [line for line in lines if line]
    if not ids:
        raise ValueError(f"{what} {path} holds no ids")
    return ids


@events.init.add_listener
def configure(environment: Environment, **_: Any) -> None:
    """Load the users and videos and the schedule from the options; exit with a one-line message if they're bad."""
    options = environment.parsed_options
    if options is None:  # a library user built the Environment by hand: the state is theirs to set
        return
    try:
        if not options.users_file or not options.videos_file:
            raise ValueError("--users-file and --videos-file are required")
        users = shuffled(read_lines(options.users_file, "users file"), options.seed)
        videos = [int(v) for v in read_lines(options.videos_file, "videos file")]
        STATE.steps = parse_steps(options.steps)
        total_weight = options.recommend_weight + options.events_weight
        if options.recommend_weight < 0 or options.events_weight < 0 or total_weight <= 0:
            raise ValueError("--recommend-weight and --events-weight must be >= 0, not both 0")
    except (OSError, ValueError) as e:
        sys.exit(f"loadtest: {e}")
    STATE.users = ZipfSampler(users, options.zipf_s, options.seed)
    STATE.videos = ZipfSampler(videos, options.zipf_s, options.seed + 1)
    STATE.rng = np.random.default_rng(options.seed + 2)
    STATE.recommend_share = options.recommend_weight / total_weight
    STATE.wait_max_s, STATE.warmup_s = options.wait_max_s, options.warmup_s
    STATE.slo_endpoint = None if options.slo_endpoint == "total" else options.slo_endpoint
    STATE.out_dir = Path(options.out_dir) if options.out_dir else None
    log.info("loadtest: %d users, %d videos, steps %s, zipf s=%g, recommend share %.2f, warm-up %gs",
             len(users), len(videos), format_steps(STATE.steps), options.zipf_s, STATE.recommend_share,
             STATE.warmup_s)


class StepLoadShape(StepTicker, LoadTestShape):
    """The steps of --steps / LOADTEST_STEPS, one after the other; the test ends after the last."""

    def current_steps(self) -> Sequence[Step]:
        return STATE.steps

    def reset_time(self) -> None:
        super().reset_time()
        STATE.started_at = time.time()


class GatewayUser(FastHttpUser):
    """One client: no think time by default (a closed loop), /recommend or /events by the configured weights."""

    network_timeout = 30.0
    connection_timeout = 10.0
    backoff_s = 0.0  # set after a request got no answer at all, so a dead gateway is not hammered in a busy loop

    def wait_time(self) -> float:
        pause, self.backoff_s = self.backoff_s, 0.0
        return pause + float(STATE.rng.random()) * STATE.wait_max_s

    @task
    def one_request(self) -> None:
        if STATE.rng.random() < STATE.recommend_share:
            self.recommend()
        else:
            self.post_events()

    def recommend(self) -> None:
        assert STATE.users is not None
        body = {"user_id": STATE.users.sample()}
        with self.client.post("/recommend", json=body, name="/recommend", catch_response=True) as response:
            answer = parsed(response)
            problem = no_answer(response) or recommend_problem(response.status_code, answer)
            if problem is None:
                response.request_meta["context"]["fallback"] = fallback_reason(answer) or ""
                response.request_meta["context"]["model_version"] = str(answer.get("model_version") or "")
            self.settle(response, problem)

    def post_events(self) -> None:
        assert STATE.users is not None and STATE.videos is not None
        videos = STATE.videos.sample_many(int(STATE.rng.integers(1, 4)))
        body = {"user_id": STATE.users.sample(), "video_ids": videos}
        with self.client.post("/events", json=body, name="/events", catch_response=True) as response:
            problem = no_answer(response) or events_problem(response.status_code, parsed(response), len(videos))
            self.settle(response, problem)

    def settle(self, response: Any, problem: str | None) -> None:
        """Mark the request a success or a failure (why); pause a little after no answer at all."""
        if problem is None:
            response.success()
            return
        if not response.status_code:
            self.backoff_s = NO_ANSWER_BACKOFF_S
        response.failure(problem)


def no_answer(response: Any) -> str | None:
    """Why no HTTP answer came (refused, reset, timed out), None when one did."""
    if response.status_code:
        return None
    error = response.request_meta.get("exception")
    return f"no answer: {type(error).__name__ if error else 'unknown error'}"


def parsed(response: Any) -> Any:
    """The JSON body, or None when there is none or it does not parse."""
    try:
        return response.json()
    except Exception:  # any unreadable body is just "no body"
        return None


@events.request.add_listener
def record(name: str, response_time: float, exception: BaseException | None = None, start_time: float | None = None,
           context: dict[str, Any] | None = None, **_: Any) -> None:
    """Every finished request, tagged with the step running when it started."""
    if STATE.started_at is None:
        return
    started = start_time if start_time is not None else time.time() - response_time / 1000
    offset = started - STATE.started_at
    step = step_index_at(STATE.steps, offset)
    context = context or {}
    STATE.records.append(Record(offset, -1 if step is None else step, name, float(response_time), exception is None,
                                str(context.get("fallback") or ""), str(context.get("model_version") or "")))


@events.user_error.add_listener
def count_user_error(**_: Any) -> None:
    STATE.user_errors += 1


@events.test_stop.add_listener
def write_results(environment: Environment, **_: Any) -> None:
    """steps.json (exact statistics per step and endpoint) and records.csv in --out-dir, once."""
    if STATE.written or STATE.out_dir is None or STATE.started_at is None:
        return
    STATE.written = True
    elapsed = min(time.time() - STATE.started_at, total_duration(STATE.steps))
    result = run_stats(STATE.records, STATE.steps, STATE.warmup_s, elapsed, STATE.slo_endpoint)
    result.update({"schedule": format_steps(STATE.steps), "started_at_unix": STATE.started_at,
                   "outside_schedule": sum(r.step < 0 for r in STATE.records), "user_errors": STATE.user_errors})
    STATE.out_dir.mkdir(parents=True, exist_ok=True)
    (STATE.out_dir / STEPS_JSON).write_text(json.dumps(result, indent=2) + "\n")
    write_records(STATE.out_dir / RECORDS_CSV, STATE.records)
    log.info("loadtest: %d requests, %d failed; wrote %s", result["total"]["requests"], result["total"]["failures"],
             STATE.out_dir / STEPS_JSON)
