"""Chosen/rejected session selection for iterative preference alignment (paper Algorithm 2) and user sampling.

Legend: U users, N generated sessions per user, P kept pairs; sessions may carry any trailing shape
((m,) video ids or (m, L) semantic ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onerec.errors import UsageError


@dataclass(frozen=True, eq=False)
class PreferencePairs:
    """One (chosen, rejected) pair per kept user; all arrays shape (P,)."""

    users: np.ndarray  # (P,) int64 row into the U users, ascending
    chosen: np.ndarray  # (P,) int64 index into N of the best-scored session
    rejected: np.ndarray  # (P,) int64 index into N of the worst-scored session
    chosen_score: np.ndarray  # (P,) float64
    rejected_score: np.ndarray  # (P,) float64

    def __len__(self) -> int:
        return len(self.users)


def best_worst(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the index of the best and of the worst session, each (U,).

    Ties: the best is the lowest index among the maxima, the worst the highest index among the minima. With
    sessions in beam-rank order this keeps the more likely of tied best sessions as chosen and the less likely of
    tied worst sessions as rejected, and it never picks the same index for both unless all N scores are equal.
    """
    scores = _check_scores(scores)
    n = scores.shape[1]
    best = np.argmax(scores, axis=1)  # (U,) first occurrence = lowest index
    worst = n - 1 - np.argmin(scores[:, ::-1], axis=1)  # (U,) last occurrence = highest index
    return best.astype(np.int64), worst.astype(np.int64)


def select_pairs(scores: np.ndarray, min_margin: float = 0.0) -> PreferencePairs:
    """Chosen = best, rejected = worst session per user, keeping users with best - worst > min_margin.

    scores (U, N) finite rewards of each user's N generated sessions. With the default `min_margin` = 0, users whose
    best and worst scores tie (no preference signal) are skipped.
    """
    scores = _check_scores(scores)
    if not (math.isfinite(min_margin) and min_margin >= 0):
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    best, worst = best_worst(scores)
    rows = np.arange(scores.shape[0])
    best_score, worst_score = scores[rows, best], scores[rows, worst]  # (U,)
    keep = np.flatnonzero(best_score - worst_score > min_margin)  # (P,)
    return PreferencePairs(
        users=keep.astype(np.int64),
        chosen=best[keep],
        rejected=worst[keep],
        chosen_score=best_score[keep],
        rejected_score=worst_score[keep],
    )


def gather_pairs(sessions: np.ndarray, pairs: PreferencePairs) -> tuple[np.ndarray, np.ndarray]:
    """sessions (U, N, ...) -> (chosen (P, ...), rejected (P, ...)) sessions of the kept users."""
    if sessions.ndim < 2:
        raise ValueError(f"sessions must be (U, N, ...), got shape {sessions.shape}")
    return sessions[pairs.users, pairs.chosen], sessions[pairs.users, pairs.rejected]


def sample_users(n_users: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """ceil(ratio * n_users) >= 1 distinct user indices, ascending int64 (the paper's r_DPO = 1%)."""
    if n_users < 1:
        raise UsageError(f"need at least one user to sample from, got {n_users}")
    if not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
        raise UsageError(f"user sample ratio must be in (0, 1], got {ratio}")
    count = min(n_users, max(1, math.ceil(round(ratio * n_users, 9))))  # round: 0.07 * 100 is 7.000000000000001
    return np.sort(rng.choice(n_users, size=count, replace=False)).astype(np.int64)


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be (U, N) with N >= 1, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores
