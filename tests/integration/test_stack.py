"""The local stack end to end: `onerec up` (real redis-server, tritonserver, gateway), a real Prometheus scraping it,
a bounded locust load, every dashboard query evaluated against the scrapes, then `onerec down`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.run import run_loadtest
from stack.probes import free_ports, pid_alive, port_free
from stack.prometheus import (
    PrometheusServer,
    dashboard_queries,
    grafana_to_promql,
    local_config,
    prometheus_binary,
)
from tests.tools import require_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCRAPE_S = 1.0
RATE_WINDOW = "30s"  # what Grafana's $__rate_interval becomes here (several 1 s scrapes, the whole short load)


def onerec(*args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


class LocalStack:
    """`onerec up` on free ports, with its own state directory and model repository."""

    def __init__(self, run: Path, work: Path) -> None:
        self.run, self.work = run, work
        gateway, redis_port, http, grpc, metrics = free_ports(5)
        self.flags = ["--run", run, "--state-dir", work / "state"]
        self.up_flags = [*self.flags, "--model-repo", work / "model_repo", "--gateway-port", gateway,
                         "--redis-port", redis_port, "--triton-http-port", http, "--triton-grpc-port", grpc,
                         "--triton-metrics-port", metrics, "--beam-width", 16, "--timeout", 240]
        self.ports = [gateway, redis_port, http, grpc, metrics]
        self.state: dict = {}

    def up(self) -> dict:
        done = onerec("up", *self.up_flags, "--json")
        assert done.returncode == 0, f"onerec up failed:\n{done.stdout}\n{done.stderr[-4000:]}"
        self.state = json.loads(done.stdout)
        return self.state

    def down(self) -> subprocess.CompletedProcess:
        return onerec("down", *self.flags, timeout=180)


@pytest.fixture(scope="module")
def stack(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory):
    s = LocalStack(tiny_run, tmp_path_factory.mktemp("local-stack"))
    s.up()
    yield s
    s.down()


@pytest.fixture(scope="module")
def prometheus(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory):
    gateway = stack.state["gateway_url"].removeprefix("http://")
    triton = stack.state["triton_metrics_url"].removeprefix("http://").removesuffix("/metrics")
    require_tool(prometheus_binary)
    config = local_config({"gateway": gateway, "triton": triton}, SCRAPE_S)
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), free_ports(1)[0], config)
    server.start()
    yield server
    server.stop()


def test_up_exports_serves_and_is_idempotent(stack: LocalStack):
    state = stack.state
    assert (Path(state["model_repo"]) / "onerec" / "1" / "manifest.json").is_file()  # exported by `up`
    assert all(pid_alive(pid) for pid in state["pids"].values())
    state_dir = stack.work / "state"
    assert {name: int((state_dir / f"{name}.pid").read_text()) for name in state["pids"]} == state["pids"]
    users = Path(state["users_file"]).read_text().split()
    videos = Path(state["videos_file"]).read_text().split()
    assert len(users) > 100 and len(videos) > 100
    answers = _recommend_json(stack)
    assert len(answers) == 3
    for answer in answers:
        items = [item["video_id"] for item in answer["answer"]["items"]]
        assert answer["status"] == 200 and answer["answer"]["source"] == "model"
        assert len(set(items)) == 5 and set(items) <= {int(v) for v in videos}
    again = stack.up()  # already running: same processes, no second export
    assert again["pids"] == state["pids"]
    assert not (Path(state["model_repo"]) / "onerec" / "2").exists()


def _recommend_json(stack: LocalStack) -> list[dict]:
    done = onerec("recommend", *stack.flags, "--count", 3, "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_every_dashboard_query_returns_data_under_load(stack: LocalStack, prometheus: PrometheusServer,
                                                       tmp_path: Path):
    prometheus.wait_for_targets_up(timeout=30)
    state = stack.state
    summary = run_loadtest(state["gateway_url"], Path(state["users_file"]), Path(state["videos_file"]),
                           tmp_path / "loadtest", "1x8,2x8", timeout_s=90)
    assert summary["total"]["requests"] > 0
    assert summary["total"]["failures"] == 0, summary  # every answer had 5 distinct videos
    for name in ("summary.json", "summary.md", "latency.png", "report.html", "locust_stats.csv"):
        assert (tmp_path / "loadtest" / name).is_file(), name
    prometheus.wait_for_data('onerec_gateway_unique_items_served{window="1h"} > 5', timeout=30)
    time.sleep(2 * SCRAPE_S)  # the last requests scraped
    queries = dashboard_queries()
    assert len({q.dashboard_uid for q in queries}) == 3 and len(queries) >= 15
    empty = []
    for q in queries:
        result = prometheus.query(grafana_to_promql(q.expr, rate_interval=RATE_WINDOW))
        values = [float(sample["value"][1]) for sample in result]  # instant vectors: [{"metric", "value": [t, v]}]
        if not any(math.isfinite(v) for v in values):  # no series, or only NaN (a ratio of zero rates)
            empty.append(f"{q.dashboard_uid} / {q.panel_title} / {q.ref_id}: {q.expr} -> {values}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_deploy_status_rollback_find_the_stack_from_the_run(stack: LocalStack):
    """`--run RUN --state-dir` is enough: the repository, Triton and the gateway come from stack.json."""
    done = onerec("deploy", *stack.flags, "--json")
    assert done.returncode == 0, done.stderr
    deployed = json.loads(done.stdout)
    assert (deployed["version"], deployed["primary"], deployed["weights_shared"]) == (2, 2, True)
    assert deployed["gateway_follows"] is True and deployed["model_repo"] == stack.state["model_repo"]
    assert {a["answer"]["model_version"] for a in _recommend_json(stack)} == {"2"}
    done = onerec("status", *stack.flags)
    assert done.returncode == 0, done.stderr
    assert "serving   primary 2" in done.stdout and "(weights shared)" in done.stdout
    assert "1 READY" in done.stdout and "2 READY" in done.stdout
    done = onerec("rollback", *stack.flags, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["primary"] == 1 and json.loads(done.stdout)["gateway_follows"] is True
    assert {a["answer"]["model_version"] for a in _recommend_json(stack)} == {"1"}


def test_down_stops_every_process(stack: LocalStack):
    pids = stack.state["pids"]
    done = stack.down()
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) >= {"gateway", "triton", "redis"}
    assert not any(pid_alive(pid) for pid in pids.values())
    assert all(port_free("127.0.0.1", port) for port in stack.ports)
    assert stack.down().stdout.strip() == "nothing running"
    assert not list((stack.work / "state").glob("*.pid")) and not (stack.work / "state" / "stack.json").exists()
