"""From generated sessions to the videos a user is shown: inverted-index lookup, dedup, backfill."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from onerec.tokenizer.catalog import Catalog


@dataclass(frozen=True)
class Recommendation:
    video_ids: list[int]  # exactly k distinct videos
    from_model: int  # how many came from the best generated session
    backfilled: int  # how many came from later sessions or popularity
    new_items: int = 0  # how many are new items placed by prefix match (`new_share`)


def sessions_to_videos(
    catalog: Catalog, sessions_leaves: np.ndarray, exclude: Iterable[int] = (), k: int = 5, new_share: float = 0.0
) -> Recommendation:
    """`k` distinct videos from generated sessions (R, m) of leaf ids, best session first (-1 = missing).

    Each leaf maps to the first video of its inverted-index row (tie-break: popularity desc, video id asc)
    that is neither excluded nor already chosen; a SID shared by several videos thus yields its most popular
    unseen one. The best session fills the list first, then the following sessions, then the most popular
    catalog videos, so the answer always holds `k` videos while the catalog has them.

    With `new_share` > 0, TIGER's cold-start retrieval: after each generated leaf, the new items (popularity 0:
    never a training positive, e.g. added by `onerec catalog add`) whose first L-1 codes equal that leaf's follow
    it, at most ceil(new_share * k) of them in the answer (the model is never trained to generate them itself).
    """
    banned = set(int(v) for v in exclude)
    chosen: list[int] = []
    from_model = 0
    quota = int(np.ceil(new_share * k)) if new_share > 0 else 0
    placed = 0
    for rank, session in enumerate(np.asarray(sessions_leaves).reshape(len(sessions_leaves), -1)):
        for leaf in session:
            if len(chosen) == k:
                break
            if leaf < 0:
                continue
            video = _first_unused(catalog.videos_of_leaf(int(leaf)), banned)
            if video is not None:
                chosen.append(video)
                banned.add(video)
                from_model += rank == 0
            for extra in catalog.new_items_beside(int(leaf)):
                if len(chosen) == k or placed == quota:
                    break
                if extra not in banned:
                    chosen.append(extra)
                    banned.add(extra)
                    placed += 1
        if len(chosen) == k:
            break
    if len(chosen) < k:
        chosen.extend(int(v) for v in catalog.most_popular(k - len(chosen), exclude=banned))
    return Recommendation(video_ids=chosen, from_model=from_model, backfilled=len(chosen) - from_model - placed,
                          new_items=placed)


def fully_banned_leaves(catalog: Catalog, video_ids: Iterable[int]) -> np.ndarray:
    """Trie leaves (k,) int64 every video of which is in `video_ids` (ids the catalog does not know are ignored).

    These are the SIDs beam search may ban without losing an allowed video: a SID that several videos share stays
    generable while one of them is allowed, and the mapping then picks that one."""
    rows = catalog.rows_of(np.unique(np.fromiter(video_ids, dtype=np.int64)))
    leaves, banned = np.unique(catalog.leaf_of_item[rows[rows >= 0]], return_counts=True)
    return leaves[banned == np.diff(catalog.inverted_offsets)[leaves]]


def _first_unused(videos: np.ndarray, banned: set[int]) -> int | None:
    for video in videos:
        if int(video) not in banned:
            return int(video)
    return None
