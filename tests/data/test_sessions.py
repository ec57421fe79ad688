"""build_sessions: hand-worked splits, history capping, leakage-free train interactions, storage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onerec.config import DataConfig
from onerec.data.interactions import Interactions
from onerec.data.movielens import load_movielens
from onerec.data.sessions import Sessions, build_sessions
from onerec.errors import UsageError

CFG = DataConfig(session_len=5, history_len=256, min_history=1, positive_rating=4.0, train_stride=5)


def _one_user(n_positives: int = 17, user: int = 7) -> Interactions:
    """Positives 10, 11, .. (10 + n - 1) in time order, shuffled rows, three negatives and one tie.

    Items 13 and 14 share a timestamp (the tie is broken by video id); ratings 4.0 count as positive,
    3.5 / 3.0 / 1.0 do not.
    """
    items = list(range(10, 10 + n_positives))
    times = [100 * i for i in range(n_positives)]
    times[4] = times[3]  # 13 and 14 tie
    ratings = [5.0 if i % 2 else 4.0 for i in range(n_positives)]
    items += [90, 91, 92]
    times += [150, 450, 1650]
    ratings += [3.5, 3.0, 1.0]
    order = np.random.default_rng(0).permutation(len(items))
    return Interactions(
        users=np.full(len(items), user)[order], items=np.array(items)[order],
        ratings=np.array(ratings)[order], timestamps=np.array(times)[order],
    )


def _histories(s: Sessions) -> list[list[int]]:
    return [s.history_of(i).tolist() for i in range(len(s))]


def test_hand_worked_single_user_split() -> None:
    split = build_sessions(_one_user(17), CFG)
    # p = 10..26 (n = 17, m = 5): test p[12:17], val p[7:12], train s = 2 (s = -3 < min_history).
    assert split.test.targets.tolist() == [[22, 23, 24, 25, 26]]
    assert _histories(split.test) == [list(range(21, 9, -1))]
    assert split.val.targets.tolist() == [[17, 18, 19, 20, 21]]
    assert _histories(split.val) == [[16, 15, 14, 13, 12, 11, 10]]
    assert split.train.targets.tolist() == [[12, 13, 14, 15, 16]]
    assert _histories(split.train) == [[11, 10]]
    for s in (split.train, split.val, split.test):
        assert s.users.tolist() == [7]
    # Train interactions: positives outside the val/test targets, sorted by time; no negatives.
    assert split.train_interactions.items.tolist() == [10, 11, 12, 13, 14, 15, 16]
    assert split.train_interactions.timestamps.tolist() == [0, 100, 200, 300, 300, 500, 600]


def test_training_targets_walk_back_by_stride_and_come_out_chronological() -> None:
    split = build_sessions(_one_user(22), CFG)
    # n = 22: test s = 17, val s = 12, train s = 7, 2.
    assert split.train.targets.tolist() == [[12, 13, 14, 15, 16], [17, 18, 19, 20, 21]]
    assert _histories(split.train) == [[11, 10], list(range(16, 9, -1))]
    assert split.train.history_offsets.tolist() == [0, 2, 9]
    assert split.val.targets.tolist() == [[22, 23, 24, 25, 26]]
    assert split.test.targets.tolist() == [[27, 28, 29, 30, 31]]


def test_overlapping_stride_and_zero_min_history() -> None:
    cfg = DataConfig(session_len=5, history_len=256, min_history=0, positive_rating=4.0, train_stride=2)
    split = build_sessions(_one_user(17), cfg)
    # train s = 2, 0 (n - 3m = 2, stride 2); min_history 0 allows an empty history.
    assert split.train.targets.tolist() == [[10, 11, 12, 13, 14], [12, 13, 14, 15, 16]]
    assert _histories(split.train) == [[], [11, 10]]


def test_min_history_drops_targets_without_enough_past() -> None:
    cfg = DataConfig(session_len=5, history_len=256, min_history=3, positive_rating=4.0, train_stride=5)
    split = build_sessions(_one_user(17), cfg)
    assert len(split.train) == 0 and split.train.targets.shape == (0, 5)
    assert len(split.val) == 1 and len(split.test) == 1
    assert split.train_interactions.items.tolist() == list(range(10, 17))


def test_history_is_capped_at_history_len_keeping_the_most_recent() -> None:
    cfg = DataConfig(session_len=5, history_len=4, min_history=1, positive_rating=4.0, train_stride=5)
    split = build_sessions(_one_user(17), cfg)
    assert _histories(split.test) == [[21, 20, 19, 18]]
    assert _histories(split.val) == [[16, 15, 14, 13]]
    assert _histories(split.train) == [[11, 10]]


def test_several_users_short_histories_and_held_out_items() -> None:
    a = _one_user(17, user=3)
    b = Interactions(users=[5] * 6, items=[50, 51, 52, 53, 54, 55], ratings=[5.0] * 6,
                     timestamps=[1, 2, 3, 4, 5, 6])  # n = 6: test s = 1 only
    c = Interactions(users=[1] * 5, items=[60, 61, 62, 63, 64], ratings=[5.0] * 5,
                     timestamps=[1, 2, 3, 4, 5])  # n = 5: the test target would have no history
    x = Interactions(*(np.concatenate([getattr(p, f) for p in (b, a, c)])
                       for f in ("users", "items", "ratings", "timestamps")))
    split = build_sessions(x, CFG)
    assert split.test.users.tolist() == [3, 5]
    assert split.test.targets.tolist() == [[22, 23, 24, 25, 26], [51, 52, 53, 54, 55]]
    assert _histories(split.test)[1] == [50]
    assert split.val.users.tolist() == [3]
    assert split.train.users.tolist() == [3]
    assert split.train_interactions.users.tolist() == [1] * 5 + [3] * 7 + [5]
    assert split.train_interactions.items.tolist() == [60, 61, 62, 63, 64, *range(10, 17), 50]
    held_out = set(split.val.targets.ravel()) | set(split.test.targets.ravel())
    assert held_out.isdisjoint(split.train_interactions.items.tolist())


def test_bad_config_names_the_option() -> None:
    with pytest.raises(UsageError, match="data.session_len"):
        build_sessions(_one_user(), DataConfig(session_len=0))
    with pytest.raises(UsageError, match="data.train_stride"):
        build_sessions(_one_user(), DataConfig(train_stride=0))


def test_sessions_save_load_round_trip(tmp_path: Path) -> None:
    split = build_sessions(_one_user(22), CFG)
    path = tmp_path / "train.npz"
    split.train.save(path)
    back = Sessions.load(path)
    assert back.users.tolist() == split.train.users.tolist()
    assert back.history.tolist() == split.train.history.tolist()
    assert back.history_offsets.tolist() == split.train.history_offsets.tolist()
    assert back.targets.tolist() == split.train.targets.tolist()
    assert back.session_len == 5 and back.history_lengths.tolist() == [2, 7]


def test_empty_sessions_round_trip_keeps_session_len(tmp_path: Path) -> None:
    empty = Sessions(np.zeros(0), np.zeros(0), np.zeros(1), np.zeros((0, 5)))
    empty.save(tmp_path / "e.npz")
    assert Sessions.load(tmp_path / "e.npz").targets.shape == (0, 5)


def test_sessions_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="missing.npz"):
        Sessions.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, users=np.zeros(2), history=np.zeros(0), history_offsets=np.zeros(2),
             targets=np.zeros((2, 5)))
    with pytest.raises(UsageError, match="bad.npz: corrupt"):
        Sessions.load(bad)


def test_ml_100k_default_config_counts() -> None:
    split = build_sessions(load_movielens(Path("/work/shared/data/ml-100k")), DataConfig())
    assert (len(split.train), len(split.val), len(split.test)) == (8694, 876, 934)
    assert len(split.train_interactions) == 55_375 - 5 * (876 + 934)
    assert int(split.train.history_lengths.max()) == 256
