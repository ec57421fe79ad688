"""POST /recommend's pipeline: Redis history -> SIDs -> Triton -> videos via the inverted index -> 5 items.

Every failing dependency degrades to popular items with a reason; nothing here knows HTTP. Excluded and blocked
videos are banned inside the beam search (as SIDs) and filtered from every source: model, backfill, popular."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from onerec.recommend import fully_banned_leaves, sessions_to_videos
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
    async def infer(self, history_sids: np.ndarray, exclude_history: bool, request_id: str = "",
                    banned_sids: np.ndarray | None = None, version: str = "") -> ModelAnswer: ...


class BlockedVideos(Protocol):
    async def current(self) -> frozenset[int]: ...


class NoBlocklist:
    """Nothing blocked (a Recommender built without the Redis blocklist)."""

    async def current(self) -> frozenset[int]:
        return frozenset()


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
    """Holds the store, the model client and the pinned catalogs; `recommend` never raises for a dependency.

    `pinned(user_id)` is the version that answers that user (the primary, or the canary for its share of users):
    its catalog maps the history, Triton is asked for exactly that version, and its catalog maps the answer."""

    def __init__(self, store: HistoryStore, model: ModelClient, pinned: Callable[[str], Pinned | None],
                 metrics: Metrics, history_len: int, on_version_change: Callable[[], Awaitable[None]] | None = None,
                 served: ServedItems | None = None, blocklist: BlockedVideos | None = None,
                 max_banned_sids: int = 16384, new_item_share: float = 0.0):
        self.store, self.model, self.pinned, self.metrics = store, model, pinned, metrics
        self.served = served  # unique-items sketch (None: not tracked)
        self.blocklist = blocklist or NoBlocklist()
        self.max_banned_sids = max_banned_sids  # SIDs sent to the beam search per request
        self.new_item_share = new_item_share  # slots new items may take by prefix match (sessions_to_videos)
        self.history_len = history_len
        self.on_version_change = on_version_change
        self._resyncs: set[asyncio.Task] = set()

    async def recommend(self, user_id: str, exclude_seen: bool = True, history: list[int] | None = None,
                        request_id: str = "", exclude: list[int] | None = None) -> Outcome:
        """The session for `user_id`; `history` (video ids, most recent first) overrides Redis when given.
        No video of `exclude` or of the blocklist is in the answer, whatever its source."""
        start = time.perf_counter()
        outcome = await self._recommend(user_id, exclude_seen, history, request_id, exclude or [])
        version = outcome.model_version or ""
        self.metrics.recommend_seconds.labels(version).observe(time.perf_counter() - start)
        if self.served is not None:
            self.served.record(outcome.video_ids, version=version)
        return outcome

    async def _recommend(self, user_id: str, exclude_seen: bool, history: list[int] | None,
                         request_id: str, exclude: list[int]) -> Outcome:
        never = frozenset(exclude) | await self.blocklist.current()  # never in the answer, from any source
        videos: list[int] | None = history
        reason: str | None = None
        timings: dict[str, float] = {}
        pin = self.pinned(user_id)  # one version for the whole request: its catalog maps history and answer
        if pin is None:
            raise NoCatalogError("no model version's catalog is loaded (is model_repo mounted?)")
        if videos is None:
            try:
                with self._stage("redis", timings, pin.version):
                    stored = await self.store.recent(user_id)
                videos = stored.video_ids
                if stored.malformed:
                    self.metrics.unknown_videos.labels(pin.version).inc(stored.malformed)
            except HistoryError as e:
                log.warning("user %s: history unavailable (%s); serving popular items", user_id, e)
                reason = "redis_unavailable"
        if exclude:
            self.metrics.unknown_excluded.labels(pin.version).inc(int((pin.catalog.rows_of(exclude) < 0).sum()))
        seen = videos or []
        if reason is None:
            reason, answer = await self._generate(pin, seen, exclude_seen, never, exclude, request_id, timings)
            if reason is None:
                never |= await self.blocklist.current()  # blocked while Triton answered: filtered all the same
                return self._map(pin, answer, [*(seen if exclude_seen else []), *never], timings)
        return self._popular(pin, seen if exclude_seen else [], never, reason, timings)

    def _banned_sids(self, pin: Pinned, never: frozenset[int], exclude: list[int]) -> np.ndarray | None:
        """The SIDs (k, L) of `never` for the beam search: only SIDs none of whose videos is allowed, the request's
        own exclusions first when there are more than max_banned_sids (the rest are filtered after the search)."""
        if not never or not pin.bans_in_beam:
            return None
        catalog = pin.catalog
        leaves = fully_banned_leaves(catalog, never)  # (k,)
        if len(leaves) > self.max_banned_sids:
            requested = np.isin(leaves, catalog.leaves_of(exclude))
            leaves = np.concatenate([leaves[requested], leaves[~requested]])[: self.max_banned_sids]
        return catalog.unique_sids[leaves] if len(leaves) else None

    async def _generate(self, pin: Pinned, videos: list[int], exclude_seen: bool, never: frozenset[int],
                        exclude: list[int], request_id: str,
                        timings: dict[str, float]) -> tuple[str | None, ModelAnswer | None]:
        """(fallback reason or None, the model's answer)."""
        window = videos[: self.history_len]
        known = pin.catalog.known_sids(window)  # (n', L) most recent first
        if len(known) < len(window):
            self.metrics.unknown_videos.labels(pin.version).inc(len(window) - len(known))
        known = known[: pin.max_history]
        self.metrics.history_length.labels(pin.version).observe(len(known))
        if len(known) == 0:
            return "cold_start", None
        if not pin.matched:
            return "catalog_mismatch", None
        banned = self._banned_sids(pin, never, exclude)  # (k, L) or None
        try:
            with self._stage("triton", timings, pin.version):
                answer = await self.model.infer(known, exclude_seen, request_id, banned, pin.version)
        except ModelError as e:
            log.warning("triton: %s (%s); serving popular items", e.reason, e)
            if e.reason == "version_unavailable":  # a rollout unloaded the pinned version: follow it
                self._resync()
            return e.reason, None
        if answer.model_version != pin.version:
            log.warning("triton answered with version %s but the gateway pinned %s; re-syncing",
                        answer.model_version, pin.version)
            self.metrics.catalog_mismatches.inc()
            self._resync()
            return "catalog_mismatch", None
        return None, answer

    def _resync(self) -> None:
        if self.on_version_change is not None:  # keep a reference: the loop holds tasks only weakly
            task = asyncio.get_running_loop().create_task(self.on_version_change())
            self._resyncs.add(task)
            task.add_done_callback(self._resyncs.discard)

    def _map(self, pin: Pinned, answer: ModelAnswer, seen: list[int], timings: dict[str, float]) -> Outcome:
        version = pin.version
        with self._stage("mapping", timings, version):
            catalog = pin.catalog
            R, m, L = answer.sessions.shape
            leaves = catalog.trie.leaf_of(answer.sessions.reshape(R * m, L)).reshape(R, m)  # (R, m), -1 = invalid
            invalid = int((leaves < 0).sum())
            if invalid:
                log.error("triton returned %d SIDs outside the catalog of version %s", invalid, pin.version)
                self.metrics.invalid_sids.labels(version).inc(invalid)
            rec = sessions_to_videos(catalog, leaves, exclude=seen, k=SESSION_ITEMS, new_share=self.new_item_share)
            best = leaves[0][leaves[0] >= 0]
            shared = np.diff(catalog.inverted_offsets)[best] > 1  # SIDs several videos share
            self.metrics.collision_hits.labels(version).inc(int(shared.sum()))
            self.metrics.model_items.labels(version).inc(rec.from_model)
            self.metrics.backfilled_items.labels(version).inc(rec.backfilled)
            self.metrics.new_items.labels(version).inc(rec.new_items)
            self.metrics.recommendations.labels("model", version).inc()
        return Outcome(rec.video_ids, "model", pin.version, timings=timings)

    def _popular(self, pin: Pinned, seen: list[int], never: frozenset[int], reason: str,
                 timings: dict[str, float]) -> Outcome:
        self.metrics.fallbacks.labels(reason, pin.version).inc()
        self.metrics.recommendations.labels("popular", pin.version).inc()
        catalog = pin.catalog
        videos = [int(v) for v in catalog.most_popular(SESSION_ITEMS, exclude=[*seen, *never])]
        if len(videos) < SESSION_ITEMS:  # the user has seen nearly the whole catalog: repeat rather than shrink
            refill = catalog.most_popular(2 * SESSION_ITEMS, exclude=never)  # never an excluded or blocked one
            videos += [int(v) for v in refill if v not in videos]
        return Outcome(videos[:SESSION_ITEMS], "popular", pin.version, reason, timings)

    @contextmanager
    def _stage(self, stage: str, timings: dict[str, float], version: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            timings[stage] = time.perf_counter() - start
            self.metrics.stage_seconds.labels(stage, version).observe(timings[stage])
