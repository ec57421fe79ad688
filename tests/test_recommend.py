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


def _with_new_items() -> Catalog:
    # warm: 10 (0,0), 30 (0,2), 40 (1,0); new (popularity 0): 20 (0,1), 25 (0,3), 50 (1,1)
    video_ids = np.array([10, 20, 25, 30, 40, 50])
    sids = np.array([[0, 0], [0, 1], [0, 3], [0, 2], [1, 0], [1, 1]])
    popularity = np.array([5, 0, 0, 3, 2, 0])
    return Catalog.build(video_ids, sids, popularity, num_codes=4)


def test_new_items_follow_the_generated_item_sharing_their_prefix():
    cat = _with_new_items()
    leaf = {tuple(s): i for i, s in enumerate(cat.unique_sids.tolist())}
    assert cat.new_items_beside(leaf[(0, 0)]) == (20, 25) and cat.new_items_beside(leaf[(1, 0)]) == (50,)
    ranked = np.array([[leaf[(0, 0)]], [leaf[(1, 0)]], [leaf[(0, 2)]]])  # ranked next items (R, 1)
    off = sessions_to_videos(cat, ranked, k=3)
    assert off.video_ids == [10, 40, 30] and off.new_items == 0
    # k=5, share 0.4: 2 slots; 20 and 25 (prefix (0,) of 10) come right after 10, then 40; 50 is over the quota
    on = sessions_to_videos(cat, ranked, k=5, new_share=0.4)
    assert on.video_ids == [10, 20, 25, 40, 30] and on.new_items == 2 and on.from_model == 1
    assert on.backfilled == 2
    # share 0.2: 1 slot; an excluded new item is skipped like any other
    one = sessions_to_videos(cat, ranked, exclude=[20], k=5, new_share=0.2)
    assert one.video_ids == [10, 25, 40, 30, 50] and one.new_items == 1  # 50: popularity backfill, not a placement
