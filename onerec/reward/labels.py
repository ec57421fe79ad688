"""Logged sessions for the reward model: m-item windows of rated items, skipped impressions, 4 soft labels.

A logged session is a window of m consecutive *rated* items of one user (all ratings, not only positives), in
(timestamp, video id) order, with the user's positives before the window as history (most recent first, at
most `history_len`; windows with no positive before them are not made). Each slot is, with probability
`skip_prob` (seeded), replaced by a random catalog item the user never rated: an impression that was skipped.

Per-item labels (rating r, 1-5 stars; a skipped impression is 0 for every target):

    | target     | MovieLens (1-5 stars)                      | synthetic (5 = in interests, 1 = negative) |
    |------------|--------------------------------------------|--------------------------------------------|
    | swt watch  | (r - 1) / 4, clipped to [0, 1]             | 1 in-interest, 0 negative                  |
    | vtr view   | r >= 3                                     | 1 in-interest, 0 negative                  |
    | wtr follow | r >= 4 and r > the user's mean rating      | 1 in-interest, 0 negative (*)              |
    | ltr like   | r == 5                                     | 1 in-interest, 0 negative                  |

    (*) A user with no negative at all has mean 5, so never "follows": the only departure from the planted
    truth, and rare (probability 0.9**60 per user with the default negative rate).

A session's label for each target is the mean of its m item labels (a soft label in [0, 1]); on synthetic data
every target is therefore the planted truth: the share of the session's items inside the user's interests.
Watch is (r - 1) / 4 rather than r / 5 so that a 1-star item watches 0, like a skip: on synthetic data the
negatives then score 0 on every target. The user's mean rating is taken over the ratings before the user's
test target (below), so no held-out rating shapes a training label.

Split, mirroring `onerec.data.sessions.build_sessions` (positives p[0..n-1] by (timestamp, video id)): the test
target is p[n-m:n] and the validation target p[n-2m:n-m] when at least `min_history` positives precede them.
Windows lying wholly before the validation target's first item are training sessions; windows starting at or
after it and ending before the test target's first item are validation sessions (the user's last windows);
windows reaching the test target are never made, so `onerec evaluate` on the test split stays clean. Users
without a validation (or test) target keep the corresponding items in the earlier segment, as `prepare` does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onerec.config import DataConfig
from onerec.data.interactions import Interactions

log = logging.getLogger(__name__)

# Legend: E interactions, U users, S sessions (windows), m items per session, H history entries, T targets (4).

TARGETS = ("swt", "vtr", "wtr", "ltr")  # session watch time, view, follow, like: the tower order everywhere
VIEW_RATING = 3.0  # r >= this is a view
FOLLOW_RATING = 4.0  # r >= this and above the user's mean is a follow
LIKE_RATING = 5.0  # r == this is a like
MIN_RATING, MAX_RATING = 1.0, 5.0  # watch = (r - MIN) / (MAX - MIN)
MAX_SKIP_DRAWS = 64  # rejection-sampling rounds for never-rated items before a slot keeps its rated item

LABEL_MAPPING = {
    "swt": f"watch: (rating - {MIN_RATING:g}) / {MAX_RATING - MIN_RATING:g} clipped to [0, 1]; skipped 0",
    "vtr": f"view: rating >= {VIEW_RATING:g}; skipped 0",
    "wtr": f"follow: rating >= {FOLLOW_RATING:g} and rating > the user's mean rating before the test target; "
           "skipped 0",
    "ltr": f"like: rating == {LIKE_RATING:g}; skipped 0",
    "session": "mean of the m item labels (soft label in [0, 1])",
    "skipped": "with probability skip_prob a slot is replaced by a uniform random catalog item the user never rated",
}


@dataclass(frozen=True)
class LoggedSessions:
    """S logged sessions (windows) in video-id space with their labels; histories ragged (CSR)."""

    users: np.ndarray  # (S,) int64
    history: np.ndarray  # (H,) int64 video ids, each session's history most recent first, concatenated
    history_offsets: np.ndarray  # (S+1,) int64
    items: np.ndarray  # (S, m) int64 video ids shown, chronological (skipped slots hold the skipped item)
    ratings: np.ndarray  # (S, m) float32 rating of each slot, 0 where skipped
    skipped: np.ndarray  # (S, m) bool
    item_labels: np.ndarray  # (S, m, T) float32 per-item labels in TARGETS order
    labels: np.ndarray  # (S, T) float32 session labels = item_labels.mean(1)

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def history_of(self, i: int) -> np.ndarray:
        """Session i's history (video ids), most recent first."""
        return self.history[self.history_offsets[i] : self.history_offsets[i + 1]]


@dataclass(frozen=True)
class LoggedSplit:
    """Training and validation logged sessions (nothing reaches a test target)."""

    train: LoggedSessions
    val: LoggedSessions


@dataclass(frozen=True)
class _Timeline:
    """All interactions sorted by (user, timestamp, video id), with per-user runs and positive counts."""

    rows: Interactions  # (E,) sorted
    user_start: np.ndarray  # (U,) index of each user's first row
    user_count: np.ndarray  # (U,) rows per user
    positive: np.ndarray  # (E,) bool
    pos_before: np.ndarray  # (E,) positives of the same user strictly before the row
    pos_rows: np.ndarray  # (P,) indices of the positive rows, in order
    pos_start: np.ndarray  # (U,) index into pos_rows of each user's first positive
    pos_count: np.ndarray  # (U,) positives per user


def _ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """concat(arange(k) for k in lengths): (sum(lengths),) int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(ends - lengths, lengths)


def _timeline(interactions: Interactions, positive_rating: float) -> _Timeline:
    """Sort by (user, timestamp, video id) - the order `build_sessions` gives positives - and count positives."""
    rows = interactions.select(np.lexsort((interactions.items, interactions.timestamps, interactions.users)))
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows.users[1:] != rows.users[:-1]
    user_start = np.flatnonzero(first).astype(np.int64)
    user_count = np.diff(np.append(user_start, len(rows))).astype(np.int64)
    positive = rows.ratings >= positive_rating
    cum = np.cumsum(positive, dtype=np.int64)  # (E,) positives up to and including the row
    before_user = np.repeat(cum[user_start] - positive[user_start], user_count)  # positives of earlier users
    pos_before = cum - positive - before_user
    pos_count = np.add.reduceat(positive.astype(np.int64), user_start) if len(rows) else user_count
    pos_start = np.cumsum(pos_count) - pos_count
    return _Timeline(rows, user_start, user_count, positive, pos_before, np.flatnonzero(positive), pos_start,
                     pos_count)


def _cut(t: _Timeline, back: int, m: int, min_history: int, default: np.ndarray) -> np.ndarray:
    """(U,) local row index of each user's positive p[n - back*m] (a held-out target's first item) when
    `build_sessions` makes that target (>= min_history positives before it), else `default`."""
    k = t.pos_count - back * m  # (U,) which positive starts the target
    made = k >= max(min_history, 0)
    if not made.any():
        return default
    first_row = t.pos_rows[np.where(made, t.pos_start + k, 0)]  # (U,) global row (garbage where not made)
    return np.where(made, first_row - t.user_start, default)


def _window_starts(lo: np.ndarray, hi: np.ndarray, m: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(user index, local start) of windows s = lo, lo+stride, ... with s + m <= hi, chronological per user."""
    per_user = np.where(hi - lo >= m, (hi - lo - m) // stride + 1, 0)  # (U,)
    user = np.repeat(np.arange(len(lo), dtype=np.int64), per_user)
    return user, lo[user] + _ragged_arange(per_user) * stride


def user_mean_ratings(t: _Timeline, upto: np.ndarray) -> np.ndarray:
    """(U,) mean rating of each user's rows before local index `upto` (all rows when there are none before)."""
    local = np.arange(len(t.rows), dtype=np.int64) - np.repeat(t.user_start, t.user_count)
    keep = local < np.repeat(upto, t.user_count)
    user = np.repeat(np.arange(len(t.user_start)), t.user_count)
    total = np.bincount(user, weights=t.rows.ratings * keep, minlength=len(t.user_start))
    count = np.bincount(user, weights=keep, minlength=len(t.user_start))
    every = np.bincount(user, weights=t.rows.ratings, minlength=len(t.user_start)) / np.maximum(t.user_count, 1)
    return np.where(count > 0, total / np.maximum(count, 1), every).astype(np.float32)


def item_labels(ratings: np.ndarray, skipped: np.ndarray, user_mean: np.ndarray) -> np.ndarray:
    """Per-item labels (*, T) in TARGETS order from ratings (*), skipped (*) bool and the user's mean rating (*)."""
    ratings = np.asarray(ratings, dtype=np.float32)
    shown = ~np.asarray(skipped, dtype=bool)
    watch = np.clip((ratings - MIN_RATING) / (MAX_RATING - MIN_RATING), 0.0, 1.0) * shown
    view = (ratings >= VIEW_RATING) & shown
    follow = (ratings >= FOLLOW_RATING) & (ratings > user_mean) & shown
    like = (ratings == LIKE_RATING) & shown
    return np.stack([watch, view, follow, like], axis=-1).astype(np.float32)


def session_labels(item_level: np.ndarray) -> np.ndarray:
    """Session labels (S, T): the mean over the m items of item labels (S, m, T)."""
    return item_level.mean(axis=1).astype(np.float32)


def _skip_items(
    users: np.ndarray, skipped: np.ndarray, rated_keys: np.ndarray, candidates: np.ndarray, n_items: int,
    item_rank: np.ndarray, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """For each skipped slot (S, m) a uniform random candidate the user never rated.

    Returns (replacement video ids (S, m), where valid) and the skipped mask with slots that found no
    never-rated item within MAX_SKIP_DRAWS draws cleared (they keep their rated item)."""
    slot_user = np.broadcast_to(users[:, None], skipped.shape)[skipped]  # (Q,) user index of each skipped slot
    pick = rng.integers(0, len(candidates), size=slot_user.shape[0])  # (Q,) index into candidates
    pending = np.ones(slot_user.shape[0], dtype=bool)
    for _ in range(MAX_SKIP_DRAWS):
        keys = slot_user[pending] * n_items + item_rank[pick[pending]]
        pos = np.minimum(np.searchsorted(rated_keys, keys), max(len(rated_keys) - 1, 0))
        clash = rated_keys[pos] == keys if len(rated_keys) else np.zeros(len(keys), dtype=bool)
        idx = np.flatnonzero(pending)
        pending[idx[~clash]] = False
        if not pending.any():
            break
        pick[pending] = rng.integers(0, len(candidates), size=int(pending.sum()))
    replaced = np.zeros(skipped.shape, dtype=np.int64)
    replaced[skipped] = candidates[pick]
    kept = skipped.copy()
    kept[skipped] = ~pending
    return replaced, kept


def _rated_keys(t: _Timeline, item_space: np.ndarray) -> np.ndarray:
    """Sorted keys user_index * |item_space| + item rank of every (user, item) the user rated."""
    user = np.repeat(np.arange(len(t.user_start), dtype=np.int64), t.user_count)
    return np.unique(user * len(item_space) + np.searchsorted(item_space, t.rows.items))


def _make(
    t: _Timeline, user: np.ndarray, start: np.ndarray, m: int, history_len: int, user_mean: np.ndarray,
    candidates: np.ndarray, skip_prob: float, rng: np.random.Generator,
) -> LoggedSessions:
    """Sessions for windows (user index, local start): history, items, skips and labels."""
    first = t.user_start[user] + start  # (S,) global row of each window's first item
    window = first[:, None] + np.arange(m, dtype=np.int64)  # (S, m)
    ratings = t.rows.ratings[window]  # (S, m)
    lengths = np.minimum(t.pos_before[first], history_len)  # (S,)
    offsets = np.zeros(len(first) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    last_pos = t.pos_start[user] + t.pos_before[first] - 1  # (S,) index into pos_rows of the latest positive
    history = t.rows.items[t.pos_rows[np.repeat(last_pos, lengths) - _ragged_arange(lengths)]]  # (H,)
    skipped = rng.random(window.shape) < skip_prob  # (S, m)
    item_space = np.union1d(candidates, t.rows.items)
    replaced, skipped = _skip_items(user, skipped, _rated_keys(t, item_space), candidates, len(item_space),
                                    np.searchsorted(item_space, candidates), rng)
    items = np.where(skipped, replaced, t.rows.items[window])
    ratings = np.where(skipped, 0.0, ratings).astype(np.float32)
    per_item = item_labels(ratings, skipped, user_mean[user][:, None])  # (S, m, T)
    return LoggedSessions(
        users=t.rows.users[first], history=history, history_offsets=offsets, items=items, ratings=ratings,
        skipped=skipped, item_labels=per_item, labels=session_labels(per_item),
    )


def build_logged_sessions(
    interactions: Interactions, candidates: np.ndarray, data: DataConfig, *, history_len: int, stride: int = 1,
    skip_prob: float = 0.5, seed: int = 0, copies: int = 1,
) -> LoggedSplit:
    """Train/validation logged sessions with labels (module docstring: windows, skips, label table, split).

    `candidates` (N,) are the catalog's video ids: skipped impressions are drawn from them, and a window with
    an item outside them is dropped. `data` is the run's DataConfig (m, positive_rating, min_history). Each
    training window is made `copies` times with independent skip draws (more impressions of the same log);
    validation windows once. Deterministic given `seed`.
    """
    if min(stride, history_len, copies) < 1 or not 0.0 <= skip_prob <= 1.0:
        raise ValueError(f"stride {stride}, history_len {history_len} and copies {copies} must be >= 1, "
                         f"skip_prob in [0, 1] (got {skip_prob})")
    m = data.session_len
    candidates = np.unique(np.asarray(candidates, dtype=np.int64))
    t = _timeline(interactions, data.positive_rating)
    test_cut = _cut(t, 1, m, data.min_history, t.user_count)  # (U,) local index of the test target's first row
    val_cut = np.minimum(_cut(t, 2, m, data.min_history, test_cut), test_cut)
    user_mean = user_mean_ratings(t, test_cut)
    known = np.isin(t.rows.items, candidates)
    rng = np.random.default_rng(seed)
    splits = []
    for lo, hi, repeat in ((np.zeros_like(val_cut), val_cut, copies), (val_cut, test_cut, 1)):
        user, start = _window_starts(lo, hi, m, stride)
        first = t.user_start[user] + start
        ok = (t.pos_before[first] >= 1) & known[first[:, None] + np.arange(m)].all(axis=1)
        user, start = np.repeat(user[ok], repeat), np.repeat(start[ok], repeat)
        splits.append(_make(t, user, start, m, history_len, user_mean, candidates, skip_prob, rng))
    split = LoggedSplit(train=splits[0], val=splits[1])
    log.info("reward sessions: %d interactions, %d users -> train %d (x%d copies), val %d windows (m=%d, stride %d, "
             "skip %.2f)", len(interactions), len(t.user_start), len(split.train), copies, len(split.val), m, stride,
             skip_prob)
    return split
