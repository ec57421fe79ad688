"""What the gateway holds open: the Redis pool, the Triton client, the pinned catalog and its sync loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path

from onerec.errors import UsageError
from onerec.serving import layout
from service.blocklist import Blocklist
from service.catalog import Pinned, load_latest, load_version
from service.coverage import ServedItems
from service.history import RedisHistory, open_redis
from service.metrics import Metrics
from service.model_client import CircuitBreaker, ModelError, TritonModel
from service.recommender import Recommender
from service.schemas import Readiness
from service.settings import Settings

log = logging.getLogger(__name__)


class VersionPin:
    """Keeps the catalog of the model version Triton serves; on a hash mismatch the gateway serves popular items."""

    def __init__(self, model_dir: Path, model: TritonModel, metrics: Metrics) -> None:
        self.model_dir, self.model, self.metrics = model_dir, model, metrics
        self.current: Pinned | None = None
        self._lock = asyncio.Lock()

    async def load_local(self) -> None:
        """Before Triton answers: the newest version on disk, unmatched (popular answers only)."""
        self.current = await asyncio.to_thread(load_latest, self.model_dir)
        if self.current is None:
            log.warning("no exported model version under %s: /recommend answers 503 until one is there",
                        self.model_dir)

    async def sync(self) -> bool:
        """Ask Triton what it serves; load that version's catalog when it changed. True when pinned and matched."""
        async with self._lock:
            try:
                served = await self.model.served()
            except ModelError as e:
                log.debug("version sync: %s", e)
                return self.current is not None and self.current.matched
            cur = self.current
            if (cur is not None and cur.matched and cur.version == served.version
                    and cur.catalog.content_hash == served.catalog_hash and cur.bans_in_beam == served.bans_in_beam):
                return True
            try:
                pinned = await asyncio.to_thread(load_version, self.model_dir, served.version, served.catalog_hash)
            except UsageError as e:
                log.error("Triton serves version %s but its catalog cannot be read: %s", served.version, e)
                self.metrics.catalog_mismatches.inc()
                return False
            pinned = dataclasses.replace(pinned, bans_in_beam=served.bans_in_beam)
            if not served.bans_in_beam:
                log.warning("version %s has no %s input (exported before it existed): excluded and blocked videos "
                            "are filtered from its answers but not banned inside the beam search; re-export it",
                            served.version, layout.IN_BANNED)
            self.current = pinned
            if pinned.matched:
                log.info("pinned model version %s (catalog %s, %d items)", pinned.version,
                         pinned.catalog.content_hash[:12], pinned.catalog.num_items)
            else:
                log.error("version %s: %s; serving popular items until it matches", pinned.version, pinned.problem)
                self.metrics.catalog_mismatches.inc()
            return pinned.matched

    def pinned(self) -> Pinned | None:
        return self.current


class Services:
    """Opened by the app's lifespan, closed on shutdown; the routes reach it through dependencies."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.history = RedisHistory(open_redis(settings.redis_url, settings.redis_timeout_s),
                                    settings.history_prefix, settings.history_len, settings.redis_timeout_s)
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s)
        self.model = TritonModel(settings.triton_url, settings.model_name, settings.triton_timeout_s,
                                 settings.beam_width, settings.num_sessions, self.breaker)
        self.pin = VersionPin(Path(settings.model_repo) / settings.model_name, self.model, metrics)
        self.served = ServedItems(self.history.client, settings.served_prefix, settings.redis_timeout_s)
        self.blocklist = Blocklist(self.history.client, settings.blocked_key, settings.blocklist_ttl_s,
                                   settings.redis_timeout_s, metrics)
        self.recommender = Recommender(self.history, self.model, self.pin.pinned, metrics, settings.history_len,
                                       on_version_change=self.pin.sync, served=self.served,
                                       blocklist=self.blocklist, max_banned_sids=settings.max_banned_sids)
        self._task: asyncio.Task | None = None

    async def open(self) -> Services:
        await self.pin.load_local()
        await self.pin.sync()
        await self.blocklist.current()  # the first read before the first answer (a dead Redis is logged)
        self._task = asyncio.create_task(self._sync_loop(), name="onerec-version-sync")
        return self

    async def _sync_loop(self) -> None:
        while True:
            try:
                matched = await self.pin.sync()
            except Exception:  # the loop must outlive any one bad sync
                log.exception("version sync failed")
                matched = False
            self.metrics.breaker_open.set(int(self.breaker.state != "closed"))
            await self._update_gauges()
            await asyncio.sleep(self.settings.sync_interval_s if matched else min(1.0, self.settings.sync_interval_s))

    async def _update_gauges(self) -> None:
        """Catalog size and unique items served over the last hour (left as they were when Redis is down)."""
        pin = self.pin.pinned()
        if pin is not None:
            self.metrics.catalog_items.set(pin.catalog.num_items)
        unique = await self.served.count()
        if unique is not None:
            self.metrics.unique_items.labels("1h").set(unique)

    async def readiness(self) -> Readiness:
        redis_ok, triton_ok = await asyncio.gather(self.history.ping(), self.model.ready())
        pin = self.pin.pinned()
        catalog_ok = pin is not None and pin.matched
        ready = redis_ok and triton_ok and catalog_ok
        self.metrics.ready.set(int(ready))
        detail = None if ready else "; ".join(
            text for ok, text in ((redis_ok, "redis unreachable"), (triton_ok, "triton model not ready"),
                                  (catalog_ok, pin.problem if pin and pin.problem else "catalog not pinned"))
            if not ok)
        return Readiness(ready=ready, redis=redis_ok, triton=triton_ok, catalog=catalog_ok,
                         model_version=pin.version if pin else None, detail=detail)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.served.drain()
        await asyncio.gather(self.history.close(), self.model.close(), return_exceptions=True)
