"""The blocklist cache on a fake clock (TTL, one read per expiry, last known set while Redis is down), then against
a real redis-server and a real local Redis Cluster: `onerec block|unblock`, a stopped server."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import redis

from service.blocklist import Blocklist, change_blocklist, parse_ids
from service.history import open_redis
from service.metrics import Metrics
from tests.conftest import run_cli
from tests.redis_backends import MODES, RedisBackend

KEY = "test:blocked"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedRedis:
    """SMEMBERS answers `members`, or raises `error`; `gate` holds the answer; every call is counted."""

    def __init__(self, members: set[str] | None = None) -> None:
        self.members = set(members or ())
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.calls = 0

    async def smembers(self, key: str) -> set[str]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return set(self.members)


def cache(client, ttl: float = 1.0, timeout: float = 0.05) -> tuple[Blocklist, Clock, Metrics]:
    clock, metrics = Clock(), Metrics()
    return Blocklist(client, KEY, ttl, timeout, metrics, clock=clock), clock, metrics


def value(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_a_read_is_reused_until_the_ttl_expires():
    client = ScriptedRedis({"3", "5"})
    blocklist, clock, metrics = cache(client)

    async def scenario():
        assert await blocklist.current() == {3, 5}
        client.members.add("7")
        clock.now += 0.99
        assert await blocklist.current() == {3, 5}  # still fresh: Redis not asked
        clock.now += 0.02
        assert await blocklist.current() == {3, 5, 7}

    asyncio.run(scenario())
    assert client.calls == 2
    assert value(metrics, "onerec_gateway_blocklist_size") == 3


def test_concurrent_callers_share_one_read():
    client = ScriptedRedis({"1"})
    client.gate = asyncio.Event()
    blocklist, _, _ = cache(client)

    async def scenario():
        waiting = [asyncio.create_task(blocklist.current()) for _ in range(20)]
        await asyncio.sleep(0.01)
        client.gate.set()
        return await asyncio.gather(*waiting)

    assert all(ids == {1} for ids in asyncio.run(scenario()))
    assert client.calls == 1


def test_redis_down_keeps_the_last_known_set_logs_once_and_says_so_in_metrics(caplog):
    client = ScriptedRedis({"3"})
    blocklist, clock, metrics = cache(client)

    async def scenario():
        assert await blocklist.current() == {3}
        client.error = redis.ConnectionError("connection refused")
        for _ in range(3):  # three expiries while Redis is down
            clock.now += 1.5
            assert await blocklist.current() == {3}  # last known set, no exception
        assert blocklist.stale
        assert value(metrics, "onerec_gateway_blocklist_stale") == 1
        client.error = None
        client.members = {"3", "4"}
        clock.now += 1.5
        assert await blocklist.current() == {3, 4}

    with caplog.at_level(logging.INFO, logger="service.blocklist"):
        asyncio.run(scenario())
    assert value(metrics, "onerec_gateway_blocklist_refresh_failures_total") == 3
    assert value(metrics, "onerec_gateway_blocklist_stale") == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "keeping the last known 1 blocked videos" in errors[0].getMessage()
    assert any("readable again: 2 videos blocked" in r.getMessage() for r in caplog.records)


def test_a_failed_read_is_not_retried_by_every_request():
    client = ScriptedRedis()
    client.error = redis.TimeoutError("timed out")
    blocklist, clock, _ = cache(client)

    async def scenario():
        for _ in range(10):
            assert await blocklist.current() == frozenset()  # never read: nothing known, nothing raised
            clock.now += 0.05

    asyncio.run(scenario())
    assert client.calls == 1  # once per ttl, so a dead Redis costs one timeout per second, not one per request


def test_a_hanging_redis_is_bounded_by_the_timeout():
    client = ScriptedRedis({"9"})
    client.gate = asyncio.Event()  # never set: SMEMBERS hangs
    blocklist, _, metrics = cache(client, timeout=0.05)

    async def scenario():
        return await asyncio.wait_for(blocklist.current(), 1.0)

    assert asyncio.run(scenario()) == frozenset()
    assert value(metrics, "onerec_gateway_blocklist_refresh_failures_total") == 1


def test_members_that_are_not_video_ids_are_ignored():
    assert parse_ids(["1", b"2", "x", "-3", "4.5"]) == (frozenset({1, 2}), 3)


# --- against a real redis-server -----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=MODES)
def server(request, tmp_path_factory):
    with RedisBackend(request.param, tmp_path_factory.mktemp(f"redis-{request.param}")) as backend:
        yield backend


@pytest.mark.integration
def test_block_and_unblock_commands(server):
    client = server.client()
    client.delete(KEY)
    where = ["--redis-url", server.url, "--redis-mode", server.mode, "--key", KEY]
    code, out, err = run_cli("block", "5", "7", "5", *where, "--json")
    assert code == 0, err
    assert json.loads(out) == {"key": KEY, "blocked": [5, 7], "already_blocked": [], "size": 2}
    code, out, _ = run_cli("block", "7", "9", *where)
    assert code == 0 and out.strip() == f"blocked 1 video(s), 1 already blocked; 3 blocked in {KEY}"
    assert client.smembers(KEY) == {b"5", b"7", b"9"}
    code, out, _ = run_cli("unblock", "7", "8", *where, "--json")
    assert code == 0
    assert json.loads(out) == {"key": KEY, "unblocked": [7], "not_blocked": [8], "size": 2}
    assert change_blocklist(client, KEY, [2**63 - 1], block=True).size == 3  # the int64 edge is a video id


@pytest.mark.integration
@pytest.mark.parametrize(("args", "needle"), [
    (["block", "--", "-1"], "VIDEO: -1 is not a video id"),
    (["block", str(2**63)], "is not a video id"),
    (["unblock", "1", "--redis-url", "redis://127.0.0.1:9/0"], "--redis-url redis://127.0.0.1:9/0"),
    (["block", "1", "--redis-url", "redis://127.0.0.1:9/0", "--redis-mode", "cluster"],
     "--redis-url redis://127.0.0.1:9/0"),
    (["block", "1", "--redis-mode", "sentinel"], "--redis-mode: 'sentinel'"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    code, out, err = run_cli(*args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.integration
@pytest.mark.parametrize("mode", MODES)
def test_the_cache_reads_the_real_set_and_survives_the_server_stopping(tmp_path, mode):
    backend = RedisBackend(mode, tmp_path / "redis").start()
    try:
        backend.client().sadd(KEY, 11, 12)

        async def scenario():
            client = open_redis(backend.url, 0.2, mode)
            blocklist = Blocklist(client, KEY, ttl_s=0.05, timeout=0.2, metrics=Metrics())
            try:
                first = await blocklist.current()
                backend.stop()
                await asyncio.sleep(0.1)
                during = await blocklist.current()
                return first, during, blocklist.stale
            finally:
                await client.aclose()

        assert asyncio.run(scenario()) == ({11, 12}, {11, 12}, True)
    finally:
        backend.stop()
