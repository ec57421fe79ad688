"""Sessions (history of positives -> next m positives) and the per-user train/val/test split."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onerec.config import DataConfig
from onerec.data.interactions import Interactions, load_npz, save_npz_atomic
from onerec.errors import UsageError

log = logging.getLogger(__name__)

# Legend: S sessions, H total history entries, m items per target, G users with positives, P positives.


@dataclass(frozen=True)
class Sessions:
    """S sessions; histories are ragged, so they are stored concatenated with CSR offsets."""

    users: np.ndarray  # (S,) int64
    history: np.ndarray  # (H,) int64 video ids, each session's history most recent first, concatenated
    history_offsets: np.ndarray  # (S+1,) int64; session i's history = history[offsets[i]:offsets[i+1]]
    targets: np.ndarray  # (S, m) int64 video ids, chronological; -1 pads a shorter target at its end

    def __post_init__(self) -> None:
        users = np.asarray(self.users, dtype=np.int64)
        history = np.asarray(self.history, dtype=np.int64)
        offsets = np.asarray(self.history_offsets, dtype=np.int64)
        targets = np.asarray(self.targets, dtype=np.int64)
        s = users.shape[0] if users.ndim == 1 else -1
        if (
            s < 0 or history.ndim != 1 or targets.ndim != 2 or targets.shape[0] != s
            or offsets.shape != (s + 1,) or offsets[0] != 0 or offsets[-1] != history.shape[0]
            or np.any(np.diff(offsets) < 0)
        ):
            raise ValueError(
                f"Sessions: inconsistent shapes users {users.shape}, history {history.shape}, "
                f"history_offsets {offsets.shape}, targets {targets.shape}"
            )
        for name, array in (("users", users), ("history", history), ("history_offsets", offsets),
                            ("targets", targets)):
            object.__setattr__(self, name, array)

    def __len__(self) -> int:
        return int(self.users.shape[0])

    @property
    def session_len(self) -> int:
        """m, the number of items in each target."""
        return int(self.targets.shape[1])

    @property
    def history_lengths(self) -> np.ndarray:
        """(S,) int64 number of history items of each session."""
        return np.diff(self.history_offsets)

    def history_of(self, i: int) -> np.ndarray:
        """Session i's history, most recent first."""
        return self.history[self.history_offsets[i] : self.history_offsets[i + 1]]

    def save(self, path: Path) -> None:
        """Write one .npz atomically (tmp + rename)."""
        save_npz_atomic(path, {
            "users": self.users, "history": self.history,
            "history_offsets": self.history_offsets, "targets": self.targets,
        })

    @classmethod
    def load(cls, path: Path) -> Sessions:
        """Read a file written by `save`; UsageError naming the file if it is missing or corrupt."""
        arrays = load_npz(path, ("users", "history", "history_offsets", "targets"), "sessions")
        try:
            return cls(**arrays)
        except ValueError as exc:
            raise UsageError(f"{path}: corrupt sessions file ({exc})") from exc


@dataclass(frozen=True)
class SessionSplit:
    """Per-user chronological split: last target is test, the one before it validation, earlier ones train."""

    train: Sessions
    val: Sessions
    test: Sessions
    train_interactions: Interactions  # positives NOT inside any user's val or test target (no leakage)


@dataclass(frozen=True)
class _Grouped:
    """Positives sorted by (user, timestamp, video id), grouped by user."""

    positives: Interactions  # (P,) sorted
    user_ids: np.ndarray  # (G,) int64 the users, ascending
    starts: np.ndarray  # (G,) int64 index of each user's first positive in `positives`
    counts: np.ndarray  # (G,) int64 n, each user's number of positives


PROTOCOLS = ("session", "leave_one_out")


def _check(cfg: DataConfig) -> None:
    """UsageError naming the first DataConfig option that cannot work."""
    if cfg.protocol not in PROTOCOLS:
        raise UsageError(f"data.protocol: unknown protocol {cfg.protocol!r}; use {' or '.join(PROTOCOLS)}")
    for name in ("session_len", "train_stride"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"data.{name}: must be >= 1, got {getattr(cfg, name)}")
    for name in ("history_len", "min_history"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"data.{name}: must be >= 0, got {getattr(cfg, name)}")


def group_positives(interactions: Interactions, positive_rating: float) -> _Grouped:
    """Keep rating >= positive_rating, sort by (user, timestamp, video id) and find each user's run."""
    pos = interactions.positives(positive_rating)
    pos = pos.select(np.lexsort((pos.items, pos.timestamps, pos.users)))
    first = np.ones(len(pos), dtype=bool)  # (P,) True where a new user's run begins
    first[1:] = pos.users[1:] != pos.users[:-1]
    starts = np.flatnonzero(first)  # (G,)
    counts = np.diff(np.append(starts, len(pos)))
    return _Grouped(pos, pos.users[starts], starts.astype(np.int64), counts.astype(np.int64))


def _ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """concat(arange(k) for k in lengths), vectorised: (sum(lengths),) int64."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    return np.arange(total, dtype=np.int64) - np.repeat(ends - lengths, lengths)


def _make_sessions(
    g: _Grouped, group: np.ndarray, local_start: np.ndarray, m: int, max_history: int, end: np.ndarray | None = None
) -> Sessions:
    """Sessions whose target is user group[i]'s positives local_start[i] .. local_start[i]+m-1; with `end` (G,),
    only those before the user's local position end[group[i]], -1 filling the rest of the row."""
    start = g.starts[group] + local_start  # (S,) index into g.positives
    items = g.positives.items
    span = start[:, None] + np.arange(m, dtype=np.int64)  # (S, m)
    if end is None:
        targets = items[span]
    else:
        inside = (local_start[:, None] + np.arange(m, dtype=np.int64)) < end[group][:, None]
        targets = np.where(inside, items[np.minimum(span, len(items) - 1)], -1)
    lengths = np.minimum(local_start, max_history)  # (S,)
    offsets = np.zeros(len(start) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    history = items[np.repeat(start - 1, lengths) - _ragged_arange(lengths)]  # (H,) most recent first
    return Sessions(g.user_ids[group], history, offsets, targets.reshape(len(start), m))


def _last_target(g: _Grouped, back: int, m: int, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """(group, local start) of each user's target p[n-back*m : n-(back-1)*m], where it has >= lo before it."""
    local = g.counts - back * m
    group = np.flatnonzero(local >= lo)
    return group, local[group]


def _train_targets(g: _Grouped, m: int, stride: int, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """(group, local start) of training targets s = n-3m, n-3m-stride, ... >= lo, chronological per user."""
    first = g.counts - 3 * m  # (G,)
    per_user = np.where(first >= lo, (first - lo) // stride + 1, 0)  # (G,)
    group = np.repeat(np.arange(len(first), dtype=np.int64), per_user)
    steps_back = np.repeat(per_user, per_user) - 1 - _ragged_arange(per_user)  # earliest target first
    return group, first[group] - steps_back * stride


def _held_out_mask(g: _Grouped, groups: tuple[np.ndarray, ...], local_starts: tuple[np.ndarray, ...],
                   m: int) -> np.ndarray:
    """(P,) bool: positives inside any of the given targets."""
    mask = np.zeros(len(g.positives), dtype=bool)
    for group, local in zip(groups, local_starts, strict=True):
        mask[((g.starts[group] + local)[:, None] + np.arange(m)).reshape(-1)] = True
    return mask


def build_sessions(interactions: Interactions, cfg: DataConfig) -> SessionSplit:
    """Split every user's positives into train/val/test sessions by `cfg.protocol` (DataConfig rules).

    With a user's positives p[0..n-1] sorted by (timestamp, video id): test target p[n-m:n], validation
    target p[n-2m:n-m], training targets p[s:s+m] for s = n-3m, n-3m-stride, ... >= min_history. Each
    history is the (at most history_len) positives just before the target, most recent first. A target
    with fewer than min_history positives before it is not made. Sessions are ordered by user, then
    chronologically. `train_interactions` holds the positives outside every val/test target.
    """
    _check(cfg)
    if cfg.protocol == "leave_one_out":
        return build_leave_one_out(interactions, cfg)
    m, lo = cfg.session_len, cfg.min_history
    g = group_positives(interactions, cfg.positive_rating)
    test_at = _last_target(g, 1, m, lo)
    val_at = _last_target(g, 2, m, lo)
    train_at = _train_targets(g, m, cfg.train_stride, lo)
    split = SessionSplit(
        train=_make_sessions(g, *train_at, m, cfg.history_len),
        val=_make_sessions(g, *val_at, m, cfg.history_len),
        test=_make_sessions(g, *test_at, m, cfg.history_len),
        train_interactions=g.positives.select(~_held_out_mask(g, (val_at[0], test_at[0]),
                                                              (val_at[1], test_at[1]), m)),
    )
    log.info(
        "sessions: %d interactions, %d positives, %d users with positives, %d with a test session; "
        "train %d, val %d, test %d sessions; %d train interactions",
        len(interactions), len(g.positives), len(g.user_ids), len(split.test),
        len(split.train), len(split.val), len(split.test), len(split.train_interactions),
    )
    return split


def build_leave_one_out(interactions: Interactions, cfg: DataConfig) -> SessionSplit:
    """The public sequence protocol: with a user's positives p[0..n-1] in time order, the test target is p[n-1],
    the validation target p[n-2] (one item each), and training targets start at every s = min_history,
    min_history + stride, ... < n-2: up to m items p[s:s+m] that stop before p[n-2] (-1 pads the rest), so the
    session model still learns to generate sessions. Histories are the <= history_len positives before the
    target, most recent first; `train_interactions` = p[0..n-3] of every user. Users need >= 3 positives."""
    m, lo = cfg.session_len, max(cfg.min_history, 1)
    g = group_positives(interactions, cfg.positive_rating)
    held = g.counts >= lo + 2  # (G,) users with a test and a validation target that have a history
    users = np.flatnonzero(held)
    test = _make_sessions(g, users, g.counts[users] - 1, 1, cfg.history_len)
    val = _make_sessions(g, users, g.counts[users] - 2, 1, cfg.history_len)
    train_end = np.where(held, g.counts - 2, g.counts)  # (G,) a user too short to hold out trains on everything
    per_user = np.where(train_end > lo, (train_end - lo - 1) // cfg.train_stride + 1, 0)  # (G,)
    group = np.repeat(np.arange(len(g.counts), dtype=np.int64), per_user)
    local = lo + _ragged_arange(per_user) * cfg.train_stride  # (S,) chronological per user
    train = _make_sessions(g, group, local, m, cfg.history_len, end=train_end)
    keep = _ragged_arange(g.counts) < np.repeat(train_end, g.counts)  # (P,) positives before each val target
    split = SessionSplit(train=train, val=val, test=test, train_interactions=g.positives.select(keep))
    log.info("leave-one-out: %d positives, %d users, %d held out; train %d sessions (<= %d items), val %d, test %d",
             len(g.positives), len(g.user_ids), len(users), len(train), m, len(val), len(test))
    return split


def latest_histories(interactions: Interactions, positive_rating: float, cap: int) -> list[tuple[int, np.ndarray]]:
    """Each user's `cap` most recent positives, most recent first: what a live history store would hold now.

    Same positives and order as the sessions' histories (rating >= positive_rating, by timestamp then video id)."""
    g = group_positives(interactions, positive_rating)
    items = g.positives.items
    out = []
    for user, start, count in zip(g.user_ids.tolist(), g.starts.tolist(), g.counts.tolist(), strict=True):
        lo = start + max(0, count - cap)
        out.append((user, items[lo : start + count][::-1].copy()))  # (<=cap,) most recent first
    return out


def longest_per_user(sessions: Sessions) -> Sessions:
    """Each user's session with the longest history (the last of equals): with leave-one-out windows, the user's
    last training target, whose history is the whole training sequence (`TrainConfig.all_positions`)."""
    lengths = sessions.history_lengths
    order = np.lexsort((np.arange(len(sessions)), lengths, sessions.users))  # by user, then length, then row
    last = np.r_[sessions.users[order][1:] != sessions.users[order][:-1], True]
    rows = np.sort(order[last])
    chunks = [sessions.history_of(int(i)) for i in rows]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    history = np.concatenate(chunks) if chunks else sessions.history[:0]
    return Sessions(users=sessions.users[rows], history=history, history_offsets=offsets,
                    targets=sessions.targets[rows])
