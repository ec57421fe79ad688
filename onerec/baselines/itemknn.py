"""Item-kNN: cosine similarity between items' training-positive columns; a user's score sums over the history."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from onerec.baselines.protocol import Scorer, history_matrix


@dataclass(frozen=True)
class ItemKNNConfig:
    neighbors: int | None = None  # keep each item's top-n most similar items; None keeps all (plain cosine)


def itemknn_similarity(matrix: sp.csr_matrix, cfg: ItemKNNConfig | None = None) -> np.ndarray:
    """(U, N) binary training matrix -> (N, N) S, S[i, j] = |U_i ∩ U_j| / sqrt(|U_i| |U_j|), zero diagonal.

    Items without training positives get all-zero rows and columns."""
    cfg = cfg or ItemKNNConfig()
    co = (matrix.T @ matrix).toarray().astype(np.float64)  # (N, N) co-occurrence counts
    norms = np.sqrt(np.diag(co))  # (N,)
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    sim = co * inv[:, None] * inv[None, :]  # (N, N)
    np.fill_diagonal(sim, 0.0)
    if cfg.neighbors is not None and cfg.neighbors < sim.shape[0]:
        # keep, in each row i, the `neighbors` largest similarities (i's neighbourhood); S stays (N, N)
        drop = np.argpartition(-sim, cfg.neighbors, axis=1)[:, cfg.neighbors :]  # (N, N - n)
        np.put_along_axis(sim, drop, 0.0, axis=1)
    return sim


def itemknn_scorer(similarity: np.ndarray) -> Scorer:
    """score(u, j) = sum over history items i of S[i, j]: (b, N) = H (b, N) @ S (N, N)."""
    return lambda histories: np.asarray(history_matrix(histories, similarity.shape[0]) @ similarity)
