"""The Redis history store (DESIGN.md §4): LIST `onerec:history:{user_id}` of video ids, most recent first, capped."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

log = logging.getLogger(__name__)

RedisMode = Literal["standalone", "cluster"]
AsyncClient = aioredis.Redis | aioredis.RedisCluster
SyncClient = redis.Redis | redis.RedisCluster

# What a Redis call raises when Redis cannot serve it: a cluster client's own errors (no reachable seed, a slot
# no node serves) are not RedisErrors.
REDIS_ERRORS = (TimeoutError, redis.RedisError, RedisClusterException, OSError)

# A cluster client retries a command once after it re-read the slot map (a failed-over or moved master);
# every call is still bounded by the caller's timeout. A standalone client never retries on its own.
CLUSTER_RETRIES = 1


class HistoryError(Exception):
    """Redis did not answer (down, hanging past the timeout, or refusing the command)."""


@dataclass(frozen=True)
class History:
    """What LRANGE returned: video ids most recent first, and entries that were not integers (skipped)."""

    video_ids: list[int]
    malformed: int = 0


def history_key(prefix: str, user_id: str) -> str:
    """`{prefix}{<user_id>}` with literal braces: a Redis Cluster hash tag, so every key of one user shares a slot
    (user ids never hold braces: the API allows [A-Za-z0-9_:.-]). The same key in standalone mode."""
    return f"{prefix}{{{user_id}}}"


def legacy_history_key(prefix: str, user_id: str) -> str:
    """The key written before hash tags (`onerec:history:196`): what `onerec migrate-histories` renames."""
    return f"{prefix}{user_id}"


def open_redis(url: str, timeout: float, mode: RedisMode = "standalone") -> AsyncClient:
    """One pooled asyncio client (a RedisCluster seeded by `url` in cluster mode) whose every command is bounded
    by `timeout`; connections are opened lazily, so a gateway starts before its Redis does."""
    if mode == "cluster":
        return aioredis.RedisCluster.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                              retry=Retry(NoBackoff(), CLUSTER_RETRIES), decode_responses=True)
    return aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                             retry=Retry(NoBackoff(), 0), decode_responses=True)


def connect(url: str, mode: RedisMode = "standalone", timeout: float = 30.0) -> SyncClient:
    """A blocking client for the one-shot commands (load-histories, block, migrate-histories); in cluster mode
    it reads the slot map from the seed node `url` now, so a bad seed fails here with a RedisError."""
    if mode == "cluster":
        return redis.RedisCluster.from_url(url, socket_timeout=timeout, socket_connect_timeout=min(timeout, 5.0))
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=min(timeout, 5.0))


# LPUSH + LTRIM of one key, atomically: ARGV[1] is the cap, the rest the videos in watch order; the length pushed.
_APPEND = ("local n = redis.call('LPUSH', KEYS[1], unpack(ARGV, 2)) "
           "redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[1]) - 1) return n")


class RedisHistory:
    """Reads and appends users' histories; every failure becomes HistoryError within `timeout` seconds.

    With `wait_replicas` > 0 an append is acknowledged only once that many replicas of the key's master hold it
    (Redis WAIT), so a master killed right after it answered loses no acknowledged event: its replica has them."""

    def __init__(self, client: AsyncClient, prefix: str, cap: int, timeout: float, wait_replicas: int = 0) -> None:
        self.client = client
        self.prefix = prefix
        self.cap = cap
        self.timeout = timeout
        self.wait_replicas = wait_replicas

    @property
    def cluster(self) -> bool:
        return isinstance(self.client, aioredis.RedisCluster)

    async def recent(self, user_id: str) -> History:
        """The user's `cap` most recent videos (empty for a user Redis does not know: cold start)."""
        raw = await self._bounded(self.client.lrange(history_key(self.prefix, user_id), 0, self.cap - 1))
        ids, malformed = [], 0
        for value in raw:
            try:
                ids.append(int(value))
            except ValueError:
                malformed += 1
        return History(ids, malformed)

    async def append(self, user_id: str, video_ids: list[int]) -> int:
        """LPUSH (the last video ends up most recent) + LTRIM as one atomic step on one key (one slot in a cluster);
        then, with `wait_replicas`, WAIT for the replicas. The capped length after it.

        The step is a Lua script, which Redis runs as a transaction (nothing runs between the two commands), in both
        modes: redis-py's asyncio cluster MULTI/EXEC runs every queued command through `asyncio.run` in a new
        thread, and a slot-map refresh there opens connections bound to that thread's loop (broken afterwards).

        Returns only once Redis acknowledged it (and the replicas it); raises HistoryError otherwise, in which
        case the caller must retry (the append may or may not have happened: at-least-once)."""
        key = history_key(self.prefix, user_id)
        master = self._master_of(key)
        length = await self._bounded(self.client.eval(_APPEND, 1, key, self.cap, *video_ids))
        if self.wait_replicas:
            await self._replicated(key, master)
        return min(int(length), self.cap)

    def _master_of(self, key: str):
        """The cluster node the client will send `key` to now (None for a standalone client)."""
        if not self.cluster:
            return None
        try:
            return self.client.get_node_from_key(key)
        except (*REDIS_ERRORS, AttributeError, KeyError, IndexError):  # slot map not read yet
            return None

    async def _replicated(self, key: str, before) -> None:
        """WAIT on the master that ran the transaction; HistoryError unless `wait_replicas` replicas confirmed.

        In a cluster the master is the slot's owner after the transaction, which must be the one before it when the
        client knew one (a fresh client reads the slot map in the transaction itself): if the map changed in
        between (a failover), which node ran it is unknown and the append is refused rather than confirmed on a
        node that may not hold it."""
        wait_ms = max(1, int(self.timeout * 500))  # half the bound: WAIT answers before the socket times out
        if self.cluster:
            after = self._master_of(key)
            if after is None or (before is not None and before.name != after.name):
                raise HistoryError(f"redis: the slot of {key} moved during the append; not confirmed")
            acked = await self._bounded(self.client.execute_command("WAIT", self.wait_replicas, wait_ms,
                                                                    target_nodes=after))
        else:
            acked = await self._bounded(self.client.wait(self.wait_replicas, wait_ms))
        if int(acked) < self.wait_replicas:
            raise HistoryError(f"redis: stored on the master but {acked} of {self.wait_replicas} replica(s) "
                               f"confirmed within {wait_ms} ms")

    async def connect(self, timeout: float = 5.0) -> bool:
        """Read a cluster's slot map now, with a longer bound than a request's (a request that has to read it
        first would spend its whole timeout on it); False, and logged, when Redis does not answer: the client
        reads it again on first use. A standalone client connects on first use."""
        if not self.cluster:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self.client.initialize()
        except REDIS_ERRORS as e:
            log.error("redis cluster %s: slot map not read (%s: %s); retried on first use", self.describe(),
                      type(e).__name__, e)
            return False
        return True

    def describe(self) -> str:
        if not self.cluster:
            return "standalone"
        return ", ".join(node.name for node in self.client.get_nodes()) or "no nodes known"

    async def ping(self) -> bool:
        """Redis answers: PING (every master of a cluster, whose state must be `ok`: all slots served)."""
        try:
            if not self.cluster:
                return bool(await self._bounded(self.client.ping()))
            pong = await self._bounded(self.client.ping(target_nodes=aioredis.RedisCluster.PRIMARIES))
            info = await self._bounded(self.client.cluster_info())
            return bool(pong) and info.get("cluster_state") == "ok"
        except HistoryError:
            return False

    async def close(self) -> None:
        await self.client.aclose()

    async def _bounded(self, awaitable):
        try:
            async with asyncio.timeout(self.timeout):
                return await awaitable
        except REDIS_ERRORS as e:
            raise HistoryError(f"redis: {type(e).__name__}: {e}") from e
        except AttributeError as e:
            # redis-py 8.1's asyncio cluster client, on a connection a failover tore down mid-command, raises
            # "'NoneType' object has no attribute 'writelines'" (seen by `loadtest.chaos`): Redis unavailable, a
            # 503 the caller may retry, not a 500. Anywhere else an AttributeError is a bug and propagates.
            if not self.cluster:
                raise
            raise HistoryError(f"redis cluster: connection torn down mid-command ({e})") from e


def _batches(histories: Iterable[tuple[str, list[int]]], size: int) -> Iterator[list[tuple[str, list[int]]]]:
    batch: list[tuple[str, list[int]]] = []
    for item in histories:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# DEL + RPUSH of one key as one atomic script: per user atomic in both modes (a reader never sees a half-written
# history), pipelined per batch (per master in a cluster, where a MULTI may not span the batch's slots).
_REPLACE = "redis.call('DEL', KEYS[1]) if #ARGV > 0 then redis.call('RPUSH', KEYS[1], unpack(ARGV)) end return #ARGV"


def bulk_load(client: SyncClient, histories: Iterable[tuple[str, list[int]]], prefix: str, cap: int,
              batch: int = 500, progress=None) -> tuple[int, int]:
    """Replace each user's history (most recent first), one atomic script per user, pipelined in batches;
    (users, videos) written.

    `progress`, if given, is called with the number of users written after each batch (e.g. tqdm.update)."""
    users = videos = 0
    for chunk in _batches(histories, batch):
        scripts = [(history_key(prefix, user_id), video_ids[:cap]) for user_id, video_ids in chunk]
        if isinstance(client, redis.RedisCluster):
            _run_per_master(client, scripts)
        else:
            _run_pipelined(client, scripts)
        videos += sum(len(ids) for _, ids in scripts)
        users += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return users, videos


def _run_pipelined(client: redis.Redis, scripts: list[tuple[str, list[int]]]) -> None:
    pipe = client.pipeline(transaction=False)
    for key, ids in scripts:
        pipe.eval(_REPLACE, 1, key, *ids)
    pipe.execute()


def _run_per_master(client: redis.RedisCluster, scripts: list[tuple[str, list[int]]], attempts: int = 3) -> None:
    """One pipeline per master of the keys it serves (redis-py's cluster pipeline takes no scripts); on a moved
    slot (a failover, a reshard) the slot map is read again and the batch replayed: the script is idempotent."""
    for attempt in range(attempts):
        by_node: dict[str, tuple[redis.Redis, list[tuple[str, list[int]]]]] = {}
        for key, ids in scripts:
            node = client.get_node_from_key(key)
            by_node.setdefault(node.name, (node.redis_connection, []))[1].append((key, ids))
        try:
            for node_client, items in by_node.values():
                _run_pipelined(node_client, items)
            return
        except (redis.ConnectionError, redis.ResponseError) as e:
            if attempt == attempts - 1 or (isinstance(e, redis.ResponseError) and "MOVED" not in str(e)
                                           and "CLUSTERDOWN" not in str(e)):
                raise
            log.warning("bulk load: %s; reading the slot map again", e)
            time.sleep(0.5)
            client.nodes_manager.initialize()


# Move one legacy key into its hash-tagged key: the tagged key's entries (events the new gateways stored) stay
# first, the legacy ones (older) follow, capped; then the legacy key is deleted. One script: atomic per user.
_MIGRATE = """
local old = redis.call('LRANGE', KEYS[1], 0, -1)
if #old == 0 then return 0 end
local room = tonumber(ARGV[1]) - redis.call('LLEN', KEYS[2])
local moved = 0
for i = 1, math.min(#old, math.max(room, 0)) do redis.call('RPUSH', KEYS[2], old[i]); moved = moved + 1 end
redis.call('DEL', KEYS[1])
return moved
"""


def migrate_history_keys(client: redis.Redis, prefix: str, cap: int, batch: int = 500) -> tuple[int, int]:
    """Rename every pre-hash-tag history `{prefix}{user_id}` to `{prefix}{{user_id}}`, merged with what the
    tagged key already holds (its entries first: they are newer); (users, videos) moved. Idempotent: keys already
    tagged are left alone, so it can run before a deploy and again after the last old gateway is gone.

    Standalone Redis only: the two keys of a user hash to different cluster slots, so one script cannot move them
    there. Migrate on the standalone server, then copy the keys into the cluster."""
    if isinstance(client, redis.RedisCluster):
        raise ValueError("migrate-histories runs on a standalone Redis (the legacy and tagged keys of a user "
                         "live in different cluster slots); migrate there, then import the keys into the cluster")
    users = videos = 0
    legacy: list[str] = []

    def flush() -> None:
        nonlocal users, videos
        pipe = client.pipeline(transaction=False)
        for key in legacy:
            pipe.eval(_MIGRATE, 2, key, history_key(prefix, key[len(prefix):]), cap)
        videos += sum(int(moved) for moved in pipe.execute())
        users += len(legacy)
        legacy.clear()

    for raw in client.scan_iter(match=_glob_escape(prefix) + "*", count=batch, _type="list"):
        key = raw.decode() if isinstance(raw, bytes) else raw
        if "{" in key[len(prefix):]:
            continue  # already tagged
        legacy.append(key)
        if len(legacy) == batch:
            flush()
    if legacy:
        flush()
    return users, videos


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
