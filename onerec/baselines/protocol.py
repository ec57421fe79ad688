"""The shared protocol: training matrix, held-out users as `evaluate` picks them, full-catalogue top-k, the metric."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from onerec.data.interactions import Interactions, item_rows
from onerec.data.sessions import Sessions
from onerec.eval import score_recommendations

log = logging.getLogger(__name__)

# Legend: N catalogue items, U training users, E held-out users, b a batch of them, k list length.

KS = (5, 10)
# (histories: b arrays of item rows, most recent first) -> (b, N) scores; higher is better
Scorer = Callable[[list[np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class TrainMatrix:
    """The training positives as a binary user x item matrix over the whole catalogue."""

    video_ids: np.ndarray  # (N,) int64 the catalogue, ascending (the tokenizer's `video_ids`)
    matrix: sp.csr_matrix  # (U, N) float64 1 where the user has a training positive
    sequences: list[np.ndarray]  # U arrays of item rows, chronological (timestamp, then video id)

    @property
    def num_items(self) -> int:
        return int(self.video_ids.shape[0])

    def rows_of(self, video_ids: np.ndarray) -> np.ndarray:
        """Item rows of `video_ids` (-1 where not in the catalogue)."""
        return item_rows(self.video_ids, video_ids)


def train_matrix(all_interactions: Interactions, train_interactions: Interactions) -> TrainMatrix:
    """Catalogue = every item seen (as `tokenize` builds it); rows = users of `train_interactions` (positives
    outside every val/test target, so nothing held out leaks)."""
    video_ids = np.unique(all_interactions.items)  # (N,)
    order = np.lexsort((train_interactions.items, train_interactions.timestamps, train_interactions.users))
    users = train_interactions.users[order]
    items = np.searchsorted(video_ids, train_interactions.items[order])  # (P,) rows, every item is in the catalogue
    user_ids, user_rows = np.unique(users, return_inverse=True)
    matrix = sp.csr_matrix((np.ones(len(items)), (user_rows, items)), shape=(len(user_ids), len(video_ids)))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0  # binary even if a user has the same positive twice
    starts = np.searchsorted(user_rows, np.arange(len(user_ids) + 1))
    sequences = [items[starts[u] : starts[u + 1]] for u in range(len(user_ids))]
    log.info("baselines: %d training users x %d items, %d positives", len(user_ids), len(video_ids), matrix.nnz)
    return TrainMatrix(video_ids=video_ids, matrix=matrix, sequences=sequences)


@dataclass(frozen=True)
class HeldOut:
    """The held-out users `evaluate` scores: those whose history has an item known to the catalogue."""

    histories: list[np.ndarray]  # E arrays of item rows, most recent first (what gets excluded)
    targets: np.ndarray  # (E, m) int64 video ids

    def __len__(self) -> int:
        return len(self.histories)


def held_out(sessions: Sessions, data: TrainMatrix, limit: int | None = None) -> HeldOut:
    """Same rows as `onerec.eval.evaluate`: sessions with at least one history item in the catalogue."""
    histories, rows = [], []
    for i in range(len(sessions)):
        known = data.rows_of(sessions.history_of(i))
        if (known >= 0).any():
            histories.append(known[known >= 0])
            rows.append(i)
    rows = rows[:limit] if limit else rows
    histories = histories[: len(rows)]
    if not rows:
        raise ValueError("no evaluable users: no held-out session has a history item known to the catalog")
    return HeldOut(histories=histories, targets=sessions.targets[np.asarray(rows, dtype=np.int64)])


def top_k(scores: np.ndarray, exclude: list[np.ndarray], k: int) -> np.ndarray:
    """(b, N) scores -> (b, k) item rows, best first; `exclude[i]` rows never appear for user i.

    Ties go to the lower item row (= lower video id): with popularity scores this is the catalogue's
    `most_popular` tie-break (popularity desc, then video id asc)."""
    scores = np.array(scores, dtype=np.float64)  # (b, N) a copy: masking must not touch the caller's
    for i, rows in enumerate(exclude):
        scores[i, rows] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (b, k)


def evaluate_scorer(scorer: Scorer, data: TrainMatrix, users: HeldOut, ks: tuple[int, ...] = KS,
                    batch_size: int = 256) -> dict[str, float]:
    """Rank the full catalogue for every held-out user, mask the history, and score the top max(ks) with
    `onerec.eval.score_recommendations`: {"recall@5", "ndcg@5", "recall@10", "ndcg@10"}."""
    depth = max(ks)
    lists = []
    for start in range(0, len(users), batch_size):
        chunk = users.histories[start : start + batch_size]
        lists.append(data.video_ids[top_k(scorer(chunk), chunk, depth)])  # (b, depth) video ids
    recommended = np.concatenate(lists)  # (E, depth)
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"recall@{k}"], metrics[f"ndcg@{k}"] = score_recommendations(recommended, users.targets, k)
    return metrics


def history_matrix(histories: list[np.ndarray], num_items: int) -> sp.csr_matrix:
    """(b, N) binary csr: row i has 1 at the item rows of histories[i]."""
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    rows = np.repeat(np.arange(len(histories)), lengths)
    cols = np.concatenate(histories) if len(histories) else np.zeros(0, dtype=np.int64)
    m = sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(histories), num_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m
