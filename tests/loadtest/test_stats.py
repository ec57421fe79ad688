"""The exact statistics: percentiles, per-step numbers with the warm-up left out, and the max-QPS selection."""

from __future__ import annotations

import pytest

from loadtest.stats import (
    Record,
    group_stats,
    low_load_p50,
    max_qps_under,
    percentile,
    read_records,
    run_stats,
    write_records,
)
from loadtest.steps import Step


def test_percentile_is_nearest_rank():
    values = [50.0, 10.0, 40.0, 20.0, 30.0]
    assert percentile(values, 50) == 30.0  # ceil(2.5) = 3rd smallest
    assert percentile(values, 95) == 50.0  # ceil(4.75) = 5th
    assert percentile(values, 20) == 10.0  # ceil(1.0) = 1st
    assert percentile(list(range(1, 101)), 99) == 99.0
    assert percentile([], 50) is None


def rec(start_s: float, step: int, name: str, latency_ms: float, ok: bool = True, fallback: str = "") -> Record:
    return Record(start_s, step, name, latency_ms, ok, fallback)


# Two 4-second steps, 1 s warm-up. Step 0 (1 user): 1 warm-up request, 6 measured. Step 1 (2 users): 1 warm-up
# failure, 6 measured of which 1 failed.
RECORDS = [
    rec(0.2, 0, "/recommend", 100.0),  # warm-up
    rec(1.0, 0, "/recommend", 10.0),
    rec(1.5, 0, "/recommend", 20.0),
    rec(2.0, 0, "/events", 5.0),
    rec(2.5, 0, "/recommend", 30.0, fallback="cold_start"),
    rec(3.0, 0, "/recommend", 40.0),
    rec(3.5, 0, "/events", 6.0),
    rec(4.5, 1, "/recommend", 500.0, ok=False),  # warm-up failure
    rec(5.0, 1, "/recommend", 12.0),
    rec(5.5, 1, "/recommend", 14.0),
    rec(6.0, 1, "/recommend", 16.0, ok=False),
    rec(6.5, 1, "/events", 4.0),
    rec(7.0, 1, "/recommend", 18.0),
    rec(7.5, 1, "/recommend", 30.0, fallback="triton_overloaded"),
]
STEPS = [Step(1, 4.0, 1.0), Step(2, 4.0, 2.0)]


def test_group_stats_hand_worked():
    stats = group_stats([rec(0, 0, "/x", v, ok=v != 40.0) for v in (10.0, 20.0, 30.0, 40.0)], seconds=2.0)
    assert stats == {"requests": 4, "failures": 1, "qps": 2.0, "p50_ms": 20.0, "p95_ms": 40.0, "p99_ms": 40.0}


def test_run_stats_steps_leave_out_the_warm_up():
    stats = run_stats(RECORDS, STEPS, warmup_s=1.0, duration_s=8.0)
    first, second = stats["steps"]
    assert first["requests"] == 6 and first["warmup_requests"] == 1 and first["measured_s"] == 3.0
    assert first["qps"] == 2.0  # 6 requests / 3 s
    # latencies 5, 6, 10, 20, 30, 40: p50 = 3rd = 10, p95 = p99 = 6th = 40
    assert (first["p50_ms"], first["p95_ms"], first["p99_ms"]) == (10.0, 40.0, 40.0)
    assert first["failures"] == 0 and first["fallbacks"] == {"cold_start": 1}
    assert first["endpoints"]["/events"] == {"requests": 2, "failures": 0, "qps": round(2 / 3, 3), "p50_ms": 5.0,
                                             "p95_ms": 6.0, "p99_ms": 6.0}
    assert first["endpoints"]["/recommend"]["p50_ms"] == 20.0  # 10, 20, 30, 40 -> 2nd
    assert second["requests"] == 6 and second["failures"] == 1
    assert second["warmup_requests"] == 1 and second["warmup_failures"] == 1
    assert (second["start_s"], second["end_s"], second["users"]) == (4.0, 8.0, 2)
    # latencies 4, 12, 14, 16, 18, 30: p50 = 14, p99 = 30
    assert (second["p50_ms"], second["p99_ms"]) == (14.0, 30.0)


def test_run_stats_totals_cover_the_whole_run():
    stats = run_stats(RECORDS, STEPS, warmup_s=1.0, duration_s=8.0)
    assert stats["total"]["requests"] == 14 and stats["total"]["failures"] == 2
    assert stats["total"]["qps"] == 1.75  # 14 / 8 s
    assert stats["endpoints"]["/events"]["requests"] == 3
    assert stats["endpoints"]["/recommend"]["requests"] == 11 and stats["endpoints"]["/recommend"]["failures"] == 2
    # recommend latencies sorted: 10 12 14 16 18 20 30 30 40 100 500: p50 = 6th = 20, p99 = 11th = 500
    assert stats["endpoints"]["/recommend"]["p50_ms"] == 20.0 and stats["endpoints"]["/recommend"]["p99_ms"] == 500.0
    assert stats["fallbacks"] == {"total": 2, "by_reason": {"cold_start": 1, "triton_overloaded": 1},
                                  "share_of_recommend": round(2 / 11, 4)}
    # the criterion reads /recommend: step 0's measured recommend latencies 10, 20, 30, 40 -> p50 = 20 (2nd);
    # its p99 40 is not under 2 x 20, and step 1 failed requests -> no step qualifies
    assert stats["slo_endpoint"] == "/recommend" and stats["low_load_p50_ms"] == 20.0
    assert stats["max_qps_p99_under_2x_low_p50"] is None
    over_all = run_stats(RECORDS, STEPS, warmup_s=1.0, duration_s=8.0, slo_endpoint=None)
    assert over_all["slo_endpoint"] == "total" and over_all["low_load_p50_ms"] == 10.0


def test_warm_up_never_takes_more_than_half_a_step():
    stats = run_stats(RECORDS, STEPS, warmup_s=10.0, duration_s=8.0)
    assert [s["warmup_s"] for s in stats["steps"]] == [2.0, 2.0]
    assert stats["steps"][0]["requests"] == 4  # started at 2.0, 2.5, 3.0, 3.5


def step(index: int, users: int, qps: float, p50: float | None, p99: float | None, failures: int = 0,
         requests: int = 100, warmup_failures: int = 0, endpoints: dict | None = None,
         fallbacks: dict | None = None) -> dict:
    return {"step": index, "users": users, "qps": qps, "p50_ms": p50, "p99_ms": p99, "failures": failures,
            "requests": requests, "warmup_failures": warmup_failures, "endpoints": endpoints or {},
            "fallbacks": fallbacks or {}}


def test_max_qps_picks_the_fastest_step_under_the_limit():
    steps = [step(0, 1, 10.0, 50.0, 70.0), step(1, 2, 19.0, 52.0, 90.0), step(2, 4, 30.0, 80.0, 99.9),
             step(3, 8, 31.0, 150.0, 300.0)]
    assert low_load_p50(steps) == 50.0
    assert max_qps_under(steps, 50.0) == {"qps": 30.0, "users": 4, "p50_ms": 80.0, "p99_ms": 99.9, "step": 2,
                                          "p99_limit_ms": 100.0, "endpoint": "total", "endpoint_qps": 30.0}


def test_max_qps_limit_is_strict_and_failures_disqualify():
    steps = [step(0, 1, 10.0, 50.0, 70.0), step(1, 2, 19.0, 52.0, 100.0), step(2, 4, 30.0, 60.0, 80.0, failures=1),
             step(3, 8, 40.0, 60.0, 80.0, warmup_failures=1)]
    assert max_qps_under(steps, 50.0)["users"] == 1  # p99 == limit is not under it; a failed step never counts


def test_max_qps_ignores_steps_where_the_gateway_shed_load():
    """Fast popular answers after Triton timeouts are not capacity; cold-start answers are the right answer."""
    steps = [step(0, 1, 10.0, 50.0, 70.0, fallbacks={"cold_start": 3}),
             step(1, 16, 80.0, 5.0, 60.0, fallbacks={"circuit_open": 50, "triton_timeout": 2})]
    assert max_qps_under(steps, 50.0)["users"] == 1


def test_max_qps_none_when_nothing_qualifies():
    steps = [step(0, 1, 10.0, 50.0, 120.0), step(1, 2, 19.0, 52.0, 130.0)]
    assert max_qps_under(steps, 50.0) is None
    assert max_qps_under(steps, None) is None
    assert low_load_p50([step(0, 1, 0.0, None, None, requests=0)]) is None


def test_max_qps_reads_one_endpoints_latencies():
    def rec_stats(qps: float, p50: float, p99: float) -> dict:
        return {"/recommend": {"requests": 10, "qps": qps, "p50_ms": p50, "p99_ms": p99}}

    # over all requests the cheap /events pull the p50 down (5 ms); /recommend's own p50 is 100 ms
    steps = [step(0, 1, 12.0, 5.0, 150.0, endpoints=rec_stats(10.0, 100.0, 150.0)),
             step(1, 2, 22.0, 6.0, 190.0, endpoints=rec_stats(18.0, 110.0, 190.0)),
             step(2, 4, 25.0, 7.0, 400.0, endpoints=rec_stats(20.0, 200.0, 400.0))]
    assert low_load_p50(steps, "/recommend") == 100.0 and low_load_p50(steps) == 5.0
    assert max_qps_under(steps, 5.0) is None
    assert max_qps_under(steps, 100.0, endpoint="/recommend") == {
        "qps": 22.0, "users": 2, "p50_ms": 110.0, "p99_ms": 190.0, "step": 1, "p99_limit_ms": 200.0,
        "endpoint": "/recommend", "endpoint_qps": 18.0}
    assert max_qps_under(steps, 100.0, endpoint="/missing") is None


def test_low_load_is_the_step_with_fewest_users():
    steps = [step(0, 4, 30.0, 80.0, 99.0), step(1, 1, 10.0, 50.0, 70.0), step(2, 1, 10.0, 55.0, 70.0)]
    assert low_load_p50(steps) == 50.0


@pytest.mark.parametrize("records", [RECORDS, []])
def test_records_round_trip(tmp_path, records):
    write_records(tmp_path / "records.csv", records)
    back = read_records(tmp_path / "records.csv")
    assert [(r.step, r.name, r.ok, r.fallback) for r in back] == [(r.step, r.name, r.ok, r.fallback) for r in records]
    assert [r.latency_ms for r in back] == pytest.approx([r.latency_ms for r in records])
