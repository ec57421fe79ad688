"""SIDs -> videos: inverted-index tie-break, dedup, history exclusion and backfill, on a hand-worked catalog."""

import numpy as np

from onerec.recommend import fully_banned_leaves, sessions_to_videos
from onerec.tokenizer.catalog import Catalog


def _catalog() -> Catalog:
    # videos 10, 20 share SID (0, 1); popularity: 20 > 10, so leaf (0,1) lists 20 first.
    video_ids = np.array([10, 20, 30, 40, 50, 60])
    sids = np.array([[0, 1], [0, 1], [1, 0], [1, 1], [0, 0], [1, 2]])
    popularity = np.array([5, 9, 1, 7, 3, 8])
    return Catalog.build(video_ids, sids, popularity, num_codes=3)


def test_best_session_then_backfill():
    cat = _catalog()
    leaf = {tuple(s): i for i, s in enumerate(cat.unique_sids.tolist())}
    best = [leaf[(0, 1)], leaf[(1, 0)]]  # -> 20 (most popular of the shared SID), 30
    nxt = [leaf[(0, 1)], leaf[(1, 1)]]  # (0,1) again -> 10 (20 is taken), then 40
    rec = sessions_to_videos(cat, np.array([best, nxt]), exclude=[], k=4)
    assert rec.video_ids == [20, 30, 10, 40]
    assert rec.from_model == 2 and rec.backfilled == 2


def test_history_excluded_and_popular_fill():
    cat = _catalog()
    leaf = {tuple(s): i for i, s in enumerate(cat.unique_sids.tolist())}
    best = [leaf[(0, 1)], -1]
    rec = sessions_to_videos(cat, np.array([best]), exclude=[20, 60], k=3)
    # (0,1) -> 10 since 20 was seen; then popular order 20, 60, 40, 10 ... skipping seen and chosen -> 40, 50
    assert rec.video_ids == [10, 40, 50]
    assert len(set(rec.video_ids)) == 3 and rec.from_model == 1


def test_fully_banned_leaves_keep_a_shared_sid_while_one_of_its_videos_is_allowed():
    cat = _catalog()
    leaf = {tuple(s): i for i, s in enumerate(cat.unique_sids.tolist())}
    assert fully_banned_leaves(cat, [20, 30, 999]).tolist() == [leaf[(1, 0)]]  # 10 still allowed under (0, 1)
    assert sorted(fully_banned_leaves(cat, (10, 20, 30, 30)).tolist()) == sorted([leaf[(0, 1)], leaf[(1, 0)]])
    assert fully_banned_leaves(cat, []).tolist() == []
