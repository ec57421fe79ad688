"""The gateway in a real uvicorn process over the real tritonserver and, in turn, a real redis-server and a real
local Redis Cluster of 3 masters (ONEREC_REDIS_MODE=standalone|cluster), on loopback: every test runs in both."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from onerec.config import BeamConfig
from onerec.data.sessions import Sessions
from onerec.model.generate import generate
from onerec.model.onerec import load_model
from onerec.recommend import sessions_to_videos
from onerec.tokenizer.catalog import Catalog
from stack.gateway import GatewayProcess
from stack.probes import free_ports
from stack.triton import TritonPorts, TritonServer
from tests.conftest import run_cli
from tests.redis_backends import MODES, RedisBackend

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
BEAM = BeamConfig(beam_width=16, num_sessions=4)
TRITON_TIMEOUT_S = 10.0


class Triton:
    """The module's one tritonserver, shared by both Redis modes' stacks; a test kills and restarts it."""

    def __init__(self, repo: Path, work: Path) -> None:
        self.repo, self.work = repo, work
        self.ports = TritonPorts(*free_ports(3))
        self.server = TritonServer(repo, work, self.ports)

    def restart(self) -> None:
        self.server = TritonServer(self.repo, self.work, self.ports).start()


class Stack:
    """Redis (`mode`) + the shared Triton + a gateway; the tests stop and restart Redis and Triton on their ports."""

    def __init__(self, mode: str, triton: Triton, repo: Path, work: Path) -> None:
        self.mode = mode
        self.shared_triton = triton
        self.redis = RedisBackend(mode, work / "redis")
        self.gateway = GatewayProcess(free_ports(1)[0], {
            **self.redis.gateway_env(), "ONEREC_TRITON_URL": triton.server.grpc_url,
            "ONEREC_MODEL_REPO": str(repo), "ONEREC_BEAM_WIDTH": str(BEAM.beam_width),
            "ONEREC_NUM_SESSIONS": str(BEAM.num_sessions), "ONEREC_TRITON_TIMEOUT_S": str(TRITON_TIMEOUT_S),
            "ONEREC_BREAKER_RESET_S": "0.5", "ONEREC_SYNC_INTERVAL_S": "1"}, work / "gateway.log")

    @property
    def triton(self) -> TritonServer:
        return self.shared_triton.server

    @contextlib.contextmanager
    def running(self) -> Iterator[Stack]:
        """Redis, then the gateway; stopped in the reverse order, however the block ends."""
        self.redis.start()
        try:
            self.gateway.start()
            try:
                yield self
            finally:
                self.gateway.stop()
        finally:
            self.redis.stop()

    def restart_triton(self) -> None:
        self.shared_triton.restart()

    def restart_redis(self) -> None:
        self.redis.restart()

    def history(self, user: str) -> list[bytes]:
        """The user's stored history, read with the contract's key (DESIGN.md §4) by a client of the right kind."""
        return self.redis.client().lrange(f"onerec:history:{{{user}}}", 0, -1)

    def post(self, path: str, body: dict, timeout: float = 30.0) -> tuple[int, dict, dict]:
        request = urllib.request.Request(self.gateway.url + path, json.dumps(body).encode(),
                                         {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}


@contextlib.contextmanager
def live_stack(run: Path, factory: pytest.TempPathFactory, name: str) -> Iterator[Stack]:
    """`run` exported (fp32) into a repository of its own (deploys write to it), its tritonserver, a standalone
    Redis and a gateway re-syncing every second; `stack.repo` is the repository. Everything stops on exit."""
    repo = factory.mktemp(f"{name}-repo")
    code, out, err = run_cli("export", "--run", run, "--out", repo, "--precision", "fp32")
    assert code == 0, out + err
    triton = Triton(repo, factory.mktemp(f"{name}-triton"))
    triton.server.start()
    try:
        with Stack("standalone", triton, repo, factory.mktemp(f"{name}-stack")).running() as s:
            s.repo = repo
            yield s
    finally:
        triton.server.stop()


@pytest.fixture(scope="module")
def triton(exported_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    shared = Triton(exported_repo, tmp_path_factory.mktemp("triton"))
    shared.server.start()
    try:
        yield shared
    finally:
        shared.server.stop()


@pytest.fixture(scope="module", params=MODES)
def stack(request, triton: Triton, exported_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    s = Stack(request.param, triton, exported_repo, tmp_path_factory.mktemp(f"gateway-{request.param}"))
    with s.running():
        yield s


@pytest.fixture(scope="module")
def catalog(exported_repo: Path) -> Catalog:
    return Catalog.load(exported_repo / "onerec" / "1")


@pytest.fixture(scope="module")
def test_histories(tiny_run: Path) -> list[list[int]]:
    sessions = Sessions.load(tiny_run / "data" / "sessions_test.npz")
    return [sessions.history_of(i)[:32].tolist() for i in range(len(sessions)) if len(sessions.history_of(i)) >= 3]


def five_distinct(body: dict, catalog: Catalog) -> list[int]:
    videos = [item["video_id"] for item in body["items"]]
    assert len(videos) == 5 and len(set(videos)) == 5
    assert np.all(catalog.rows_of(videos) >= 0), "every video is in the catalog"
    return videos


def test_ready_and_pinned(stack):
    with urllib.request.urlopen(stack.gateway.url + "/readyz") as response:  # noqa: S310
        assert response.status == 200
        body = json.loads(response.read())
    assert body == {"ready": True, "redis": True, "triton": True, "catalog": True, "model_version": "1",
                    "canary_version": None, "canary_share": 0.0, "detail": None}


def test_events_then_recommend(stack, catalog, test_histories):
    watched = test_histories[0][:10][::-1]  # oldest first, as events arrive
    status, body, _ = stack.post("/events", {"user_id": "it:user-1", "video_ids": watched})
    assert status == 200 and body["stored"] == 10 and body["history_length"] == 10
    assert [int(v) for v in stack.history("it:user-1")] == watched[::-1]  # most recent first
    status, body, headers = stack.post("/recommend", {"user_id": "it:user-1"})
    assert status == 200 and body["source"] == "model", body
    videos = five_distinct(body, catalog)
    assert not set(videos) & set(watched), "nothing from the history"
    assert headers["x-request-id"] == body["request_id"]


def test_override_history_equals_torch_reference(stack, catalog, test_histories, tiny_run):
    model = load_model(tiny_run / "model")
    for k, history in enumerate(test_histories[1:4]):
        sids = catalog.known_sids(history)
        want = generate(model, catalog.trie, [sids], BEAM, exclude=[catalog.trie.leaf_of(sids)])
        expected = sessions_to_videos(catalog, want.leaves[0].numpy(), exclude=history, k=5).video_ids
        status, body, _ = stack.post("/recommend", {"user_id": f"ref-{k}", "history": history})
        assert status == 200 and body["source"] == "model"
        assert [item["video_id"] for item in body["items"]] == expected


def test_int64_edge_video_id_end_to_end(stack, catalog, test_histories):
    """2**63-1 is a valid id: stored exactly in Redis, read back, dropped as unknown to this catalog, not an error."""
    edge = 2**63 - 1
    watched = test_histories[5][:5][::-1]
    status, body, _ = stack.post("/events", {"user_id": "it:edge", "video_ids": [*watched, edge]})
    assert status == 200 and body["stored"] == 6, body
    assert stack.history("it:edge")[0] == str(edge).encode()
    status, body, _ = stack.post("/recommend", {"user_id": "it:edge"})
    assert status == 200 and body["source"] == "model", body
    five_distinct(body, catalog)
    status, body, _ = stack.post("/recommend", {"user_id": "it:edge-override", "history": [edge, *watched]})
    assert status == 200 and body["source"] == "model", body
    status, body, _ = stack.post("/events", {"user_id": "it:edge", "video_ids": [edge + 1]})
    assert status == 422 and body["field"] == "video_ids.0"


def gateway_counter(stack, name: str) -> float:
    """The sum of the gateway's samples `name` over every label set (e.g. every model_version)."""
    with urllib.request.urlopen(stack.gateway.url + "/metrics") as response:  # noqa: S310
        values = [float(line.split()[-1]) for line in response.read().decode().splitlines()
                  if line.startswith((name + " ", name + "{"))]
    if not values:
        raise AssertionError(f"{name} not exported")
    return sum(values)


def answer_until(stack, request: dict, done, what: str, limit_s: float = 5.0) -> list[int]:
    """Ask again every 0.1 s until `done(videos)`; fails if that takes longer than `limit_s`."""
    start = time.monotonic()
    while True:
        status, body, _ = stack.post("/recommend", request)
        assert status == 200, body
        videos = [item["video_id"] for item in body["items"]]
        if done(videos):
            return videos
        assert time.monotonic() - start < limit_s, f"{what}: still {videos} after {limit_s} s"
        time.sleep(0.1)


def test_blocking_a_recommended_video_removes_it_within_5s_and_unblocking_brings_it_back(
        stack, catalog, test_histories, tiny_run):
    """The acceptance scenario: the model recommends v to a user; `onerec block v`; within 5 s no answer holds v
    and the user still gets 5 distinct videos, all 5 from the model (v's SID is banned inside the beam search,
    so the answer is torch's own search with v excluded); `onerec unblock v` brings the first answer back."""
    history = test_histories[6]
    client = stack.redis.client()
    client.delete("onerec:blocked")
    client.delete("onerec:history:{it:block}")  # two slots in a cluster: two commands
    client.rpush("onerec:history:{it:block}", *history)  # most recent first
    request = {"user_id": "it:block"}
    where = ["--redis-url", stack.redis.url, "--redis-mode", stack.mode]
    status, body, _ = stack.post("/recommend", request)
    assert status == 200 and body["source"] == "model", body
    before = five_distinct(body, catalog)
    video = before[0]
    popular = int(catalog.most_popular(1, exclude=[video])[0])  # what a cold-start user is shown first
    code, out, err = run_cli("block", video, popular, *where, "--json")
    try:
        assert code == 0 and json.loads(out)["blocked"] == [video, popular], err
        blocked_answers(stack, catalog, tiny_run, history, request, video, popular)
    finally:
        code, _, err = run_cli("unblock", video, popular, *where)
    assert code == 0, err
    answer_until(stack, request, lambda videos: videos == before, "unblocked video not back")


def blocked_answers(stack, catalog, tiny_run, history, request, video, popular) -> None:
    """While `video` and `popular` are blocked: gone within 5 s, then answers equal to torch with both banned."""
    answer_until(stack, request, lambda videos: video not in videos, "blocked video still served")
    model = load_model(tiny_run / "model")
    sids = catalog.known_sids(history)
    banned = catalog.leaves_of([video, popular])
    want = generate(model, catalog.trie, [sids], BEAM, exclude=[np.concatenate([catalog.trie.leaf_of(sids), banned])])
    expected = sessions_to_videos(catalog, want.leaves[0].numpy(), exclude=[*history, video, popular], k=5).video_ids
    for _ in range(5):
        model_items = gateway_counter(stack, "onerec_gateway_model_items_total")
        backfilled = gateway_counter(stack, "onerec_gateway_backfilled_items_total")
        status, body, _ = stack.post("/recommend", request)
        assert status == 200 and body["source"] == "model", body
        assert five_distinct(body, catalog) == expected and video not in expected
        assert gateway_counter(stack, "onerec_gateway_model_items_total") - model_items == 5
        assert gateway_counter(stack, "onerec_gateway_backfilled_items_total") == backfilled
    status, cold, _ = stack.post("/recommend", {"user_id": "it:block-cold"})
    assert cold["source"] == "popular" and popular not in five_distinct(cold, catalog)
    status, body, _ = stack.post("/recommend", {"user_id": "it:exclude", "history": history, "exclude": expected[:2]})
    assert status == 200 and body["source"] == "model"
    assert not set(five_distinct(body, catalog)) & {video, popular, *expected[:2]}
    assert gateway_counter(stack, "onerec_gateway_blocklist_size") == 2


def test_cold_start_user_gets_popular(stack, catalog):
    status, body, _ = stack.post("/recommend", {"user_id": "never-seen"})
    assert status == 200 and body["source"] == "popular" and body["fallback_reason"] == "cold_start"
    assert [item["video_id"] for item in body["items"]] == catalog.most_popular(5).tolist()


def test_triton_killed_falls_back_then_recovers_within_5s(stack, catalog, test_histories):
    request = {"user_id": "it:kill", "history": test_histories[4]}
    os.killpg(stack.triton.process.pid, signal.SIGKILL)
    stack.triton.process.wait()
    reasons = []
    for _ in range(5):
        start = time.monotonic()
        status, body, _ = stack.post("/recommend", request)
        assert time.monotonic() - start < TRITON_TIMEOUT_S + 2
        assert status == 200 and body["source"] == "popular"
        five_distinct(body, catalog)
        reasons.append(body["fallback_reason"])
    assert set(reasons) <= {"triton_unavailable", "circuit_open"} and "circuit_open" in reasons
    stack.restart_triton()
    ready_at = time.monotonic()
    while True:
        status, body, _ = stack.post("/recommend", request)
        if body["source"] == "model":
            break
        assert time.monotonic() - ready_at < 5.0, f"still {body['fallback_reason']} 5 s after Triton was ready"
        time.sleep(0.1)
    five_distinct(body, catalog)


def test_redis_hanging_recommend_answers_within_budget_and_events_are_refused(stack):
    stack.redis.pause()  # SIGSTOP (every node of a cluster): connections are accepted, nothing is answered
    try:
        start = time.monotonic()
        status, body, _ = stack.post("/recommend", {"user_id": "it:user-1"})
        assert time.monotonic() - start < 2.0  # redis_timeout_s 0.25 + the popular answer
        assert status == 200 and body["fallback_reason"] == "redis_unavailable"
        status, body, _ = stack.post("/events", {"user_id": "it:hang", "video_ids": [5]})
        assert status == 503 and body["code"] == "redis_unavailable"
    finally:
        stack.redis.resume()
    status, _, _ = stack.post("/events", {"user_id": "it:hang", "video_ids": [6]})
    assert status == 200


def test_redis_stopped_events_503_and_nothing_acknowledged_is_lost(stack, catalog):
    acknowledged = []
    for i in range(20):
        status, _, _ = stack.post("/events", {"user_id": f"it:ack-{i % 3}", "video_ids": [int(i)]})
        assert status == 200
        acknowledged.append((f"it:ack-{i % 3}", i))
    stack.redis.stop()  # the server, or every node of the cluster
    status, body, headers = stack.post("/events", {"user_id": "it:ack-0", "video_ids": [999]})
    assert status == 503 and body["code"] == "redis_unavailable" and int(headers["retry-after"]) >= 1
    start = time.monotonic()
    status, body, _ = stack.post("/recommend", {"user_id": "it:ack-0"})
    assert time.monotonic() - start < 2.0
    assert status == 200 and body["source"] == "popular" and body["fallback_reason"] == "redis_unavailable"
    with pytest.raises(urllib.error.HTTPError) as not_ready:
        urllib.request.urlopen(stack.gateway.url + "/readyz")  # noqa: S310
    assert not_ready.value.code == 503
    stack.restart_redis()
    for user, video in acknowledged:
        assert str(video).encode() in stack.history(user), (user, video)
    assert b"999" not in stack.history("it:ack-0")  # refused, so not stored
    status, _, _ = stack.post("/events", {"user_id": "it:ack-0", "video_ids": [1000]})
    assert status == 200  # the pool reconnects on its own


def test_metrics_count_what_happened(stack):
    with urllib.request.urlopen(stack.gateway.url + "/metrics") as response:  # noqa: S310
        text = response.read().decode()
    for line in ('onerec_gateway_fallbacks_total{model_version="1",reason="cold_start"}',
                 'onerec_gateway_fallbacks_total{model_version="1",reason="redis_unavailable"}',
                 'onerec_gateway_stage_seconds_count{model_version="1",stage="triton"}',
                 'onerec_gateway_recommend_seconds_count{model_version="1"}'):
        assert line in text
    assert 'onerec_gateway_invalid_sids_total{model_version="1"} 0.0' in text



@pytest.mark.parametrize("stack", ["standalone"], indirect=True)  # the HTTP contract: one Redis mode is enough
def test_schemathesis_all_checks_against_the_live_gateway(stack, tmp_path):
    """As a new user would run it: `schemathesis run --checks all` on the live gateway (real Redis and Triton
    behind), the negative-data-rejection and positive-data-acceptance checks included."""
    command = [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(REPO / "schemathesis.toml"),
               "run", stack.gateway.url + "/openapi.json", "--checks", "all", "--max-examples", "15", "--seed", "1",
               "--generation-deterministic", "--workers", "1", "--request-timeout", str(TRITON_TIMEOUT_S + 5),
               "--report-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,  # noqa: S603
                            env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
