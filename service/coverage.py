"""Unique items served: a per-minute Redis HyperLogLog that every gateway worker adds to, counted over a window."""

from __future__ import annotations

import asyncio
import logging
import time

from service.history import REDIS_ERRORS, AsyncClient

log = logging.getLogger(__name__)

WINDOW_MINUTES = 60  # the `window="1h"` of onerec_gateway_unique_items_served
KEY_TTL_S = 2 * 3600  # a minute's sketch outlives the window, then Redis drops it


class ServedItems:
    """PFADD the videos of every answer into `{prefix}{{model version}}:{epoch minute}`; PFCOUNT the window's keys
    as one union (per version, so that a canary's coverage compares with the primary's). The braces are a Redis
    Cluster hash tag: one version's minutes share a slot, so the one PFCOUNT over the window works in a cluster.

    HyperLogLog keeps the count shared across workers in 12 KiB per minute with ~0.8% standard error, where a
    per-video Prometheus label would be one series per catalog item. Failures are logged and never reach a request.
    """

    def __init__(self, client: AsyncClient, prefix: str, timeout: float) -> None:
        self.client, self.prefix, self.timeout = client, prefix, timeout
        self._pending: set[asyncio.Task] = set()

    def key(self, now: float, version: str = "") -> str:
        return f"{self.prefix}{{{version or '-'}}}:{int(now // 60)}"  # an empty tag {} would not be one

    def record(self, video_ids: list[int], now: float | None = None, version: str = "") -> None:
        """Add the videos answered by model `version` in the background (the answer does not wait for Redis)."""
        task = asyncio.get_running_loop().create_task(
            self._add(video_ids, time.time() if now is None else now, version))
        self._pending.add(task)  # the loop holds tasks only weakly
        task.add_done_callback(self._pending.discard)

    async def _add(self, video_ids: list[int], now: float, version: str) -> None:
        key = self.key(now, version)
        pipe = self.client.pipeline(transaction=False)
        pipe.pfadd(key, *video_ids)
        pipe.expire(key, KEY_TTL_S)
        try:
            async with asyncio.timeout(self.timeout):
                await pipe.execute()
        except REDIS_ERRORS as e:
            log.debug("served-items sketch not updated: %s", e)

    async def count(self, now: float | None = None, minutes: int = WINDOW_MINUTES, version: str = "") -> int | None:
        """Distinct videos `version` served in the last `minutes` (None when Redis does not answer)."""
        now = time.time() if now is None else now
        keys = [self.key(60.0 * m, version) for m in range(int(now // 60) - minutes + 1, int(now // 60) + 1)]
        try:
            async with asyncio.timeout(self.timeout):
                return int(await self.client.pfcount(*keys))
        except REDIS_ERRORS as e:
            log.debug("served-items count unavailable: %s", e)
            return None

    async def drain(self) -> None:
        """Wait for the additions in flight (shutdown, tests)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
