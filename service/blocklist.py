"""The global blocklist (DESIGN.md §4): Redis SET `onerec:blocked` of video ids, read through a short TTL cache.

Operators SADD/SREM the set (or run `onerec block|unblock`); the gateway re-reads it at most every `ttl_s` seconds,
so a blocked video leaves every answer within ttl_s + the Redis timeout. When Redis does not answer, the last set
read stays in force (logged once per outage, `onerec_gateway_blocklist_stale` = 1): a failing dependency degrades
to a slightly old blocklist, it never fails a request or forgets what was blocked. One key, so one slot in a
Redis Cluster: SMEMBERS and the block/unblock transaction work the same in both modes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from service.history import REDIS_ERRORS, AsyncClient, SyncClient
from service.metrics import Metrics

log = logging.getLogger(__name__)


class Blocklist:
    """`current()` is the blocked video ids, fresh to within `ttl_s`; one SMEMBERS per expiry, however many ask."""

    def __init__(self, client: AsyncClient, key: str, ttl_s: float, timeout: float, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.key = key
        self.ttl_s = ttl_s
        self.timeout = timeout
        self.metrics = metrics
        self.clock = clock
        self.ids: frozenset[int] = frozenset()
        self.checked_at: float | None = None  # when Redis was last asked (answered or not)
        self.loaded = False  # the set was read at least once
        self.stale = False  # the last read failed: `ids` is the last known set
        self._lock = asyncio.Lock()

    async def current(self) -> frozenset[int]:
        """The blocked ids; re-read when older than ttl_s (concurrent callers wait for the one read in flight)."""
        if self._fresh():
            return self.ids
        async with self._lock:
            if not self._fresh():
                await self._refresh()
        return self.ids

    def _fresh(self) -> bool:
        return self.checked_at is not None and self.clock() - self.checked_at < self.ttl_s

    async def _refresh(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                members = await self.client.smembers(self.key)
        except REDIS_ERRORS as e:
            self.checked_at = self.clock()  # a dead Redis is asked again after ttl_s, not by every request
            self._failed(f"{type(e).__name__}: {e}")
            return
        self.checked_at = self.clock()
        ids, malformed = parse_ids(members)
        if malformed:
            log.warning("blocklist %s: %d members are not video ids (ignored)", self.key, malformed)
        if self.stale:
            log.info("blocklist %s readable again: %d videos blocked", self.key, len(ids))
        self.ids, self.loaded, self.stale = ids, True, False
        self.metrics.blocklist_size.set(len(ids))
        self.metrics.blocklist_stale.set(0)

    def _failed(self, reason: str) -> None:
        self.metrics.blocklist_refresh_failures.inc()
        self.metrics.blocklist_stale.set(1)
        if not self.stale:  # once per outage, not once per ttl
            kept = f"keeping the last known {len(self.ids)} blocked videos" if self.loaded else (
                "never read yet: nothing is blocked until it is")
            log.error("blocklist %s unreadable (redis: %s); %s", self.key, reason, kept)
        self.stale = True


def parse_ids(members: Iterable[str | bytes]) -> tuple[frozenset[int], int]:
    """SET members as video ids (ints >= 0), and how many members were not one."""
    ids, malformed = set(), 0
    for member in members:
        try:
            value = int(member)
        except ValueError:
            malformed += 1
            continue
        if value < 0:
            malformed += 1
        else:
            ids.add(value)
    return frozenset(ids), malformed


@dataclass(frozen=True)
class BlockChange:
    """What `onerec block|unblock` did: the ids whose state changed, those already so, and the set's size after."""

    key: str
    changed: list[int]
    unchanged: list[int]
    size: int


def change_blocklist(client: SyncClient, key: str, video_ids: list[int], block: bool) -> BlockChange:
    """SADD (block) or SREM (unblock) the ids, one transaction; which ids changed is read in the same MULTI/EXEC."""
    ordered = list(dict.fromkeys(int(v) for v in video_ids))
    pipe = client.pipeline(transaction=True)
    for video in ordered:  # one command per id: its reply says whether that id changed
        (pipe.sadd if block else pipe.srem)(key, video)
    pipe.scard(key)
    *replies, size = pipe.execute()
    changed = [v for v, reply in zip(ordered, replies, strict=True) if reply]
    unchanged = [v for v, reply in zip(ordered, replies, strict=True) if not reply]
    return BlockChange(key, changed, unchanged, int(size))
