"""Rollout without a restart on the real stack (redis-server, tritonserver with explicit model control, the
gateway under uvicorn, a real Prometheus): deploy then rollback under a request loop, and a 20% canary.

The deployed version has the same weights (shared by hard link) over a permuted catalog, so every history has a
different answer under each version: an answer mapped with a catalog other than its version's would show."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from loadtest.run import Mix, Target, locust_command, start_locust, stop_group
from loadtest.stats import read_records
from loadtest.steps import parse_steps
from onerec.tokenizer.catalog import Catalog
from service.canary import in_canary
from stack.probes import free_ports, get_json
from stack.prometheus import PrometheusServer, dashboard_queries, grafana_to_promql, local_config, prometheus_binary
from tests.conftest import permuted_catalog_run, run_cli
from tests.integration.test_gateway import Stack, live_stack
from tests.tools import require_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PROBES = 8  # distinct histories the loop cycles through
LOOP_MAX_REQUESTS = 4000
LOOP_MAX_S = 240.0
SCRAPE_S = 1.0
LOCUST_USERS = 24  # users with a history in Redis that locust draws from
LOCUST_CLIENTS = 3  # concurrent locust users
LOCUST_MAX_S = 240  # locust's schedule; the test stops it (SIGTERM: it writes its records) once the rollback is served


@pytest.fixture(scope="module")
def permuted_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run with its videos' SIDs shuffled: same model weights, another catalog (another content hash)."""
    return permuted_catalog_run(tiny_run, tmp_path_factory.mktemp("permuted") / "run")


@pytest.fixture(scope="module")
def live(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """Its own repository (deploys write to it), Redis, Triton and a gateway that re-syncs every second."""
    with live_stack(tiny_run, tmp_path_factory, "rollout") as s:
        yield s


@pytest.fixture(scope="module")
def histories(tiny_run: Path) -> list[list[int]]:
    from onerec.data.sessions import Sessions

    sessions = Sessions.load(tiny_run / "data" / "sessions_test.npz")
    found = [sessions.history_of(i)[:20].tolist() for i in range(len(sessions)) if len(sessions.history_of(i)) >= 5]
    return found[:PROBES]


def rollout(live: Stack, *args: object) -> dict:
    code, out, err = run_cli(*args, "--model-repo", live.repo, "--triton-url", live.triton.http_url, "--wait", "0",
                             "--json")
    assert code == 0, out + err
    return json.loads(out)


def ask(live: Stack, user: str, history: list[int]) -> tuple[int, dict]:
    status, body, _ = live.post("/recommend", {"user_id": user, "history": history})
    return status, body


def items(body: dict) -> tuple[int, ...]:
    return tuple(item["video_id"] for item in body["items"])


class Loop:
    """Requests in a few threads, bounded in count and time; every answer recorded with its completion time."""

    def __init__(self, live: Stack, histories: list[list[int]], threads: int = 3) -> None:
        self.live, self.histories = live, histories
        self.answers: list[tuple[float, int, int, dict]] = []  # (time, probe, status, body)
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
            probe = k % len(self.histories)
            status, body = ask(self.live, f"loop-{probe}", self.histories[probe])
            with self.lock:
                self.answers.append((time.monotonic(), probe, status, body))
            k += 1

    def __enter__(self) -> Loop:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def wait_for(self, version: str, count: int = 30, timeout: float = 60.0) -> None:
        """Until `count` answers from `version` arrived after this call (the gateway followed)."""
        since = time.monotonic()
        deadline = since + timeout
        while time.monotonic() < deadline:
            with self.lock:
                seen = sum(1 for t, _, _, body in self.answers if t > since and body.get("model_version") == version)
            if seen >= count:
                return
            time.sleep(0.1)
        raise AssertionError(f"no {count} answers from version {version} within {timeout}s")


def test_deploy_then_rollback_under_a_request_loop(live: Stack, permuted_run: Path, histories: list[list[int]]):
    baseline = {}
    for k, history in enumerate(histories):
        status, body = ask(live, f"loop-{k}", history)
        assert status == 200 and body["source"] == "model" and body["model_version"] == "1", body
        baseline[k] = items(body)
    with Loop(live, histories) as loop:
        loop.wait_for("1", 10)
        deployed = rollout(live, "deploy", "--run", permuted_run)
        assert deployed["version"] == 2 and deployed["primary"] == 2 and deployed["weights_shared"]
        loop.wait_for("2")
        rolled = rollout(live, "rollback")
        assert rolled["primary"] == 1 and rolled["action"] == "rollback"
        loop.wait_for("1")
    answers = sorted(loop.answers, key=lambda a: a[0])
    assert len(answers) <= LOOP_MAX_REQUESTS
    failed = [(status, body) for _, _, status, body in answers if status != 200]
    assert not failed, failed[:3]
    fallbacks = Counter(body.get("fallback_reason") for *_, body in answers if body["source"] != "model")
    assert not fallbacks, fallbacks
    # model_version moves forward then back: 1 ... 2 ... 1, never 1 again between the first and last 2
    versions = [body["model_version"] for *_, body in answers]
    first2, last2 = versions.index("2"), len(versions) - 1 - versions[::-1].index("2")
    assert versions[0] == "1" and versions[-1] == "1" and first2 < last2
    # each answer is exactly what its version answers: version 2's are the permuted catalog's mapping
    expected = {"1": baseline}
    expected["2"] = {probe: items(body) for _, probe, _, body in answers if body["model_version"] == "2"}
    assert len(expected["2"]) == len(histories)
    assert sum(expected["2"][k] != baseline[k] for k in baseline) >= len(baseline) // 2, "the catalogs differ"
    wrong = [(probe, body["model_version"], items(body)) for _, probe, _, body in answers
             if items(body) != expected[body["model_version"]][probe]]
    assert not wrong, f"{len(wrong)} answers not mapped with their version's catalog: {wrong[:3]}"
    code, out, err = run_cli("status", "--model-repo", live.repo, "--triton-url", live.triton.http_url, "--json")
    assert code == 0, err
    model = json.loads(out)["model"]
    assert model["rollout"]["primary"] == 1
    assert {e["version"] for e in model["triton"] if e["state"] == "READY"} == {"1", "2"}


def test_a_version_triton_does_not_hold_is_version_unavailable(live: Stack, histories: list[list[int]]):
    """What the gateway sees when a rollout moved past its pinned version: alive Triton, its own fallback reason."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from onerec.tokenizer.catalog import Catalog
    from service.model_client import _inputs, failure_reason

    sids = Catalog.load(live.repo / "onerec" / "1").known_sids(histories[0])
    client = grpcclient.InferenceServerClient(live.triton.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as refused:
            client.infer("onerec", _inputs(sids, 16, 4, True), model_version="99")
    finally:
        client.close()
    assert failure_reason(refused.value) == "version_unavailable", (refused.value.status(), refused.value.message())


@pytest.fixture(scope="module")
def prometheus(live: Stack, tmp_path_factory: pytest.TempPathFactory):
    require_tool(prometheus_binary)
    gateway = live.gateway.url.removeprefix("http://")
    config = local_config({"gateway": gateway, "triton": f"127.0.0.1:{live.shared_triton.ports.metrics}"}, SCRAPE_S)
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), free_ports(1)[0], config)
    server.start()
    yield server
    server.stop()


def test_canary_20_percent(live: Stack, permuted_run: Path, histories: list[list[int]],
                           prometheus: PrometheusServer):
    change = rollout(live, "deploy", "--run", permuted_run, "--canary", "0.2")
    candidate = str(change["canary"])
    assert change["action"] == "canary" and change["primary"] == 1 and change["weights_shared"]
    deadline = time.monotonic() + 30  # the gateway re-syncs every second
    while time.monotonic() < deadline and not any(
            ask(live, f"probe-{i}", histories[0])[1]["model_version"] == candidate for i in range(40)):
        time.sleep(0.2)
    readiness = get_json(live.gateway.url + "/readyz")[1]
    assert (readiness["model_version"], readiness["canary_version"], readiness["canary_share"]) == ("1", candidate, 0.2)
    users = [f"user-{i}" for i in range(500)]
    seen: dict[str, set[str]] = {user: set() for user in users}
    answered: dict[str, dict[int, tuple[int, ...]]] = {"1": {}, candidate: {}}
    for _ in range(2):
        for i, user in enumerate(users):
            status, body = ask(live, user, histories[i % len(histories)])
            assert status == 200 and body["source"] == "model", body
            seen[user].add(body["model_version"])
            previous = answered[body["model_version"]].setdefault(i % len(histories), items(body))
            assert previous == items(body), "one version, one history: one answer"
    assert all(len(v) == 1 for v in seen.values()), "the same user always gets the same version"
    on_candidate = {user for user, v in seen.items() if v == {candidate}}
    assert 0.15 <= len(on_candidate) / len(users) <= 0.25
    assert on_candidate == {user for user in users if in_canary(user, candidate, 0.2)}  # the documented split
    # the per-version series, scraped by a real Prometheus (which loaded the committed alerting rules too)
    prometheus.wait_for_targets_up(timeout=30)
    loaded = {rule["name"] for group in prometheus.api("rules")["groups"] for rule in group["rules"]}
    assert {"OneRecGatewayNotReady", "OneRecHigh5xxRate", "OneRecTritonQueueTimeHigh"} <= loaded, loaded
    expr = f'sum(onerec_gateway_recommendations_total{{model_version="{candidate}",source="model"}})'
    deadline = time.monotonic() + 30
    value = 0.0
    while time.monotonic() < deadline:
        result = prometheus.query(expr)
        value = float(result[0]["value"][1]) if result else 0.0
        if value >= 2 * len(on_candidate):
            break
        time.sleep(0.5)
    assert value >= 2 * len(on_candidate)
    time.sleep(2 * SCRAPE_S)
    by_version = {r["metric"]["model_version"]: float(r["value"][1])
                  for r in prometheus.query("sum by (model_version) (onerec_gateway_recommend_seconds_count)")}
    assert {"1", candidate} <= set(by_version)
    compared = [q for q in dashboard_queries() if q.dashboard_uid == "onerec-model" and "model_version" in q.expr]
    assert len(compared) >= 7
    missing = []
    for q in compared:
        result = prometheus.query(grafana_to_promql(q.expr, rate_interval="60s"))
        versions = {r["metric"].get("model_version") for r in result}
        if not {"1", candidate} <= versions:
            missing.append(f"{q.panel_title}: {versions}")
    assert not missing, missing
    aborted = rollout(live, "rollback")  # stops the canary: every user back on version 1
    assert aborted["action"] == "abort-canary" and aborted["canary"] is None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and get_json(live.gateway.url + "/readyz")[0] == 200:
        if all(ask(live, user, histories[0])[1]["model_version"] == "1" for user in sorted(on_candidate)[:20]):
            break
        time.sleep(0.3)
    assert all(ask(live, user, histories[0])[1]["model_version"] == "1" for user in sorted(on_candidate)[:20])
    readiness = get_json(live.gateway.url + "/readyz")[1]
    assert (readiness["canary_version"], readiness["canary_share"]) == (None, 0.0)


def wait_version(live: Stack, history: list[int], version: str, timeout: float = 30.0) -> float:
    """Seconds until the gateway answers from `version` (it re-syncs every second); AssertionError after timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if ask(live, "version-probe", history)[1].get("model_version") == version:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"the gateway did not answer from version {version} within {timeout}s")


def test_deploy_then_rollback_under_locust(live: Stack, permuted_run: Path, histories: list[list[int]],
                                           tmp_path: Path):
    """The acceptance run: `deploy` then `rollback` while a real locust (headless, `loadtest.run`) sends /recommend
    and /events for users whose histories are in Redis. Every locust request succeeds, every /recommend answer comes
    from the model, and the answers' model_version (locust's records.csv) moves forward then back."""
    users = [f"locust-{i}" for i in range(LOCUST_USERS)]
    for i, user in enumerate(users):  # oldest first, as events arrive
        status, body, _ = live.post("/events", {"user_id": user, "video_ids": histories[i % len(histories)][::-1]})
        assert status == 200, body
    catalog = Catalog.load(live.repo / "onerec" / "1")
    users_file, videos_file = tmp_path / "users.txt", tmp_path / "videos.txt"
    users_file.write_text("\n".join(users) + "\n")
    videos_file.write_text("\n".join(str(v) for v in catalog.video_ids[catalog.popular_order]) + "\n")
    code, out, err = run_cli("status", "--model-repo", live.repo, "--triton-url", live.triton.http_url, "--json")
    assert code == 0, err
    before = str(json.loads(out)["model"]["rollout"]["primary"])
    out_dir = tmp_path / "locust"
    out_dir.mkdir()
    command = locust_command(Target(live.gateway.url, users_file, videos_file), out_dir,
                             parse_steps(f"{LOCUST_CLIENTS}x{LOCUST_MAX_S}"), Mix(warmup_s=0.0))
    locust = start_locust(command, out_dir)
    try:
        time.sleep(5)  # locust traffic on the old version first
        deployed = rollout(live, "deploy", "--run", permuted_run)
        new = str(deployed["version"])
        assert new != before and str(deployed["primary"]) == new
        wait_version(live, histories[0], new)
        time.sleep(3)  # locust traffic on the new version
        rolled = rollout(live, "rollback")
        assert rolled["action"] == "rollback" and str(rolled["primary"]) == before
        wait_version(live, histories[0], before)
        time.sleep(3)  # and on the old one again
        assert locust.poll() is None, (out_dir / "locust.log").read_text()[-2000:]
    finally:
        stop_group(locust)
    records = sorted(read_records(out_dir / "records.csv"), key=lambda r: r.start_s)
    failed = [r for r in records if not r.ok]
    assert records and not failed, f"{len(failed)} of {len(records)} locust requests failed"
    answers = [r for r in records if r.name == "/recommend"]
    assert {r.name for r in records} == {"/recommend", "/events"}
    assert not [r.fallback for r in answers if r.fallback], Counter(r.fallback for r in answers)
    versions = [r.model_version for r in answers]
    assert set(versions) == {before, new}, Counter(versions)
    first_new, last_new = versions.index(new), len(versions) - 1 - versions[::-1].index(new)
    assert versions[0] == before and versions[-1] == before and first_new < last_new, Counter(versions)
