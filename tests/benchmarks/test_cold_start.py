"""The cold-start study's parts, worked by hand: the hold-out of items from sessions and TIGER's prefix match."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from onerec.data.sessions import Sessions
from onerec.tokenizer.catalog import Catalog

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import cold_start  # noqa: E402


def test_held_out_items_leave_histories_and_targets_and_empty_targets_drop_their_session() -> None:
    sessions = Sessions(users=np.array([1, 2, 3]), history=np.array([5, 6, 7, 8]),
                        history_offsets=np.array([0, 3, 3, 4]), targets=np.array([[1, 2, 3], [6, 6, 6], [2, 9, 1]]))
    out = cold_start.without_items(sessions, np.array([2, 6]))
    assert out.users.tolist() == [1, 3]  # user 2's target was all held-out items
    assert out.history.tolist() == [5, 7, 8] and out.history_offsets.tolist() == [0, 2, 3]
    assert out.targets.tolist() == [[1, 3, -1], [9, 1, -1]]  # compacted, padded at the end


def test_held_out_items_are_a_seeded_tenth() -> None:
    ids = np.arange(100, 200)
    picked = cold_start.held_out_items(ids, 0.1, seed=0)
    assert len(picked) == 10 and np.isin(picked, ids).all() and (np.diff(picked) > 0).all()
    np.testing.assert_array_equal(picked, cold_start.held_out_items(ids, 0.1, seed=0))


def test_prefix_match_puts_new_items_after_the_generated_sid_that_shares_their_prefix() -> None:
    # warm videos 10 (0,0,0), 11 (1,0,0), 12 (1,1,1); new 20 and 21 under 10's prefix (0, 0), 30 under 12's (1, 1)
    catalog = Catalog.build(np.array([10, 11, 12, 20, 21, 30]),
                            np.array([[0, 0, 0], [1, 0, 0], [1, 1, 1], [0, 0, 1], [0, 0, 2], [1, 1, 0]]),
                            np.array([5, 4, 3, 0, 0, 0]), 4)
    leaves = catalog.leaves_of([10, 12])  # beam search generated 10 then 12
    watched = np.array([21])
    assert cold_start.served(catalog, leaves, watched, 4, share=0.5) == [10, 20, 12, 30]
    assert cold_start.served(catalog, leaves, watched, 4, share=0.25) == [10, 20, 12, 11]  # quota 1
    assert cold_start.served(catalog, leaves, watched, 3, share=0.0) == [10, 12, 11]  # no prefix match
    assert cold_start.served(catalog, leaves, watched, 3) == [10, 12, 11]
