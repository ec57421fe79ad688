"""The Redis history store (DESIGN.md §4): LIST `onerec:history:{user_id}` of video ids, most recent first, capped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)


class HistoryError(Exception):
    """Redis did not answer (down, hanging past the timeout, or refusing the command)."""


@dataclass(frozen=True)
class History:
    """What LRANGE returned: video ids most recent first, and entries that were not integers (skipped)."""

    video_ids: list[int]
    malformed: int = 0


def history_key(prefix: str, user_id: str) -> str:
    return f"{prefix}{user_id}"


def open_redis(url: str, timeout: float) -> aioredis.Redis:
    """One pooled asyncio client whose every command is bounded by `timeout` and never retried on its own."""
    return aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                             retry=Retry(NoBackoff(), 0), decode_responses=True)


class RedisHistory:
    """Reads and appends users' histories; every failure becomes HistoryError within `timeout` seconds."""

    def __init__(self, client: aioredis.Redis, prefix: str, cap: int, timeout: float) -> None:
        self.client, self.prefix, self.cap, self.timeout = client, prefix, cap, timeout

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
        """LPUSH (the last video ends up most recent) + LTRIM in one MULTI/EXEC; the capped length after it.

        Returns only once Redis acknowledged the transaction; raises HistoryError otherwise, in which
        case the caller must retry (the append may or may not have happened: at-least-once)."""
        key = history_key(self.prefix, user_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.lpush(key, *video_ids)
        pipe.ltrim(key, 0, self.cap - 1)
        length, _ = await self._bounded(pipe.execute())
        return min(int(length), self.cap)

    async def ping(self) -> bool:
        try:
            return bool(await self._bounded(self.client.ping()))
        except HistoryError:
            return False

    async def close(self) -> None:
        await self.client.aclose()

    async def _bounded(self, awaitable):
        try:
            async with asyncio.timeout(self.timeout):
                return await awaitable
        except (TimeoutError, redis.RedisError, OSError) as e:
            raise HistoryError(f"redis: {type(e).__name__}: {e}") from e


def _batches(histories: Iterable[tuple[str, list[int]]], size: int) -> Iterator[list[tuple[str, list[int]]]]:
    batch: list[tuple[str, list[int]]] = []
    for item in histories:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def bulk_load(client: redis.Redis, histories: Iterable[tuple[str, list[int]]], prefix: str, cap: int,
              batch: int = 500, progress=None) -> tuple[int, int]:
    """Replace each user's history (most recent first) with pipelined MULTI/EXEC batches; (users, videos) written.

    `progress`, if given, is called with the number of users written after each batch (e.g. tqdm.update)."""
    users = videos = 0
    for chunk in _batches(histories, batch):
        pipe = client.pipeline(transaction=True)
        for user_id, video_ids in chunk:
            key = history_key(prefix, user_id)
            pipe.delete(key)
            if video_ids:
                pipe.rpush(key, *video_ids[:cap])
            videos += min(len(video_ids), cap)
        pipe.execute()
        users += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return users, videos
