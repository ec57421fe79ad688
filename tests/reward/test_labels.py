"""Logged sessions and their labels: windows, histories, the split, skipped impressions, hand-worked labels."""

from __future__ import annotations

import numpy as np
import pytest

from onerec.config import DataConfig
from onerec.data.interactions import Interactions
from onerec.data.sessions import build_sessions
from onerec.data.synthetic import SyntheticConfig, generate
from onerec.reward.labels import TARGETS, build_logged_sessions, item_labels, session_labels

# m = 2, positives rate >= 4, at least 1 positive before a held-out target, histories of at most 3.
DATA = DataConfig(session_len=2, history_len=3, min_history=1, positive_rating=4.0)
CANDIDATES = np.arange(10, 60)


def _interactions() -> Interactions:
    """User 1: 11 ratings; user 2: five high ratings (mean above 4); user 3: too few positives for a test target.

    Rows are given newest first, to check the (timestamp, video id) sort; user 3's last two share a timestamp.
    """
    rows = [(1, 10 + j, r, 100 + 10 * j) for j, r in enumerate([5, 2, 4, 3, 5, 1, 4, 5, 4, 5, 4])]
    rows += [(2, 30 + j, r, 100 + 10 * j) for j, r in enumerate([5, 4, 5, 5, 5])]
    rows += [(3, 40, 4, 100), (3, 42, 5, 110), (3, 41, 1, 110)]
    users, items, ratings, times = map(np.array, zip(*rows[::-1], strict=True))
    return Interactions(users, items, ratings, times)


def _by_window(logged) -> dict[tuple[int, tuple[int, ...]], tuple[list[int], list[float]]]:
    return {
        (int(logged.users[i]), tuple(logged.items[i].tolist())): (logged.history_of(i).tolist(),
                                                                   np.round(logged.labels[i], 4).tolist())
        for i in range(len(logged))
    }


def test_windows_histories_split_and_hand_worked_labels():
    # User 1 positives (>= 4): 10 12 14 16 17 18 19 20 (n = 8). Test target p[6:8] = 19 20 (row 9), validation
    # target p[4:6] = 17 18 (row 7): training windows lie in rows 0-6, validation windows in rows 7-8.
    # User 1's mean rating before the test target: (5+2+4+3+5+1+4+5+4) / 9 = 3.67, so every 4 and 5 follows.
    # User 2: n = 5, test p[3:5] (row 3), validation p[1:3] (row 1); mean before test (5+4+5)/3 = 4.67: a 4 is
    # not a follow. User 3: n = 2 < m + min_history, so no held-out target: all its windows train; mean 10/3.
    # Labels (swt, vtr, wtr, ltr): watch (r-1)/4, view r >= 3, follow r >= 4 and r > mean, like r == 5; mean of 2.
    split = build_logged_sessions(_interactions(), CANDIDATES, DATA, history_len=3, skip_prob=0.0)
    assert _by_window(split.train) == {
        # rows 0-1: no positive before row 0, so the first window starts at row 1
        (1, (11, 12)): ([10], [0.5, 0.5, 0.5, 0.0]),  # r 2, 4: watch (.25+.75)/2, view (0+1)/2, follow .5, like 0
        (1, (12, 13)): ([10], [0.625, 1.0, 0.5, 0.0]),  # r 4, 3
        (1, (13, 14)): ([12, 10], [0.75, 1.0, 0.5, 0.5]),  # r 3, 5
        (1, (14, 15)): ([12, 10], [0.5, 0.5, 0.5, 0.5]),  # r 5, 1
        (1, (15, 16)): ([14, 12, 10], [0.375, 0.5, 0.5, 0.0]),  # r 1, 4
        (3, (41, 42)): ([40], [0.5, 0.5, 0.5, 0.5]),  # same timestamp: video id order (41 before 42); r 1, 5
    }
    assert _by_window(split.val) == {
        (1, (17, 18)): ([16, 14, 12], [0.875, 1.0, 1.0, 0.5]),  # r 5, 4; history capped at 3, most recent first
        (2, (31, 32)): ([30], [0.875, 1.0, 0.5, 0.5]),  # r 4, 5: the 4 is below user 2's mean, so no follow
    }
    assert not split.train.skipped.any() and not split.val.skipped.any()


def test_item_labels_with_a_skipped_impression_and_the_above_mean_follow_rule():
    ratings = np.array([[3.0, 5.0, 4.0, 0.0, 1.0]])  # slot 3 is a skipped impression
    skipped = np.array([[False, False, False, True, False]])
    per_item = item_labels(ratings, skipped, np.full((1, 1), 4.2, dtype=np.float32))  # user's mean rating 4.2
    assert per_item.shape == (1, 5, len(TARGETS))
    np.testing.assert_allclose(per_item[0, :, 0], [0.5, 1.0, 0.75, 0.0, 0.0])  # watch (r - 1) / 4, skip 0
    np.testing.assert_array_equal(per_item[0, :, 1], [1, 1, 1, 0, 0])  # view r >= 3
    np.testing.assert_array_equal(per_item[0, :, 2], [0, 1, 0, 0, 0])  # follow: 5 > 4.2 yes, 4 < 4.2 no
    np.testing.assert_array_equal(per_item[0, :, 3], [0, 1, 0, 0, 0])  # like r == 5
    # session = mean over the 5 items: swt 2.25/5, vtr 3/5, wtr 1/5, ltr 1/5
    np.testing.assert_allclose(session_labels(per_item), [[0.45, 0.6, 0.2, 0.2]], rtol=1e-6)


def test_skipped_slots_are_never_rated_candidates_with_zero_labels_and_seeded():
    interactions = _interactions()
    a = build_logged_sessions(interactions, CANDIDATES, DATA, history_len=3, skip_prob=1.0, seed=3)
    b = build_logged_sessions(interactions, CANDIDATES, DATA, history_len=3, skip_prob=1.0, seed=3)
    c = build_logged_sessions(interactions, CANDIDATES, DATA, history_len=3, skip_prob=1.0, seed=4)
    assert a.train.skipped.all() and (a.train.labels == 0).all() and (a.train.ratings == 0).all()
    for i in range(len(a.train)):
        rated = set(interactions.items[interactions.users == a.train.users[i]].tolist())
        assert set(a.train.items[i].tolist()).isdisjoint(rated)
        assert set(a.train.items[i].tolist()) <= set(CANDIDATES.tolist())
    np.testing.assert_array_equal(a.train.items, b.train.items)
    assert not np.array_equal(a.train.items, c.train.items)
    assert [h.tolist() for h in map(a.train.history_of, range(len(a.train)))] == [[10], [10], [12, 10], [12, 10],
                                                                               [14, 12, 10], [40]]


def test_windows_with_unknown_items_are_dropped_and_copies_repeat_training_windows():
    without_42 = CANDIDATES[CANDIDATES != 42]
    split = build_logged_sessions(_interactions(), without_42, DATA, history_len=3, skip_prob=0.0)
    assert 3 not in split.train.users.tolist()
    copied = build_logged_sessions(_interactions(), CANDIDATES, DATA, history_len=3, skip_prob=0.0, copies=3)
    assert len(copied.train) == 3 * 6 and len(copied.val) == 2


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="stride"):
        build_logged_sessions(_interactions(), CANDIDATES, DATA, history_len=3, stride=0)
    with pytest.raises(ValueError, match="skip_prob"):
        build_logged_sessions(_interactions(), CANDIDATES, DATA, history_len=3, skip_prob=1.5)


def test_no_window_reaches_a_test_target_and_validation_windows_follow_training_ones():
    data = generate(SyntheticConfig(users=60, items=200, topics=10, interactions_per_user=40, seed=1))
    cfg = DataConfig(session_len=5, history_len=16, min_history=1)
    sessions = build_sessions(data.interactions, cfg)
    logged = build_logged_sessions(data.interactions, np.arange(200), cfg, history_len=16, skip_prob=0.3, seed=0)
    test_items = {int(u): set(sessions.test.targets[i].tolist()) for i, u in enumerate(sessions.test.users)}
    val_items = {int(u): set(sessions.val.targets[i].tolist()) for i, u in enumerate(sessions.val.users)}
    for part in (logged.train, logged.val):
        for i in range(len(part)):
            shown = part.items[i][~part.skipped[i]].tolist()  # synthetic data never repeats a (user, item)
            assert test_items.get(int(part.users[i]), set()).isdisjoint(shown + part.history_of(i).tolist())
    for i in range(len(logged.train)):
        shown = logged.train.items[i][~logged.train.skipped[i]].tolist()
        assert val_items.get(int(logged.train.users[i]), set()).isdisjoint(shown + logged.train.history_of(i).tolist())
    assert set(logged.val.users.tolist()) == set(sessions.val.users.tolist())
    assert 0 < logged.train.skipped.mean() < 0.6
