"""The Redis history store, bulk loader, key migration and served-items sketch against a real redis-server and a
real local Redis Cluster (3 masters); the dataset's latest histories."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import redis
from redis.crc import key_slot

from onerec.data.interactions import Interactions
from onerec.data.sessions import latest_histories
from service.coverage import ServedItems
from service.history import (
    HistoryError,
    RedisHistory,
    bulk_load,
    history_key,
    migrate_history_keys,
    open_redis,
)
from service.settings import Settings
from stack.probes import free_ports
from tests.conftest import run_cli
from tests.redis_backends import MODES, RedisBackend, cluster_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=MODES)
def server(request, tmp_path_factory):
    with RedisBackend(request.param, tmp_path_factory.mktemp(f"redis-{request.param}")) as backend:
        yield backend


def run(coro):
    return asyncio.run(coro)


def store_for(server, cap: int = 4, timeout: float = 0.5, wait_replicas: int = 0) -> RedisHistory:
    return RedisHistory(open_redis(server.url, timeout, server.mode), "test:h:", cap, timeout, wait_replicas)


def dead_url() -> str:
    return f"redis://127.0.0.1:{free_ports(1)[0]}/0"


# --- keys ------------------------------------------------------------------------------------------------------


def test_the_history_key_is_a_hash_tag_on_the_user_id():
    assert history_key("onerec:history:", "196") == "onerec:history:{196}"  # DESIGN.md §4, literally
    # every key of one user hashes to the slot of the user id alone, whatever the prefix
    assert key_slot(history_key("onerec:history:", "it:user-1").encode()) == key_slot(b"it:user-1")
    assert key_slot(history_key("other:", "it:user-1").encode()) == key_slot(b"it:user-1")


def test_one_versions_served_sketches_share_a_slot():
    served = ServedItems(None, "onerec:served:", 0.1)
    minutes = [served.key(60.0 * m, "3") for m in range(28_000_000, 28_000_060)]
    assert minutes[0] == "onerec:served:{3}:28000000"
    assert {key_slot(k.encode()) for k in minutes} == {key_slot(b"3")}
    assert len({key_slot(served.key(60.0 * m).encode()) for m in range(100)}) == 1  # no version: tag "-"


@pytest.mark.parametrize("field", ["history_prefix", "served_prefix"])
def test_a_prefix_with_braces_is_refused(field):
    with pytest.raises(ValueError, match="must not contain"):
        Settings(**{field: "onerec:{x}:"})


def test_cluster_mode_takes_one_seed_url_on_database_0():
    assert Settings(redis_mode="cluster", redis_url="redis://10.0.0.5:7000").redis_mode == "cluster"
    with pytest.raises(ValueError, match="database 0 only"):
        Settings(redis_mode="cluster", redis_url="redis://10.0.0.5:7000/3")
    with pytest.raises(ValueError, match="redis_mode"):
        Settings(redis_mode="sentinel")


# --- the store, in both modes ----------------------------------------------------------------------------------


def test_append_is_most_recent_first_and_capped(server):
    async def scenario():
        store = store_for(server)
        try:
            assert (await store.recent("a")).video_ids == []  # cold start, not an error
            assert await store.append("a", [1, 2, 3]) == 3
            assert await store.append("a", [4, 5]) == 4  # capped at 4
            assert await store.ping()
            return await store.recent("a")
        finally:
            await store.close()

    assert run(scenario()).video_ids == [5, 4, 3, 2]
    assert server.client().lrange("test:h:{a}", 0, -1) == [b"5", b"4", b"3", b"2"]


def test_users_spread_over_every_master(server):
    """Many users in one cluster land on all three masters, each user's transaction on one of them."""
    users = [f"spread-{i}" for i in range(60)]

    async def scenario():
        store = store_for(server)
        try:
            for i, user in enumerate(users):
                await store.append(user, [i, i + 1])
            return [await store.recent(user) for user in users]
        finally:
            await store.close()

    assert [h.video_ids for h in run(scenario())] == [[i + 1, i] for i in range(len(users))]
    if server.mode == "cluster":
        masters = {server.server.master_of(history_key("test:h:", user)).port for user in users}
        assert len(masters) == 3


def test_malformed_entries_are_skipped_and_counted(server):
    server.client().rpush("test:h:{m}", "7", "oops", "8")

    async def scenario():
        store = store_for(server)
        try:
            return await store.recent("m")
        finally:
            await store.close()

    history = run(scenario())
    assert history.video_ids == [7, 8] and history.malformed == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_dead_redis_fails_fast_with_history_error(mode):
    async def scenario():
        store = RedisHistory(open_redis(dead_url(), 0.3, mode), "test:h:", 4, 0.3)
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            assert not await store.ping()
            with pytest.raises(HistoryError):
                await store.recent("a")
            with pytest.raises(HistoryError):
                await store.append("a", [1])
        finally:
            await store.close()
        return loop.time() - start

    assert run(scenario()) < 3.0


def test_a_hanging_redis_is_bounded_by_the_timeout(server):
    async def scenario():
        store = store_for(server, timeout=0.3)
        loop = asyncio.get_running_loop()
        try:
            assert await store.ping()  # connected (and, in a cluster, the slot map read) before the hang
            server.pause()
            start = loop.time()
            with pytest.raises(HistoryError):
                await store.recent("a")
            with pytest.raises(HistoryError):
                await store.append("a", [1])
            assert not await store.ping()
            return loop.time() - start
        finally:
            server.resume()
            await store.close()

    assert run(scenario()) < 2.0


def test_waiting_for_a_replica_that_is_not_there_refuses_the_event(server):
    """With wait_replicas=1 and no replica, WAIT confirms 0 replicas: the append raises (so /events answers 503),
    although the master stored it (at-least-once: the client's retry may store it twice)."""
    async def scenario():
        store = store_for(server, timeout=0.3, wait_replicas=1)
        try:
            with pytest.raises(HistoryError, match="0 of 1 replica"):
                await store.append("w", [42])
        finally:
            await store.close()

    run(scenario())
    assert server.client().lrange("test:h:{w}", 0, -1) == [b"42"]


def test_bulk_load_replaces_histories(server):
    client = server.client()
    client.rpush("test:b:{1}", "99")
    seen = []
    users, videos = bulk_load(client, [("1", [3, 2, 1]), ("2", [9]), ("3", [])], "test:b:", cap=2, batch=2,
                              progress=seen.append)
    assert (users, videos) == (3, 3) and seen == [2, 1]
    assert client.lrange("test:b:{1}", 0, -1) == [b"3", b"2"]
    assert client.lrange("test:b:{2}", 0, -1) == [b"9"] and not client.exists("test:b:{3}")


def test_latest_histories_hand_worked():
    # user 1: positives at t=1 (video 10), t=3 (30), t=2 (20); a negative (rating 2) is ignored. user 2: one.
    interactions = Interactions(users=np.array([1, 1, 1, 1, 2]), items=np.array([10, 30, 20, 40, 50]),
                                ratings=np.array([5, 4, 4, 2, 5], dtype=np.float32),
                                timestamps=np.array([1, 3, 2, 4, 1]))
    got = {u: h.tolist() for u, h in latest_histories(interactions, 4.0, cap=2)}
    assert got == {1: [30, 20], 2: [50]}


def keys(client, pattern: str) -> list[bytes]:
    return list(client.scan_iter(match=pattern, count=1000))


def test_load_histories_command(server, tiny_run):
    from onerec.data.sessions import Sessions

    code, out, err = run_cli("load-histories", "--run", tiny_run, "--redis-url", server.url, "--redis-mode",
                             server.mode, "--prefix", "cli:", "--cap", "8", "--batch", "64")
    assert code == 0, err
    summary = read_json_line(out)
    client = server.client()
    loaded = keys(client, "cli:*")
    assert summary["users"] == len(loaded) > 0
    assert all(k.startswith(b"cli:{") and k.endswith(b"}") for k in loaded)
    assert all(client.llen(k) <= 8 for k in loaded)
    assert summary["videos"] == sum(client.llen(k) for k in loaded)

    test = Sessions.load(tiny_run / "data" / "sessions_test.npz")
    code, out, err = run_cli("load-histories", "--run", tiny_run, "--redis-url", server.url, "--redis-mode",
                             server.mode, "--prefix", "cli-test:", "--histories", "test")
    assert code == 0, err
    user = str(int(test.users[0]))
    stored = [int(v) for v in client.lrange(f"cli-test:{{{user}}}", 0, -1)]
    assert stored == test.history_of(0).tolist()  # most recent first, as the model saw it


@pytest.mark.parametrize("mode", MODES)
def test_load_histories_reports_a_dead_redis(tiny_run, mode):
    url = dead_url() if mode == "standalone" else f"redis://127.0.0.1:{cluster_port(1)}/0"
    code, _, err = run_cli("load-histories", "--run", tiny_run, "--redis-url", url, "--redis-mode", mode)
    assert code == 2 and "--redis-url" in err and len(err.strip().splitlines()) == 1


def read_json_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# --- migrating the keys written before hash tags ---------------------------------------------------------------


def test_migrate_histories_merges_legacy_keys_and_is_idempotent(tmp_path):
    with RedisBackend("standalone", tmp_path / "redis") as srv:
        client = srv.client()
        client.rpush("mig:1", 30, 20, 10)  # written by an old gateway (most recent first)
        client.rpush("mig:2", 7)
        client.rpush("mig:{2}", 9, 8)  # a new gateway already stored newer events for user 2
        client.rpush("mig:3", *range(10))
        client.rpush("mig:{3}", *range(100, 104))  # 4 new + 10 old > cap 6: the oldest go
        client.rpush("mig:{4}", 1)  # already tagged: left alone
        client.set("mig:not-a-list", "x")  # another type under the prefix: left alone
        code, out, err = run_cli("migrate-histories", "--redis-url", srv.url, "--prefix", "mig:", "--cap", "6",
                                 "--batch", "2")
        assert code == 0, err
        assert json.loads(out) == {"users": 3, "videos": 3 + 1 + 2}
        assert client.lrange("mig:{1}", 0, -1) == [b"30", b"20", b"10"]
        assert client.lrange("mig:{2}", 0, -1) == [b"9", b"8", b"7"]
        assert client.lrange("mig:{3}", 0, -1) == [b"100", b"101", b"102", b"103", b"0", b"1"]
        assert client.lrange("mig:{4}", 0, -1) == [b"1"] and client.get("mig:not-a-list") == b"x"
        assert not client.exists("mig:1", "mig:2", "mig:3")
        assert migrate_history_keys(client, "mig:", 6) == (0, 0)  # nothing left to move


def test_migrate_histories_refuses_a_cluster():
    class FakeCluster(redis.RedisCluster):
        def __init__(self) -> None:  # no connection: the refusal comes first
            pass

    with pytest.raises(ValueError, match="standalone Redis"):
        migrate_history_keys(FakeCluster(), "mig:", 6)


# --- unique items served ---------------------------------------------------------------------------------------


def test_served_items_counts_distinct_videos_over_the_window(server):
    async def scenario():
        client = open_redis(server.url, 0.5, server.mode)
        served = ServedItems(client, "test:served:", 0.5)
        try:
            t0 = 1_700_000_000.0  # the start of minute 28_333_333
            served.record([1, 2, 3, 4, 5], now=t0, version="1")
            served.record([4, 5, 6, 7, 8], now=t0 + 30, version="1")  # same minute: 8 distinct so far
            served.record([9, 10, 11, 12, 13], now=t0 + 61, version="1")  # next minute
            served.record([50, 51], now=t0 + 61, version="2")  # another version, counted apart
            await served.drain()
            within = await served.count(now=t0 + 61, version="1")  # both minutes
            last_minute = await served.count(now=t0 + 61, minutes=1, version="1")
            later = await served.count(now=t0 + 3600 + 61, version="1")  # the first two minutes left the window
            other = await served.count(now=t0 + 61, version="2")
            ttl = await client.ttl(served.key(t0, "1"))
            return within, last_minute, later, other, ttl
        finally:
            await client.aclose()

    within, last_minute, later, other, ttl = run(scenario())
    assert (within, last_minute, later, other) == (13, 5, 0, 2)  # HyperLogLog is exact at these sizes
    assert 0 < ttl <= 2 * 3600


@pytest.mark.parametrize("mode", MODES)
def test_served_items_never_fails_when_redis_is_down(mode):
    async def scenario():
        client = open_redis(dead_url(), 0.2, mode)
        served = ServedItems(client, "x:", 0.2)
        served.record([1, 2])
        await served.drain()
        count = await served.count()
        await client.aclose()
        return count

    assert run(scenario()) is None


def test_connect_reads_the_slot_map_up_front_or_says_why_not(server, caplog):
    async def scenario(url: str):
        store = RedisHistory(open_redis(url, 0.3, server.mode), "test:h:", 4, 0.3)
        try:
            return await store.connect(timeout=1.0), await store.ping()
        finally:
            await store.close()

    assert run(scenario(server.url)) == (True, True)
    with caplog.at_level("ERROR", logger="service.history"):
        assert run(scenario(dead_url())) == (server.mode == "standalone", False)
    assert ("slot map not read" in caplog.text) == (server.mode == "cluster")
