"""Real locust, headless, against a tiny fake gateway on loopback: the files come out, wrong answers are failures."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loadtest.run import Mix, Target, locust_command, run_loadtest, start_locust, stop_group
from loadtest.stats import read_records
from loadtest.steps import parse_steps

pytestmark = pytest.mark.integration
WRONG_ANSWER_AT = 3  # the 3rd /recommend gets a repeated video id
POPULAR_USER = "u2"  # always answered from popular items (cold_start)


class FakeGateway(BaseHTTPRequestHandler):
    """/recommend and /events as the API contract says, one deliberate wrong answer; counts what it sent."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    sent: Counter[str] = Counter()
    lock = threading.Lock()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        data = b'{"status": "ok"}'
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with self.lock:
            self.sent[self.path] += 1
            n = self.sent[self.path]
            if self.path == "/recommend" and body["user_id"] == POPULAR_USER:
                self.sent["popular"] += 1
        if self.path == "/recommend":
            videos = [1, 2, 3, 4, 4] if n == WRONG_ANSWER_AT else [1, 2, 3, 4, 5]
            popular = body["user_id"] == POPULAR_USER
            items = [{"video_id": v, "rank": i + 1} for i, v in enumerate(videos)]
            answer = {"user_id": body["user_id"], "items": items,
                      "source": "popular" if popular else "model", "fallback_reason": "cold_start" if popular else None,
                      "model_version": "1", "request_id": "r"}
        else:
            answer = {"user_id": body["user_id"], "stored": len(body["video_ids"]), "history_length": 3,
                      "request_id": "r"}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_gateway() -> Iterator[str]:
    FakeGateway.sent = Counter()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGateway)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.timeout(60)
def test_locust_headless_run_writes_the_report_and_counts_failures(fake_gateway: str, tmp_path: Path):
    (tmp_path / "users.txt").write_text("u1\nu2\nu3\nu4\n")
    (tmp_path / "videos.txt").write_text("10\n20\n30\n")
    out = tmp_path / "out"
    summary = run_loadtest(fake_gateway, tmp_path / "users.txt", tmp_path / "videos.txt", out, "1x2,2x2",
                           timeout_s=15, mix=Mix(wait_max_s=0.02, warmup_s=0.5))
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv", "report.html", "steps.json",
                 "records.csv", "summary.json", "summary.md", "latency.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "summary.json").read_text())["total"] == summary["total"]
    assert summary["total"]["failures"] == 1 and summary["endpoints"]["/recommend"]["failures"] == 1
    assert summary["endpoints"]["/events"]["failures"] == 0
    assert "repeated video ids" in (out / "locust_failures.csv").read_text()
    sent = FakeGateway.sent
    # every answer locust finished is recorded; at most one in flight per user may be cut off at the end
    answered = sent["/recommend"] + sent["/events"]
    assert answered - 2 <= summary["total"]["requests"] <= answered
    assert summary["fallbacks"]["by_reason"].get("cold_start", 0) >= sent["popular"] - 2 > 0
    assert [s["users"] for s in summary["steps"]] == [1, 2]
    assert all(s["requests"] > 0 for s in summary["steps"])
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<html" in (out / "report.html").read_text()[:2000].lower()


@pytest.mark.timeout(60)
def test_a_stopped_locust_still_writes_every_record(fake_gateway: str, tmp_path: Path):
    """`stop_group` ends a locust run early (the timeout path, a test that has seen enough): it still writes
    records.csv with every answer it finished, each /recommend with the model_version it was answered from."""
    (tmp_path / "users.txt").write_text("u1\nu3\n")
    (tmp_path / "videos.txt").write_text("10\n20\n")
    out = tmp_path / "out"
    out.mkdir()
    command = locust_command(Target(fake_gateway, tmp_path / "users.txt", tmp_path / "videos.txt"), out,
                             parse_steps("1x600"), Mix(wait_max_s=0.02))
    process = start_locust(command, out)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and FakeGateway.sent["/recommend"] < 20:
            time.sleep(0.1)
    finally:
        stop_group(process)
    assert process.returncode == 0, (out / "locust.log").read_text()[-2000:]
    records = read_records(out / "records.csv")
    answered = FakeGateway.sent["/recommend"] + FakeGateway.sent["/events"]
    assert answered - 1 <= len(records) <= answered and answered >= 20
    assert {r.model_version for r in records if r.name == "/recommend" and r.ok} == {"1"}
    assert {r.model_version for r in records if r.name == "/events"} == {""}
