"""The planted truth of a synthetic run as a session scorer: a session's reward is its share of in-interest items."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onerec.data.synthetic import SyntheticConfig, generate
from onerec.eval import REWARD_TARGETS, SessionScorer
from onerec.runs import RunDir
from onerec.tokenizer.catalog import Catalog


def leaf_topics(run: Path, catalog: Catalog) -> np.ndarray:
    """(U,) planted topic of each trie leaf (its most popular video's), regenerated from the run's seed."""
    truth = generate(SyntheticConfig(**RunDir(run).read_marker("prepare")["synthetic"]))
    first_rows = catalog.inverted_items[catalog.inverted_offsets[:-1]]  # (U,) the leaf's first video row
    return truth.item_topics[catalog.video_ids[first_rows]]


def planted_scorer(run: Path, catalog: Catalog) -> SessionScorer:
    """Every target = the share of a session's items whose topic is among the topics of the user's history."""
    topics = leaf_topics(run, catalog)

    def score(histories: list[np.ndarray], sessions: np.ndarray) -> np.ndarray:
        b, R, m, L = sessions.shape
        out = np.zeros((b, R, len(REWARD_TARGETS)))
        for i, history in enumerate(histories):
            liked = np.unique(topics[catalog.trie.leaf_of(history)])
            leaves = catalog.trie.leaf_of(sessions[i].reshape(-1, L)).reshape(R, m)  # (R, m), -1 if not a SID
            hit = (leaves >= 0) & np.isin(topics[np.maximum(leaves, 0)], liked)
            out[i] = hit.mean(axis=1, keepdims=True)
        return out

    return score
