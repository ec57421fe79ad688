"""The Redis history store and bulk loader against a real redis-server; the dataset's latest histories."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis

from onerec.data.interactions import Interactions
from onerec.data.sessions import latest_histories
from service.history import HistoryError, RedisHistory, bulk_load, open_redis
from stack.probes import free_ports
from stack.redis_server import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis"), free_ports(1)[0]) as srv:
        yield srv


def run(coro):
    return asyncio.run(coro)


def store_for(url: str, cap: int = 4, timeout: float = 0.5) -> RedisHistory:
    return RedisHistory(open_redis(url, timeout), "test:h:", cap, timeout)


def test_append_is_most_recent_first_and_capped(server):
    async def scenario():
        store = store_for(server.url)
        try:
            assert (await store.recent("a")).video_ids == []  # cold start, not an error
            assert await store.append("a", [1, 2, 3]) == 3
            assert await store.append("a", [4, 5]) == 4  # capped at 4
            return await store.recent("a")
        finally:
            await store.close()

    assert run(scenario()).video_ids == [5, 4, 3, 2]
    assert redis.Redis.from_url(server.url).llen("test:h:a") == 4


def test_malformed_entries_are_skipped_and_counted(server):
    redis.Redis.from_url(server.url).rpush("test:h:m", "7", "oops", "8")

    async def scenario():
        store = store_for(server.url)
        try:
            return await store.recent("m")
        finally:
            await store.close()

    history = run(scenario())
    assert history.video_ids == [7, 8] and history.malformed == 1


def test_a_dead_redis_fails_fast_with_history_error():
    async def scenario():
        store = store_for(f"redis://127.0.0.1:{free_ports(1)[0]}/0", timeout=0.3)
        try:
            assert not await store.ping()
            with pytest.raises(HistoryError):
                await store.recent("a")
            with pytest.raises(HistoryError):
                await store.append("a", [1])
        finally:
            await store.close()

    run(scenario())


def test_a_hanging_redis_is_bounded_by_the_timeout(server):
    async def scenario():
        store = store_for(server.url, timeout=0.3)
        loop = asyncio.get_running_loop()
        try:
            server.pause()
            start = loop.time()
            with pytest.raises(HistoryError):
                await store.recent("a")
            return loop.time() - start
        finally:
            server.resume()
            await store.close()

    assert run(scenario()) < 2.0


def test_bulk_load_replaces_histories(server):
    client = redis.Redis.from_url(server.url)
    client.rpush("test:b:1", "99")
    seen = []
    users, videos = bulk_load(client, [("1", [3, 2, 1]), ("2", [9]), ("3", [])], "test:b:", cap=2, batch=2,
                              progress=seen.append)
    assert (users, videos) == (3, 3) and seen == [2, 1]
    assert client.lrange("test:b:1", 0, -1) == [b"3", b"2"]
    assert client.lrange("test:b:2", 0, -1) == [b"9"] and not client.exists("test:b:3")


def test_latest_histories_hand_worked():
    # user 1: positives at t=1 (video 10), t=3 (30), t=2 (20); a negative (rating 2) is ignored. user 2: one.
    interactions = Interactions(users=np.array([1, 1, 1, 1, 2]), items=np.array([10, 30, 20, 40, 50]),
                                ratings=np.array([5, 4, 4, 2, 5], dtype=np.float32),
                                timestamps=np.array([1, 3, 2, 4, 1]))
    got = {u: h.tolist() for u, h in latest_histories(interactions, 4.0, cap=2)}
    assert got == {1: [30, 20], 2: [50]}


def test_load_histories_command(server, tiny_run):
    from onerec.data.sessions import Sessions
    from tests.conftest import run_cli

    code, out, err = run_cli("load-histories", "--run", tiny_run, "--redis-url", server.url, "--prefix", "cli:",
                             "--cap", "8", "--batch", "64")
    assert code == 0, err
    summary = read_json_line(out)
    client = redis.Redis.from_url(server.url)
    assert summary["users"] == len(client.keys("cli:*")) > 0
    assert all(client.llen(k) <= 8 for k in client.keys("cli:*"))
    assert summary["videos"] == sum(client.llen(k) for k in client.keys("cli:*"))

    test = Sessions.load(tiny_run / "data" / "sessions_test.npz")
    code, out, err = run_cli("load-histories", "--run", tiny_run, "--redis-url", server.url, "--prefix", "cli-test:",
                             "--histories", "test")
    assert code == 0, err
    user = str(int(test.users[0]))
    stored = [int(v) for v in client.lrange(f"cli-test:{user}", 0, -1)]
    assert stored == test.history_of(0).tolist()  # most recent first, as the model saw it


def test_load_histories_reports_a_dead_redis(tiny_run):
    from tests.conftest import run_cli

    code, _, err = run_cli("load-histories", "--run", tiny_run, "--redis-url", f"redis://127.0.0.1:{free_ports(1)[0]}/0")
    assert code == 2 and "--redis-url" in err


def read_json_line(out: str) -> dict:
    import json

    return json.loads(out.strip().splitlines()[-1])


def test_served_items_counts_distinct_videos_over_the_window(server):
    from service.coverage import ServedItems

    async def scenario():
        client = open_redis(server.url, 0.5)
        served = ServedItems(client, "test:served:", 0.5)
        try:
            t0 = 1_700_000_000.0  # the start of minute 28_333_333
            served.record([1, 2, 3, 4, 5], now=t0)
            served.record([4, 5, 6, 7, 8], now=t0 + 30)  # same minute: 8 distinct so far
            served.record([9, 10, 11, 12, 13], now=t0 + 61)  # next minute
            await served.drain()
            within = await served.count(now=t0 + 61)  # both minutes
            last_minute = await served.count(now=t0 + 61, minutes=1)
            later = await served.count(now=t0 + 3600 + 61)  # the first two minutes left the window
            ttl = await client.ttl(served.key(t0))
            return within, last_minute, later, ttl
        finally:
            await client.aclose()

    within, last_minute, later, ttl = run(scenario())
    assert (within, last_minute, later) == (13, 5, 0)  # HyperLogLog is exact at these sizes
    assert 0 < ttl <= 2 * 3600


def test_served_items_never_fails_when_redis_is_down():
    from service.coverage import ServedItems

    async def scenario():
        client = open_redis(f"redis://127.0.0.1:{free_ports(1)[0]}/0", 0.2)
        served = ServedItems(client, "x:", 0.2)
        served.record([1, 2])
        await served.drain()
        count = await served.count()
        await client.aclose()
        return count

    assert run(scenario()) is None
