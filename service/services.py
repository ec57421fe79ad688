"""What the gateway holds open: the Redis pool, the Triton replicas' clients, the pinned catalog and its sync loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path

from onerec.errors import UsageError
from onerec.serving import layout
from service.blocklist import Blocklist
from service.canary import in_canary
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
    """The catalogs of the versions Triton serves: the primary and, during a canary, the candidate that a stable
    share of users goes to. A version whose catalog does not match is never routed to: a mismatched primary
    serves popular items, a mismatched canary sends its users back to the primary."""

    def __init__(self, model_dir: Path, model: TritonModel, metrics: Metrics) -> None:
        self.model_dir = model_dir
        self.model = model
        self.metrics = metrics
        self.current: Pinned | None = None  # the primary
        self.canary: Pinned | None = None  # the candidate (matched), None without a canary
        self.canary_share = 0.0
        self._lock = asyncio.Lock()

    async def load_local(self) -> None:
        """Before Triton answers: the newest version on disk, unmatched (popular answers only)."""
        self.current = await asyncio.to_thread(load_latest, self.model_dir)
        if self.current is None:
            log.warning("no exported model version under %s: /recommend answers 503 until one is there",
                        self.model_dir)

    async def sync(self) -> bool:
        """Ask Triton what it serves; load the catalogs that changed. True when the primary is pinned and matched."""
        async with self._lock:
            try:
                served = await self.model.served()
            except ModelError as e:
                log.debug("version sync: %s", e)
                return self.current is not None and self.current.matched
            primary = await self._pin(served.version, served.catalog_hash, served.bans_in_beam)
            if primary is not None:
                self.current = primary
            canary = None
            if served.canary_version is not None:
                canary = await self._pin(served.canary_version, served.canary_catalog_hash, served.bans_in_beam)
                if canary is not None and not canary.matched:
                    log.error("canary version %s: %s; its users stay on version %s", canary.version, canary.problem,
                              served.version)
                    canary = None
            if canary is not None and (self.canary is None or self.canary.version != canary.version
                                       or self.canary_share != served.canary_share):
                log.info("canary: version %s for %.1f%% of users", canary.version, 100 * served.canary_share)
            self.canary, self.canary_share = canary, served.canary_share if canary is not None else 0.0
            return primary is not None and primary.matched

    async def _pin(self, version: str, catalog_hash: str, bans: bool) -> Pinned | None:
        """The pin already held for this matched version (primary or canary: a promotion reads nothing), else that
        version's catalog read and checked (None when it cannot be read)."""
        for held in self.versions():
            if (held.matched and held.version == version and held.catalog.content_hash == catalog_hash
                    and held.bans_in_beam == bans):
                return held
        try:
            pinned = await asyncio.to_thread(load_version, self.model_dir, version, catalog_hash)
        except UsageError as e:
            log.error("Triton serves version %s but its catalog cannot be read: %s", version, e)
            self.metrics.catalog_mismatches.inc()
            return None
        pinned = dataclasses.replace(pinned, bans_in_beam=bans)
        if not bans:
            log.warning("version %s has no %s input (exported before it existed): excluded and blocked videos "
                        "are filtered from its answers but not banned inside the beam search; re-export it",
                        version, layout.IN_BANNED)
        if pinned.matched:
            self.metrics.initialise_version(version)
            log.info("pinned model version %s (catalog %s, %d items)", version, pinned.catalog.content_hash[:12],
                     pinned.catalog.num_items)
        else:
            log.error("version %s: %s; serving popular items until it matches", version, pinned.problem)
            self.metrics.catalog_mismatches.inc()
        return pinned

    def pinned(self, user_id: str = "") -> Pinned | None:
        """The version that answers `user_id`: the canary for its share of users, else the primary."""
        canary = self.canary
        if canary is not None and user_id and in_canary(user_id, canary.version, self.canary_share):
            return canary
        return self.current

    def versions(self) -> list[Pinned]:
        return [pin for pin in (self.current, self.canary) if pin is not None]


class Services:
    """Opened by the app's lifespan, closed on shutdown; the routes reach it through dependencies."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.history = RedisHistory(open_redis(settings.redis_url, settings.redis_timeout_s, settings.redis_mode),
                                    settings.history_prefix, settings.history_len, settings.redis_timeout_s,
                                    settings.redis_wait_replicas)
        self.model = TritonModel(settings.triton_targets, settings.model_name, settings.triton_timeout_s,
                                 settings.beam_width, settings.num_sessions,
                                 lambda: CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s),
                                 attempts=settings.triton_attempts)
        self.pin = VersionPin(Path(settings.model_repo) / settings.model_name, self.model, metrics)
        self.served = ServedItems(self.history.client, settings.served_prefix, settings.redis_timeout_s)
        self.blocklist = Blocklist(self.history.client, settings.blocked_key, settings.blocklist_ttl_s,
                                   settings.redis_timeout_s, metrics)
        self.recommender = Recommender(self.history, self.model, self.pin.pinned, metrics, settings.history_len,
                                       on_version_change=self.pin.sync, served=self.served,
                                       blocklist=self.blocklist, max_banned_sids=settings.max_banned_sids,
                                       new_item_share=settings.new_item_share)
        self._task: asyncio.Task | None = None
        self._gauge_versions: set[str] = set()  # the versions the per-version gauges are published for

    async def open(self) -> Services:
        await self.pin.load_local()
        await self.history.connect()  # a cluster's slot map, before the first request needs it
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
            self.metrics.breaker_open.set(int(self.model.circuit_open))  # open on every replica
            await self._update_gauges()
            await asyncio.sleep(self.settings.sync_interval_s if matched else min(1.0, self.settings.sync_interval_s))

    async def _update_gauges(self) -> None:
        """Per served version: catalog size, canary share and unique items served over the last hour (left as they
        were when Redis is down); a version no longer served leaves these gauges."""
        served = {pin.version: pin for pin in self.pin.versions()}
        for gone in self._gauge_versions - set(served):
            for gauge, labels in ((self.metrics.catalog_items, (gone,)), (self.metrics.canary_share, (gone,)),
                                  (self.metrics.unique_items, ("1h", gone))):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        self._gauge_versions = set(served)
        canary = self.pin.canary
        for version, pin in served.items():
            self.metrics.catalog_items.labels(version).set(pin.catalog.num_items)
            share = self.pin.canary_share if canary is not None and canary.version == version else 0.0
            self.metrics.canary_share.labels(version).set(share)
            unique = await self.served.count(version=version)
            if unique is not None:
                self.metrics.unique_items.labels("1h", version).set(unique)

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
        canary = self.pin.canary
        return Readiness(ready=ready, redis=redis_ok, triton=triton_ok, catalog=catalog_ok,
                         model_version=pin.version if pin else None,
                         canary_version=canary.version if canary is not None else None,
                         canary_share=self.pin.canary_share if canary is not None else 0.0, detail=detail)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.served.drain()
        await asyncio.gather(self.history.close(), self.model.close(), return_exceptions=True)
