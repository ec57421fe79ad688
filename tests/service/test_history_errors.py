"""RedisHistory's error mapping without a server: what becomes HistoryError (a 503) and what stays a bug."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from service.history import HistoryError, RedisHistory


async def _torn_down() -> None:
    raise AttributeError("'NoneType' object has no attribute 'writelines'")  # redis-py's cluster, mid-failover


def _store(client: object) -> RedisHistory:
    return RedisHistory(client, "onerec:history:", 256, timeout=1.0)  # type: ignore[arg-type]


def test_a_cluster_connection_torn_down_mid_command_is_redis_unavailable() -> None:
    cluster = object.__new__(aioredis.RedisCluster)  # the type is what counts; no connection is made
    with pytest.raises(HistoryError, match="connection torn down"):
        asyncio.run(_store(cluster)._bounded(_torn_down()))


def test_an_attribute_error_on_a_standalone_client_is_a_bug_and_propagates() -> None:
    with pytest.raises(AttributeError):
        asyncio.run(_store(object())._bounded(_torn_down()))


def test_a_timeout_is_redis_unavailable() -> None:
    store = _store(object())
    store.timeout = 0.01
    with pytest.raises(HistoryError, match="TimeoutError"):
        asyncio.run(store._bounded(asyncio.sleep(1)))
