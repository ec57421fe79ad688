"""POST /recommend's pipeline: Redis history -> SIDs -> Triton -> videos via the inverted index -> 5 items.

Every failing dependency degrades to popular items with a reason; nothing here knows HTTP."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from onerec.recommend import sessions_to_videos
from service.catalog import Pinned
from service.coverage import ServedItems
from service.history import History, HistoryError
from service.metrics import Metrics
from service.model_client import ModelAnswer, ModelError
from service.schemas import SESSION_ITEMS

log = logging.getLogger(__name__)

# Shapes legend: n history items, L levels, R sessions, m items per session.


class HistoryStore(Protocol):
    async def recent(self, user_id: str) -> History: ...
    async def append(self, user_id: str, video_ids: list[int]) -> int: ...
    async def ping(self) -> bool: ...


class ModelClient(Protocol):
    async def infer(self, history_sids: np.ndarray, exclude_history: bool, request_id: str = "") -> ModelAnswer: ...


class NoCatalogError(Exception):
    """No model version's catalog is loaded: not even popular items can be served."""


@dataclass(frozen=True)
class Outcome:
    video_ids: list[int]  # exactly SESSION_ITEMS distinct videos
    source: str  # model | popular
    model_version: str | None
    fallback_reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (redis, triton, mapping)


class Recommender:
    """Holds the store, the model client and the pinned catalog; `recommend` never raises for a dependency."""

    def __init__(self, store: HistoryStore, model: ModelClient, pinned: Callable[[], Pinned | None],
                 metrics: Metrics, history_len: int, on_version_change: Callable[[], Awaitable[None]] | None = None,
                 served: ServedItems | None = None):
        self.store, self.model, self.pinned, self.metrics = store, model, pinned, metrics
        self.served = served  # unique-items sketch (None: not tracked)
        self.history_len = history_len
        self.on_version_change = on_version_change
        self._resyncs: set[asyncio.Task] = set()

    async def recommend(self, user_id: str, exclude_seen: bool = True, history: list[int] | None = None,
                        request_id: str = "") -> Outcome:
        """The session for `user_id`; `history` (video ids, most recent first) overrides Redis when given."""
        outcome = await self._recommend(user_id, exclude_seen, history, request_id)
        if self.served is not None:
            self.served.record(outcome.video_ids)
        return outcome

    async def _recommend(self, user_id: str, exclude_seen: bool, history: list[int] | None,
                         request_id: str) -> Outcome:
        videos: list[int] | None = history
        reason: str | None = None
        timings: dict[str, float] = {}
        if videos is None:
            try:
                with self._stage("redis", timings):
                    stored = await self.store.recent(user_id)
                videos = stored.video_ids
                if stored.malformed:
                    self.metrics.unknown_videos.inc(stored.malformed)
            except HistoryError as e:
                log.warning("user %s: history unavailable (%s); serving popular items", user_id, e)
                reason = "redis_unavailable"
        pin = self.pinned()
        if pin is None:
            raise NoCatalogError("no model version's catalog is loaded (is model_repo mounted?)")
        seen = videos or []
        if reason is None:
            reason, answer = await self._generate(pin, seen, exclude_seen, request_id, timings)
            if reason is None:
                return self._map(pin, answer, seen if exclude_seen else [], timings)
        return self._popular(pin, seen if exclude_seen else [], reason, timings)

    async def _generate(self, pin: Pinned, videos: list[int], exclude_seen: bool,
                        request_id: str, timings: dict[str, float]) -> tuple[str | None, ModelAnswer | None]:
        """(fallback reason or None, the model's answer)."""
        window = videos[: self.history_len]
        known = pin.catalog.known_sids(window)  # (n', L) most recent first
        if len(known) < len(window):
            self.metrics.unknown_videos.inc(len(window) - len(known))
        known = known[: pin.max_history]
        self.metrics.history_length.observe(len(known))
        if len(known) == 0:
            return "cold_start", None
        if not pin.matched:
            return "catalog_mismatch", None
        try:
            with self._stage("triton", timings):
                answer = await self.model.infer(known, exclude_seen, request_id)
        except ModelError as e:
            log.warning("triton: %s (%s); serving popular items", e.reason, e)
            return e.reason, None
        if answer.model_version != pin.version:
            log.warning("triton answered with version %s but the gateway pinned %s; re-syncing",
                        answer.model_version, pin.version)
            self.metrics.catalog_mismatches.inc()
            if self.on_version_change is not None:  # keep a reference: the loop holds tasks only weakly
                task = asyncio.get_running_loop().create_task(self.on_version_change())
                self._resyncs.add(task)
                task.add_done_callback(self._resyncs.discard)
            return "catalog_mismatch", None
        return None, answer

    def _map(self, pin: Pinned, answer: ModelAnswer, seen: list[int], timings: dict[str, float]) -> Outcome:
        with self._stage("mapping", timings):
            catalog = pin.catalog
            R, m, L = answer.sessions.shape
            leaves = catalog.trie.leaf_of(answer.sessions.reshape(R * m, L)).reshape(R, m)  # (R, m), -1 = invalid
            invalid = int((leaves < 0).sum())
            if invalid:
                log.error("triton returned %d SIDs outside the catalog of version %s", invalid, pin.version)
                self.metrics.invalid_sids.inc(invalid)
            rec = sessions_to_videos(catalog, leaves, exclude=seen, k=SESSION_ITEMS)
            best = leaves[0][leaves[0] >= 0]
            shared = np.diff(catalog.inverted_offsets)[best] > 1  # SIDs several videos share
            self.metrics.collision_hits.inc(int(shared.sum()))
            self.metrics.model_items.inc(rec.from_model)
            self.metrics.backfilled_items.inc(rec.backfilled)
            self.metrics.recommendations.labels("model").inc()
        return Outcome(rec.video_ids, "model", pin.version, timings=timings)

    def _popular(self, pin: Pinned, seen: list[int], reason: str, timings: dict[str, float]) -> Outcome:
        self.metrics.fallbacks.labels(reason).inc()
        self.metrics.recommendations.labels("popular").inc()
        videos = [int(v) for v in pin.catalog.most_popular(SESSION_ITEMS, exclude=seen)]
        if len(videos) < SESSION_ITEMS:  # the user has seen nearly the whole catalog: repeat rather than shrink
            videos += [int(v) for v in pin.catalog.most_popular(SESSION_ITEMS) if v not in videos]
        return Outcome(videos[:SESSION_ITEMS], "popular", pin.version, reason, timings)

    @contextmanager
    def _stage(self, stage: str, timings: dict[str, float]):
        start = time.perf_counter()
        try:
            yield
        finally:
            timings[stage] = time.perf_counter() - start
            self.metrics.stage_seconds.labels(stage).observe(timings[stage])
