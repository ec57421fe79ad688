"""EASE (Steck 2019): the closed-form item-item ridge regression with a zero diagonal."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from onerec.baselines.protocol import Scorer, history_matrix


@dataclass(frozen=True)
class EASEConfig:
    lam: float = 200.0  # λ, the L2 penalty on the item-item weights (Steck's ml-20m value is 500; 200 here)


def ease_weights(matrix: sp.csr_matrix, cfg: EASEConfig | None = None) -> np.ndarray:
    """(U, N) binary training matrix -> (N, N) B = argmin ||X - XB||² + λ||B||² s.t. diag(B) = 0.

    Closed form: P = (XᵀX + λI)⁻¹, B[i, j] = -P[i, j] / P[j, j] for i != j, B[j, j] = 0."""
    cfg = cfg or EASEConfig()
    if cfg.lam <= 0:
        raise ValueError(f"EASE: lam must be > 0, got {cfg.lam}")
    gram = (matrix.T @ matrix).toarray().astype(np.float64)  # (N, N)
    gram[np.diag_indices_from(gram)] += cfg.lam
    p = np.linalg.inv(gram)  # (N, N), symmetric positive definite
    b = -p / np.diag(p)[None, :]  # (N, N) column j divided by P[j, j]
    np.fill_diagonal(b, 0.0)
    return b


def ease_scorer(weights: np.ndarray) -> Scorer:
    """score = H B: (b, N) = (b, N) @ (N, N)."""
    return lambda histories: np.asarray(history_matrix(histories, weights.shape[0]) @ weights)
