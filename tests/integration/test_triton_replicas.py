"""Two real tritonservers behind one gateway (`onerec up --triton-replicas 2`, real redis-server, the gateway under
uvicorn, a real Prometheus): requests spread over both (measured from each Triton's own metrics), a rollout that
reached one replica only keeps every answer on the version both serve, and a SIGKILLed replica costs no request."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from stack.probes import free_ports, get_json, pid_alive, port_free, post_json
from stack.prometheus import PrometheusServer, dashboard_queries, grafana_to_promql, prometheus_binary
from stack.triton import REPLICA_PORT_STRIDE
from tests.conftest import permuted_catalog_run
from tests.tools import require_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPLICAS = 2
SPREAD_REQUESTS = 80
LOOP_MAX_REQUESTS = 3000  # bounds of every request loop here
LOOP_MAX_S = 120.0
AFTER_KILL_S = 8.0  # how long the loop runs on after the SIGKILL
RECOVER_S = 2.0  # the acceptance bound: every answer from the model again within this long after the kill


def onerec(*args: object, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def replica_port_block(replicas: int) -> int:
    """A first Triton port whose http/grpc/metrics (base, +1, +2) are free for every replica (each 10 further)."""
    for _ in range(50):
        (base,) = free_ports(1)
        wanted = [base + REPLICA_PORT_STRIDE * i + k for i in range(replicas) for k in range(3)]
        if max(wanted) < 65536 and all(port_free("127.0.0.1", port) for port in wanted):
            return base
    raise RuntimeError("no free block of ports for the Triton replicas")


def inferences(metrics_url: str, version: str | None = None) -> float:
    """nv_inference_request_success of model onerec (of one version, or all) on one replica's metrics port."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=5) as response:  # noqa: S310 (loopback)
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(r'nv_inference_request_success\{([^}]*)\} (\S+)', line)
        if match and 'model="onerec"' in match.group(1) and (version is None or f'version="{version}"'
                                                               in match.group(1)):
            total += float(match.group(2))
    return total


class LocalStack:
    def __init__(self, run: Path, repo: Path, work: Path) -> None:
        gateway, redis_port = free_ports(2)
        base = replica_port_block(REPLICAS)
        self.flags = ["--run", run, "--state-dir", work / "state"]
        self.up_flags = [*self.flags, "--model-repo", repo, "--gateway-port", gateway, "--redis-port", redis_port,
                         "--triton-http-port", base, "--triton-grpc-port", base + 1, "--triton-metrics-port",
                         base + 2, "--triton-replicas", REPLICAS, "--beam-width", 16, "--timeout", 240]
        self.state: dict = {}

    def up(self) -> dict:
        done = onerec("up", *self.up_flags, "--json", env={"ONEREC_SYNC_INTERVAL_S": "1"})
        assert done.returncode == 0, f"onerec up failed:\n{done.stdout}\n{done.stderr[-4000:]}"
        self.state = json.loads(done.stdout)
        return self.state

    @property
    def replicas(self) -> list[dict]:
        return self.state["triton_replicas"]

    def users(self) -> list[str]:
        return Path(self.state["users_file"]).read_text().split()

    def recommend(self, user: str) -> tuple[int, dict, float]:
        start = time.monotonic()
        status, body = post_json(self.state["gateway_url"] + "/recommend", {"user_id": user}, timeout=30)
        return status, body, time.monotonic() - start


@pytest.fixture(scope="module")
def stack(tiny_run: Path, exported_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    import shutil

    work = tmp_path_factory.mktemp("replicas")
    repo = work / "model_repo"
    shutil.copytree(exported_repo, repo)  # its own: a test deploys into it
    s = LocalStack(tiny_run, repo, work)
    s.up()
    try:
        yield s
    finally:
        onerec("down", *s.flags, timeout=180)


class Loop:
    """/recommend in a few threads over the loaded users, bounded in count and time; each answer with the time
    it completed and how long it took."""

    def __init__(self, stack: LocalStack, threads: int = 3) -> None:
        self.stack, self.users = stack, stack.users()
        self.answers: list[tuple[float, float, int, dict]] = []  # (completed, seconds, status, body)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.deadline = time.monotonic() + LOOP_MAX_S
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def _run(self, offset: int) -> None:
        k = offset
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            with self.lock:
                if len(self.answers) >= LOOP_MAX_REQUESTS:
                    return
            status, body, seconds = self.stack.recommend(self.users[k % len(self.users)])
            with self.lock:
                self.answers.append((time.monotonic(), seconds, status, body))
            k += 7

    def count(self, since: float = 0.0) -> int:
        with self.lock:
            return sum(1 for done, *_ in self.answers if done > since)

    def wait(self, count: int, since: float = 0.0, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(since) < count:
            assert time.monotonic() < deadline, f"fewer than {count} answers in {timeout}s"
            time.sleep(0.05)

    def __enter__(self) -> Loop:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def test_up_records_every_replica_and_the_gateway_is_ready(stack: LocalStack):
    replicas = stack.replicas
    assert [r["name"] for r in replicas] == ["triton", "triton:1"]
    assert all(pid_alive(stack.state["pids"][r["name"]]) for r in replicas)
    assert len({r["grpc_url"] for r in replicas}) == REPLICAS
    status, ready = get_json(stack.state["gateway_url"] + "/readyz")
    assert status == 200 and ready["model_version"] == "1", ready


def test_requests_spread_over_both_replicas(stack: LocalStack):
    before = [inferences(r["metrics_url"]) for r in stack.replicas]
    users = stack.users()
    results: list[tuple[int, dict, float]] = []

    def ask(offset: int) -> None:
        for k in range(offset, SPREAD_REQUESTS, 2):
            results.append(stack.recommend(users[k % len(users)]))

    threads = [threading.Thread(target=ask, args=(t,)) for t in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == SPREAD_REQUESTS
    assert all(status == 200 and body["source"] == "model" for status, body, _ in results), results[:3]
    deadline = time.monotonic() + 10  # each Triton counts a request once it answered it
    while True:
        served = [inferences(r["metrics_url"]) - b for r, b in zip(stack.replicas, before, strict=True)]
        if sum(served) >= SPREAD_REQUESTS or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sum(served) == SPREAD_REQUESTS, served
    shares = [count / SPREAD_REQUESTS for count in served]
    assert all(0.35 <= share <= 0.65 for share in shares), shares


def test_prometheus_scrapes_every_replica_and_the_dashboard_shows_each(stack: LocalStack,
                                                                        tmp_path_factory: pytest.TempPathFactory):
    """The stack's own prometheus.yml: one triton target per replica; the model dashboard's per-instance panels
    return one series per replica."""
    require_tool(prometheus_binary)
    config = Path(stack.state["prometheus_config"]).read_text()
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), free_ports(1)[0], config)
    server.start()
    try:
        targets = server.wait_for_targets_up(timeout=30)
        metrics = {r["metrics_url"].removeprefix("http://").removesuffix("/metrics") for r in stack.replicas}
        assert {t["instance"] for t in targets if t["job"] == "triton"} == metrics
        per_instance = [q for q in dashboard_queries() if q.dashboard_uid == "onerec-model" and "instance" in q.expr]
        assert len(per_instance) >= 6
        with Loop(stack, threads=2):  # requests in the rate window (the stack scrapes every 5 s)
            busy = 'count(sum by (instance) (rate(nv_inference_request_success{model="onerec"}[1m])) > 0)'
            server.wait_for_data(f"{busy} == {REPLICAS}", timeout=60)  # two scrapes of each, with requests between
            for q in per_instance:
                result = server.query(grafana_to_promql(q.expr, rate_interval="1m"))
                values = {sample["metric"].get("instance"): float(sample["value"][1]) for sample in result}
                assert set(values) == metrics, (q.panel_title, result)
                assert all(math.isfinite(v) for v in values.values()), (q.panel_title, values)
    finally:
        server.stop()


def test_a_rollout_on_one_replica_keeps_answers_on_the_version_both_serve(stack: LocalStack, tiny_run: Path,
                                                                         tmp_path_factory: pytest.TempPathFactory):
    """Replica 0 loads version 2 (a permuted catalog, same weights) as primary, replica 1 not yet: the gateway keeps
    pinning version 1, which both hold, and both keep answering it; once replica 1 loads, it follows to 2."""
    from export.rollout import TritonControl

    permuted = permuted_catalog_run(tiny_run, tmp_path_factory.mktemp("permuted") / "run")
    first, second = stack.replicas
    done = onerec("deploy", *stack.flags, "--run", permuted, "--triton-url", first["http_url"], "--wait", "0",
                  "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["primary"] == 2
    before = [inferences(r["metrics_url"], version="1") for r in stack.replicas]
    with Loop(stack) as loop:
        loop.wait(60, since=time.monotonic() + 3)  # and three syncs (one a second) of the half-done rollout
    after = [inferences(r["metrics_url"], version="1") for r in stack.replicas]
    answers = [(status, body) for *_, status, body in loop.answers]
    assert all(status == 200 for status, _ in answers), answers[:3]
    assert Counter((body["source"], body["model_version"]) for _, body in answers) == {("model", "1"): len(answers)}
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)  # both answered version 1
    assert ready_everywhere(stack) == {"1"}  # `status --run` asks both replicas: 2 is not on replica 1 yet
    TritonControl(second["http_url"]).load("onerec")  # the rollout reaches replica 1
    deadline = time.monotonic() + 30
    while get_json(stack.state["gateway_url"] + "/readyz")[1].get("model_version") != "2":
        assert time.monotonic() < deadline, "the gateway did not follow to version 2"
        time.sleep(0.2)
    answers = [stack.recommend(user) for user in stack.users()[:10]]
    assert {(status, body["source"], body["model_version"]) for status, body, _ in answers} == {(200, "model", "2")}
    assert ready_everywhere(stack) == {"1", "2"}


def ready_everywhere(stack: LocalStack) -> set[str]:
    """The versions `onerec status --run` reports READY: the stack's every replica is asked (READY on all)."""
    done = onerec("status", *stack.flags, "--json")
    assert done.returncode == 0, done.stderr
    return {entry["version"] for entry in json.loads(done.stdout)["model"]["triton"] if entry["state"] == "READY"}


def test_sigkill_of_one_replica_under_load_costs_no_request(stack: LocalStack):
    victim = stack.replicas[1]
    server_pid = int((Path(victim["workdir"]) / "tritonserver.pid").read_text())
    before = inferences(victim["metrics_url"])
    with Loop(stack) as loop:
        loop.wait(30)
        assert inferences(victim["metrics_url"]) > before  # it had its share when it died
        killed_at = time.monotonic()
        os.kill(server_pid, signal.SIGKILL)
        loop.wait(60, since=killed_at)
        while time.monotonic() < killed_at + AFTER_KILL_S and loop.count() < LOOP_MAX_REQUESTS:
            time.sleep(0.1)
    assert not pid_alive(server_pid)
    answers = loop.answers
    failed = [(status, body) for *_, status, body in answers if status != 200]
    assert not failed, failed[:3]
    after = [(done_at - killed_at, seconds, body) for done_at, seconds, _, body in answers if done_at > killed_at]
    assert len(after) >= 60
    fallbacks = [(round(t, 2), body["fallback_reason"]) for t, _, body in after if body["source"] != "model"]
    assert all(t <= RECOVER_S for t, _ in fallbacks), fallbacks  # the model again within 2 s
    assert not fallbacks, fallbacks  # and in fact never away: the requests on the dead replica were retried
    assert max(seconds for _, seconds, _ in after) < RECOVER_S
    status, ready = get_json(stack.state["gateway_url"] + "/readyz")
    assert status == 200 and ready["triton"] is True  # one replica is enough


def test_down_stops_every_replica(stack: LocalStack):
    pids = stack.state["pids"]
    done = onerec("down", *stack.flags, timeout=180)
    assert done.returncode == 0, done.stderr
    assert {"gateway", "triton", "triton:1", "redis"} <= set(json.loads(done.stdout))
    assert not any(pid_alive(pid) for pid in pids.values())
    for replica in stack.replicas:
        port = int(replica["grpc_url"].rsplit(":", 1)[1])
        assert port_free("127.0.0.1", port) and port_free("127.0.0.1", port + 1)
