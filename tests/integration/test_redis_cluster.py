"""A master failover under a stream of `/events`: a real gateway (uvicorn) over a real local Redis Cluster of 3
masters with a replica each; no acknowledged event is lost, and a refused one is a 503 with Retry-After."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from service.history import history_key
from stack.gateway import GatewayProcess
from stack.probes import free_ports, get_json
from tests.redis_backends import RedisBackend

pytestmark = [pytest.mark.integration, pytest.mark.slow]
USERS = [f"fo:user-{i}" for i in range(24)]  # spread over the three masters
PREFIX = "onerec:history:"


def post_event(url: str, user: str, video: int) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url + "/events", json.dumps({"user_id": user, "video_ids": [video]}).encode(),
                                     {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
            return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), {k.lower(): v for k, v in e.headers.items()}


class EventStream:
    """Posts one new video per event, round robin over USERS; remembers what was acknowledged and what refused."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.next_video = 0
        self.acked: list[tuple[str, int]] = []
        self.refused: list[tuple[str, int]] = []

    def post(self, count: int) -> list[int]:
        statuses = []
        for _ in range(count):
            user, video = USERS[self.next_video % len(USERS)], self.next_video
            self.next_video += 1
            status, body, headers = post_event(self.url, user, video)
            if status == 200:
                self.acked.append((user, video))
            else:  # never anything but a clear, retryable refusal
                assert status == 503 and body["code"] == "redis_unavailable", (status, body)
                assert int(headers["retry-after"]) >= 1, headers
                self.refused.append((user, video))
            statuses.append(status)
        return statuses

    def until(self, done, limit_s: float, what: str) -> None:
        """Keep streaming (24 events a round) until `done()`; fails after `limit_s` seconds."""
        deadline = time.monotonic() + limit_s
        while not done():
            assert time.monotonic() < deadline, f"{what} not within {limit_s} s"
            self.post(len(USERS))

    def missing(self, client) -> list[tuple[str, int]]:
        stored = {user: {int(v) for v in client.lrange(history_key(PREFIX, user), 0, -1)} for user in USERS}
        return [(user, video) for user, video in self.acked if video not in stored[user]]


@pytest.fixture
def cluster(tmp_path: Path):
    with RedisBackend("cluster", tmp_path / "redis", replicas=1, node_timeout_ms=1000) as backend:
        yield backend


@pytest.fixture
def gateway(cluster: RedisBackend, tmp_path: Path):
    """The gateway in cluster mode, acknowledging an event once a replica holds it; no Triton (events need none)."""
    port, triton = free_ports(2)
    (tmp_path / "repo" / "onerec").mkdir(parents=True)
    process = GatewayProcess(port, {**cluster.gateway_env(), "ONEREC_REDIS_WAIT_REPLICAS": "1",
                                    "ONEREC_REDIS_TIMEOUT_S": "0.5", "ONEREC_HISTORY_LEN": "4096",
                                    "ONEREC_TRITON_URL": f"127.0.0.1:{triton}",
                                    "ONEREC_MODEL_REPO": str(tmp_path / "repo")}, tmp_path / "gateway.log")
    process.start(ready_timeout=60, require_ready=False)
    try:
        yield process
    finally:
        process.stop()


def test_a_killed_master_loses_no_acknowledged_event(cluster, gateway):
    """SIGKILL the master of some users mid-stream: its replica takes over (node timeout 1 s); while it does, and
    until the killed node is back as the new master's replica (events are acknowledged only once a replica holds
    them), that master's users get 503 + Retry-After while the others are served (a few of theirs may be refused
    while the gateway re-reads the slot map). Every 200 is in the history."""
    stream = EventStream(gateway.url)
    assert set(stream.post(96)) == {200}
    victim = cluster.server.master_of(history_key(PREFIX, USERS[0]))
    takeover: dict = {}
    killer = threading.Thread(target=lambda: takeover.update(new=cluster.server.kill_and_wait_takeover(victim)))
    killer.start()
    stream.until(lambda: not killer.is_alive(), 30, "the replica's takeover")
    killer.join()
    assert takeover["new"].port != victim.port and cluster.server.role(takeover["new"]) == "master"
    after_takeover = len(stream.acked)
    stream.post(48)
    hit = {user for user in USERS if cluster.server.master_of(history_key(PREFIX, user)).port == takeover["new"].port}
    assert USERS[0] in hit and len(hit) < len(USERS)
    assert {user for user, _ in stream.refused} & hit, "acknowledged with no replica to hold the events"
    assert {user for user, _ in stream.acked[96:]} - hit, "the other masters' users were served meanwhile"
    assert not {user for user, _ in stream.acked[after_takeover:]} & hit  # no replica yet: refused (WAIT)

    back = cluster.server.restart_node(victim)  # rejoins as the replica of the master that replaced it
    cluster.server.wait_ready(30)
    assert cluster.server.role(back) == "slave"
    stream.until(lambda: stream.post(len(USERS)) == [200] * len(USERS), 30, "every user acknowledged again")
    assert stream.missing(cluster.client()) == []
    assert len(stream.acked) > 96 + 48
    assert get_json(gateway.url + "/healthz")[0] == 200


def test_a_manual_failover_loses_no_acknowledged_event(cluster, gateway):
    """CLUSTER FAILOVER on a replica mid-stream (the coordinated hand-over: the old master pauses writers until
    the replica caught up): every acknowledged event is in the history, and every user is acknowledged after it."""
    stream = EventStream(gateway.url)
    assert set(stream.post(72)) == {200}
    master = cluster.server.master_of(history_key(PREFIX, USERS[0]))
    replica = cluster.server.replicas_of(master)[0]
    switch = threading.Thread(target=cluster.server.failover, args=(replica,))
    switch.start()
    stream.until(lambda: not switch.is_alive(), 30, "the failover")
    switch.join()
    assert cluster.server.master_of(history_key(PREFIX, USERS[0])).port == replica.port
    stream.until(lambda: stream.post(len(USERS)) == [200] * len(USERS), 30, "every user acknowledged again")
    assert stream.missing(cluster.client()) == []
