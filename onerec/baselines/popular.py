"""Most popular: every user gets the items with the most training positives (ties: lower video id first)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from onerec.baselines.protocol import Scorer


def popularity_scores(matrix: sp.csr_matrix) -> np.ndarray:
    """(U, N) training matrix -> (N,) float64 training positive counts per item."""
    return np.asarray(matrix.sum(axis=0), dtype=np.float64).ravel()


def popular_scorer(matrix: sp.csr_matrix) -> Scorer:
    """Scores every history with the same popularity vector: (b, N)."""
    counts = popularity_scores(matrix)  # (N,)
    return lambda histories: np.broadcast_to(counts, (len(histories), counts.shape[0]))
