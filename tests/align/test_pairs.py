"""Chosen/rejected selection (best vs worst, ties, the skip rule) and user sampling."""

from __future__ import annotations

import numpy as np
import pytest

from onerec.align.pairs import best_worst, gather_pairs, sample_users, select_pairs
from onerec.errors import UsageError

# U=4 users, N=5 sessions each
SCORES = np.array(
    [
        [1.0, 3.0, 3.0, 0.0, 0.0],  # best: 3.0 at {1, 2} -> 1 (lowest); worst: 0.0 at {3, 4} -> 4 (highest)
        [2.0, 2.0, 2.0, 2.0, 2.0],  # all tied: no preference, skipped
        [0.5, 0.1, 0.9, 0.3, 0.2],  # best 2, worst 1
        [-1.0, -1.0, 4.0, -1.0, 4.0],  # best 2 (of {2, 4}), worst 3 (of {0, 1, 3})
    ]
)


def test_best_worst_tie_breaking() -> None:
    best, worst = best_worst(SCORES)
    assert best.tolist() == [1, 0, 2, 2]
    assert worst.tolist() == [4, 4, 1, 3]


def test_select_pairs_skips_tied_users() -> None:
    pairs = select_pairs(SCORES)
    assert len(pairs) == 3
    assert pairs.users.tolist() == [0, 2, 3]
    assert pairs.chosen.tolist() == [1, 2, 2]
    assert pairs.rejected.tolist() == [4, 1, 3]
    assert pairs.chosen_score.tolist() == [3.0, 0.9, 4.0]
    assert pairs.rejected_score.tolist() == [0.0, 0.1, -1.0]
    assert pairs.users.dtype == np.int64 and pairs.chosen.dtype == np.int64


def test_select_pairs_min_margin() -> None:
    # margins: user 0: 3.0, user 2: 0.8, user 3: 5.0
    assert select_pairs(SCORES, min_margin=1.0).users.tolist() == [0, 3]


def test_select_pairs_single_session_and_bad_scores() -> None:
    assert len(select_pairs(np.array([[1.0], [2.0]]))) == 0  # N = 1: best == worst, no pairs
    with pytest.raises(ValueError, match="finite"):
        select_pairs(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match=r"\(U, N\)"):
        select_pairs(np.array([1.0, 2.0]))


@pytest.mark.parametrize("trailing", [(3,), (3, 2)])
def test_gather_pairs_is_generic_over_trailing_dims(trailing: tuple[int, ...]) -> None:
    U, N = SCORES.shape
    sessions = np.arange(U * N * int(np.prod(trailing))).reshape(U, N, *trailing)  # (U, N, m) or (U, N, m, L)
    chosen, rejected = gather_pairs(sessions, select_pairs(SCORES))
    assert chosen.shape == (3, *trailing) and rejected.shape == (3, *trailing)
    np.testing.assert_array_equal(chosen[0], sessions[0, 1])
    np.testing.assert_array_equal(rejected[0], sessions[0, 4])
    np.testing.assert_array_equal(chosen[2], sessions[3, 2])
    np.testing.assert_array_equal(rejected[1], sessions[2, 1])


@pytest.mark.parametrize(("n_users", "ratio", "count"), [(1000, 0.01, 10), (50, 0.01, 1), (100, 0.07, 7), (7, 1.0, 7)])
def test_sample_users_count(n_users: int, ratio: float, count: int) -> None:
    users = sample_users(n_users, ratio, np.random.default_rng(0))
    assert users.shape == (count,) and users.dtype == np.int64
    assert len(set(users.tolist())) == count
    assert users.min() >= 0 and users.max() < n_users
    assert np.all(np.diff(users) > 0)  # ascending, distinct


def test_sample_users_ceils_and_is_deterministic() -> None:
    assert len(sample_users(101, 0.01, np.random.default_rng(0))) == 2  # ceil(1.01) = 2
    a = sample_users(1000, 0.05, np.random.default_rng(42))
    b = sample_users(1000, 0.05, np.random.default_rng(42))
    c = sample_users(1000, 0.05, np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(("n_users", "ratio"), [(10, 0.0), (10, 1.5), (0, 0.5), (10, float("nan"))])
def test_sample_users_rejects_bad_input(n_users: int, ratio: float) -> None:
    with pytest.raises(UsageError):
        sample_users(n_users, ratio, np.random.default_rng(0))
