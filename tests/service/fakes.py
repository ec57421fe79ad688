"""Fakes for the gateway's unit tests: a hand-worked catalog, an in-memory history store, a scripted model."""

from __future__ import annotations

import asyncio

import numpy as np

from onerec.tokenizer.catalog import Catalog
from service.catalog import Pinned
from service.history import History, HistoryError
from service.model_client import ModelAnswer, ModelError

# Leaves in lexicographic SID order: 0:(0,0)->[50]  1:(0,1)->[20,10]  2:(1,0)->[30]  3:(1,1)->[40]  4:(1,2)->[60]
# 5:(2,0)->[70]. Popularity order: 20, 60, 40, 10, 50, 70, 30.
VIDEOS = [10, 20, 30, 40, 50, 60, 70]
SIDS = [[0, 1], [0, 1], [1, 0], [1, 1], [0, 0], [1, 2], [2, 0]]
POPULARITY = [5, 9, 1, 7, 3, 8, 2]
# The scripted model's answer: best session (0,1) (1,0) (0,1), next session (1,1) (2,0) (0,0).
SESSIONS = np.array([[[0, 1], [1, 0], [0, 1]], [[1, 1], [2, 0], [0, 0]]], dtype=np.int32)  # (R=2, m=3, L=2)


def catalog() -> Catalog:
    return Catalog.build(np.array(VIDEOS), np.array(SIDS), np.array(POPULARITY), num_codes=3)


def pinned(matched: bool = True, version: str = "7", max_history: int = 4, bans_in_beam: bool = True) -> Pinned:
    return Pinned(version, catalog(), max_history, matched, None if matched else "hash differs", bans_in_beam)


class FakeStore:
    """Histories in a dict (most recent first); `down=True` makes every call fail like a dead Redis."""

    def __init__(self, histories: dict[str, list[int]] | None = None, down: bool = False, cap: int = 256):
        self.histories = {k: list(v) for k, v in (histories or {}).items()}
        self.down, self.cap = down, cap

    async def recent(self, user_id: str) -> History:
        if self.down:
            raise HistoryError("redis: ConnectionError: connection refused")
        return History(self.histories.get(user_id, [])[: self.cap])

    async def append(self, user_id: str, video_ids: list[int]) -> int:
        if self.down:
            raise HistoryError("redis: ConnectionError: connection refused")
        self.histories[user_id] = (list(reversed(video_ids)) + self.histories.get(user_id, []))[: self.cap]
        return len(self.histories[user_id])

    async def ping(self) -> bool:
        return not self.down


class FakeModel:
    """Answers SESSIONS (or `sessions`) as `version`; `error` makes it fail with that reason; `gate` holds calls."""

    def __init__(self, sessions: np.ndarray = SESSIONS, version: str = "7", error: str | None = None,
                 gate: asyncio.Event | None = None):
        self.sessions, self.version, self.error, self.gate = sessions, version, error, gate
        self.calls: list[tuple[np.ndarray, bool]] = []
        self.banned: list[np.ndarray | None] = []  # BANNED_SIDS of each call
        self.versions: list[str] = []  # the version each call asked for

    async def infer(self, history_sids: np.ndarray, exclude_history: bool, request_id: str = "",
                    banned_sids: np.ndarray | None = None, version: str = "") -> ModelAnswer:
        self.calls.append((np.asarray(history_sids).copy(), exclude_history))
        self.versions.append(version)
        self.banned.append(None if banned_sids is None else np.asarray(banned_sids).copy())
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise ModelError(self.error, f"scripted {self.error}")
        scores = -np.arange(len(self.sessions), dtype=np.float32)
        return ModelAnswer(self.sessions, scores, self.version)


class FakeBlocklist:
    """The blocked ids the Recommender reads (`ids` may change between calls, like operators' SADDs)."""

    def __init__(self, ids: set[int] | None = None) -> None:
        self.ids = set(ids or ())
        self.reads = 0

    async def current(self) -> frozenset[int]:
        self.reads += 1
        return frozenset(self.ids)
