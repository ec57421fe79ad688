"""The report files: summary.json and summary.md with the required keys, latency.png a PNG, locust's CSV read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.report import bin_edges, bin_width, latency_series, read_locust_stats, summary_markdown
from loadtest.run import LoadTestError, Mix, Target, locust_command, parse_args, target_from_run, write_report
from loadtest.stats import Record, run_stats, write_records
from loadtest.steps import parse_steps

STEPS = parse_steps("1x4,2x4")
RECORDS = [Record(t / 2, 0 if t < 8 else 1, "/recommend" if t % 3 else "/events", 10.0 + t, t != 13,
                  "cold_start" if t == 5 else "") for t in range(16)]
LOCUST_STATS = """Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,\
Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%
POST,/events,6,0,16,16.5,10,25,70.0,0.75,0.0,16,19,22,22,25,25,25,25,25,25,25
POST,/recommend,10,1,18,18.1,11,24,254.6,1.25,0.125,18,20,21,22,23,24,24,24,24,24,24
,Aggregated,16,1,17,17.5,10,25,185.5,2.0,0.125,17,20,21,22,23,24,25,25,25,25,25
"""


def fake_run_dir(tmp_path: Path) -> Path:
    """What locust leaves in OUT: steps.json, records.csv and locust_stats.csv."""
    stats = run_stats(RECORDS, STEPS, warmup_s=1.0, duration_s=8.0)
    stats.update({"schedule": "1x4@1,2x4@2", "started_at_unix": 0.0, "outside_schedule": 0, "user_errors": 0})
    (tmp_path / "steps.json").write_text(json.dumps(stats))
    write_records(tmp_path / "records.csv", RECORDS)
    (tmp_path / "locust_stats.csv").write_text(LOCUST_STATS)
    return tmp_path


def test_write_report_files_and_keys(tmp_path):
    summary = write_report(fake_run_dir(tmp_path), {"url": "http://x", "started_at": "2026-01-01T00:00:00+00:00"})
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("total", "endpoints", "steps", "low_load_p50_ms", "max_qps_p99_under_2x_low_p50", "fallbacks",
                "warmup_s", "locust_csv"):
        assert key in on_disk, key
    for stats in (on_disk["total"], *on_disk["endpoints"].values()):
        assert {"qps", "p50_ms", "p95_ms", "p99_ms", "requests", "failures"} <= set(stats)
    assert set(on_disk["endpoints"]) == {"/recommend", "/events"}
    assert on_disk["total"]["requests"] == 16 and on_disk["total"]["failures"] == 1 and on_disk["total"]["qps"] == 2.0
    step_keys = {"users", "requests", "qps", "p50_ms", "p95_ms", "p99_ms", "failures", "endpoints"}
    assert step_keys <= set(on_disk["steps"][0])
    assert on_disk["fallbacks"]["by_reason"] == {"cold_start": 1}
    assert on_disk["locust_csv"]["Aggregated"]["requests"] == 16
    markdown = (tmp_path / "summary.md").read_text()
    for text in ("| `/recommend` |", "| `/events` |", "| **total** |", "p99", "Warm-up", "cold_start 1"):
        assert text in markdown, text
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_without_steps_json_says_so(tmp_path):
    with pytest.raises(LoadTestError, match="steps.json"):
        write_report(tmp_path, {})


def test_read_locust_stats(tmp_path):
    (tmp_path / "s.csv").write_text(LOCUST_STATS)
    stats = read_locust_stats(tmp_path / "s.csv")
    assert stats["/recommend"] == {"requests": 10, "failures": 1, "rps": 1.25, "p50_ms": 18, "p95_ms": 24,
                                   "p99_ms": 24}
    assert read_locust_stats(tmp_path / "missing.csv") == {}


def test_latency_series_bins_by_start():
    records = [Record(0.1, 0, "/x", 10.0, True), Record(0.9, 0, "/x", 30.0, False), Record(2.5, 0, "/x", 5.0, True),
               Record(3.2, 0, "/x", 7.0, True)]
    centres, series, failures = latency_series(records, [0.0, 1.0, 2.0, 3.0])
    assert centres == [0.5, 1.5, 2.5]
    assert series[50] == [10.0, None, 5.0] and series[99] == [30.0, None, 7.0]  # 3.2 s lands in the last bin
    assert failures == [1, 0, 0]


def test_bins_never_straddle_steps():
    assert bin_edges([0.0, 10.0, 15.0], 4.0) == [0.0, 5.0, 10.0, 15.0]  # 10/4 -> 2 bins, 5/4 -> 1 bin
    assert bin_edges([0.0, 3.0], 1.0) == [0.0, 1.0, 2.0, 3.0]
    assert bin_width(requests=1000, duration_s=100.0, shortest_step_s=30.0) == 5.0  # ~50 requests a bin
    assert bin_width(requests=10, duration_s=100.0, shortest_step_s=30.0) == 15.0  # at most half a step
    assert bin_width(requests=100_000, duration_s=100.0, shortest_step_s=30.0) == 1.0
    assert bin_width(requests=0, duration_s=0.0, shortest_step_s=1.0) == 1.0


def test_target_from_run_reads_stack_json(tmp_path):
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "stack.json").write_text(json.dumps(
        {"gateway_url": "http://127.0.0.1:8080", "redis_url": "redis://x", "users_file": "u.txt",
         "videos_file": "v.txt"}))
    assert target_from_run(tmp_path) == Target("http://127.0.0.1:8080", Path("u.txt"), Path("v.txt"))
    with pytest.raises(LoadTestError, match="stack.json"):
        target_from_run(tmp_path / "nothing")


def test_locust_command_is_headless_and_bounded_by_the_shape(tmp_path):
    command = locust_command(Target("http://h:1", Path("u"), Path("v")), tmp_path, STEPS, Mix())
    for flag in ("--headless", "--csv-full-history", "--only-summary"):
        assert flag in command
    assert command[command.index("--steps") + 1] == "1x4@1,2x4@2"
    assert command[command.index("--html") + 1] == str(tmp_path / "report.html")


def test_cli_needs_a_target(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--url", "http://x"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        parse_args(["--run", "r", "--steps", "1y3"])
    assert parse_args(["--run", "r"]).steps == "1x30,2x30,4x30,8x30,16x30"


def test_markdown_names_the_selection_or_its_absence(tmp_path):
    summary = write_report(fake_run_dir(tmp_path), {})
    summary["low_load_p50_ms"] = 100.0
    summary["max_qps_p99_under_2x_low_p50"] = {"qps": 12.5, "users": 4, "p50_ms": 120.0, "p99_ms": 190.0, "step": 2,
                                               "p99_limit_ms": 200.0, "endpoint": "/recommend", "endpoint_qps": 10.0}
    assert "12.50 QPS** (all requests; 10.00 of them `/recommend`) at 4 users" in summary_markdown(summary)
    summary["max_qps_p99_under_2x_low_p50"] = None
    assert "**no step** kept its p99 under 2x that (200.0 ms)" in summary_markdown(summary)
