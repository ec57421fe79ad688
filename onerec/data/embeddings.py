"""Item embeddings: collaborative PPMI-SVD from co-occurrence, or an external (N, d) .npy file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from onerec.data.interactions import Interactions, item_rows
from onerec.errors import UsageError

log = logging.getLogger(__name__)

# Legend: N items in video_ids, A active items (co-occur with at least one other item), U users, k SVD rank.
DENSE_SVD_MAX = 1024  # at most this many active items: exact dense eigendecomposition; above: randomized
OVERSAMPLE = 16  # extra random columns in the randomized range finder (at least; k // 2 when larger)
POWER_ITERS = 6  # power iterations of the randomized range finder


def cooccurrence(interactions: Interactions, video_ids: np.ndarray,
                 pseudo_users: sp.csr_matrix | None = None) -> sp.csr_matrix:
    """(N, N) float64 sparse X^T X with X the binary user x item matrix, diagonal removed. `pseudo_users`
    (P, N), e.g. weighted item attributes, are stacked under X as extra users."""
    n = len(video_ids)
    col = item_rows(video_ids, interactions.items)
    keep = col >= 0
    if not keep.all():
        log.debug("co-occurrence: %d interactions with items outside video_ids ignored", int((~keep).sum()))
    _, row = np.unique(interactions.users[keep], return_inverse=True)
    X = sp.csr_matrix((np.ones(int(keep.sum())), (row, col[keep])), shape=(int(row.max(initial=-1)) + 1, n))
    X.data[:] = 1.0  # repeated (user, item) pairs were summed; binarise
    if pseudo_users is not None:
        X = sp.vstack([X, pseudo_users]).tocsr()  # (U + P, N)
    return _without_diagonal((X.T @ X).tocsr())  # (N, N)


def window_cooccurrence(interactions: Interactions, video_ids: np.ndarray, window: int,
                        pseudo_users: sp.csr_matrix | None = None) -> sp.csr_matrix:
    """(N, N) float64 sparse, symmetric: pairs of items at most `window` apart in a user's time order (timestamp,
    then video id), each weighted 1/distance, diagonal removed; the next items, not the whole history, are what a
    sequence model predicts. `pseudo_users` (P, N) add their X^T X as in `cooccurrence`."""
    n = len(video_ids)
    col = item_rows(video_ids, interactions.items)
    keep = col >= 0
    order = np.lexsort((interactions.items[keep], interactions.timestamps[keep], interactions.users[keep]))
    users, rows = interactions.users[keep][order], col[keep][order]  # (E,) in each user's time order
    same = [users[d:] == users[:-d] for d in range(1, window + 1)]  # (E-d,) both ends in one user's sequence
    first = np.concatenate([rows[:-d][s] for d, s in enumerate(same, start=1)])
    second = np.concatenate([rows[d:][s] for d, s in enumerate(same, start=1)])
    weight = np.concatenate([np.full(int(s.sum()), 1.0 / d) for d, s in enumerate(same, start=1)])
    C = sp.coo_matrix((weight, (first, second)), shape=(n, n)).tocsr()  # duplicates summed
    C = (C + C.T).tocsr()
    if pseudo_users is not None:
        C = (C + pseudo_users.T @ pseudo_users).tocsr()
    return _without_diagonal(C)


def _without_diagonal(C: sp.csr_matrix) -> sp.csr_matrix:
    """C with its diagonal (an item with itself) removed and the explicit zeros dropped."""
    C = (C - sp.diags(C.diagonal())).tocsr()
    C.eliminate_zeros()
    return C


def ppmi(C: sp.csr_matrix) -> sp.csr_matrix:
    """Positive PMI of a symmetric co-occurrence matrix, computed only on its non-zeros: stays sparse."""
    total = C.sum()
    marginal = np.asarray(C.sum(axis=1)).ravel()  # (N,)
    coo = C.tocoo()
    pmi = np.log(coo.data * total / (marginal[coo.row] * marginal[coo.col]))
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=C.shape)


def _dense_top(M: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k eigenpairs by |eigenvalue| of a small symmetric matrix."""
    w, V = np.linalg.eigh(M.toarray())  # (A,), (A, A)
    top = np.argsort(-np.abs(w), kind="stable")[:k]
    return V[:, top], np.abs(w[top])


def _randomized_top(M: sp.csr_matrix, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs by |eigenvalue| of a large sparse symmetric matrix (Halko et al. 2011, alg. 5.3).

    Range finder on k + OVERSAMPLE seeded Gaussian columns with POWER_ITERS re-orthonormalised power
    iterations, then the exact eigendecomposition of the small projection Q^T M Q. Only products with
    the sparse M are formed, so memory stays O(A * (k + OVERSAMPLE)).
    """
    width = min(M.shape[0], k + max(OVERSAMPLE, k // 2))
    Q = np.random.default_rng(seed).standard_normal((M.shape[0], width))  # (A, width)
    Q, _ = np.linalg.qr(M @ Q)
    for _ in range(POWER_ITERS):
        Q, _ = np.linalg.qr(M @ Q)
    w, V = np.linalg.eigh(Q.T @ (M @ Q))  # (width,), (width, width)
    top = np.argsort(-np.abs(w), kind="stable")[:k]
    return Q @ V[:, top], np.abs(w[top])


def truncated_svd(M: sp.csr_matrix, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k left singular vectors (A, k) and singular values (k,), descending, of a symmetric M.

    For symmetric M = V diag(w) V^T the SVD is U = V, S = |w|, so this is an eigendecomposition: exact
    (dense) up to DENSE_SVD_MAX active items, randomized above. Each vector's sign is fixed so that its
    largest-magnitude entry is positive, which makes the result deterministic given `seed`.
    """
    if M.shape[0] <= DENSE_SVD_MAX:
        U, S = _dense_top(M, k)
    else:
        U, S = _randomized_top(M, k, seed)
    flip = np.sign(U[np.argmax(np.abs(U), axis=0), np.arange(U.shape[1])])
    return U * np.where(flip == 0, 1.0, flip), S


def ppmi_svd_embeddings(
    interactions: Interactions, video_ids: np.ndarray, dim: int, seed: int = 0,
    attributes: sp.csr_matrix | None = None, attribute_weight: float = 1.0, window: int = 0,
) -> np.ndarray:
    """(N, k) float32 collaborative embeddings, row i for video_ids[i], L2-normalised; k = dim unless clamped.

    Every given interaction counts as a positive (pass positives, e.g. `SessionSplit.train_interactions`).
    Item-item co-occurrence within users' item sets (X^T X, diagonal removed) -> PPMI -> truncated SVD,
    rows = U * sqrt(S). Items absent from the interactions, or that never co-occur with another item, get
    zero rows. If dim exceeds the number of co-occurring items it is clamped, a warning is logged and
    fewer columns are returned. `attributes` (A, N) binary (`onerec.data.attributes`) join the users as
    pseudo-users weighted `attribute_weight`: items sharing a brand or category co-occur, so sparse items get
    content neighbours (TIGER builds its SIDs from content for the same reason). With `window` > 0 the
    co-occurrence is `window_cooccurrence` instead: items close in a user's sequence, not anywhere in it.
    """
    if dim < 1:
        raise UsageError(f"embedding_dim: must be >= 1, got {dim}")
    video_ids = np.asarray(video_ids, dtype=np.int64)
    if len(np.unique(video_ids)) != len(video_ids):
        raise ValueError("ppmi_svd_embeddings: video_ids must be unique")
    pseudo = None if attributes is None or attribute_weight <= 0 else attributes * attribute_weight
    C = (window_cooccurrence(interactions, video_ids, window, pseudo) if window > 0
         else cooccurrence(interactions, video_ids, pseudo))
    M = ppmi(C)  # (N, N)
    active = np.flatnonzero(np.diff(M.indptr) > 0)  # (A,)
    M = M[active][:, active]  # (A, A)
    k = min(dim, len(active))
    if k < dim:
        log.warning("embedding dim %d clamped to %d: only %d items co-occur", dim, k, len(active))
    out = np.zeros((len(video_ids), k), dtype=np.float32)  # (N, k)
    if k == 0:
        return out
    U, S = truncated_svd(M, k, seed)
    rows = U * np.sqrt(np.maximum(S, 0.0))  # (A, k)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    out[active] = rows / np.where(norms > 0, norms, 1.0)
    log.info("PPMI-SVD embeddings: %d items (%d co-occurring), dim %d, %d PPMI non-zeros",
             len(video_ids), len(active), k, M.nnz)
    return out


def load_embeddings(path: Path, num_items: int) -> np.ndarray:
    """An external (N, d) float .npy as float32, row i for video_ids[i]; UsageError naming the file if bad."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: embeddings file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UsageError(f"{path}: cannot read embeddings as .npy ({exc})") from exc
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise UsageError(f"{path}: embeddings must be a single .npy array, not an .npz archive")
    if array.dtype.kind not in "fiu":
        raise UsageError(f"{path}: embeddings must be a real-valued .npy array")
    if array.ndim != 2 or array.shape[0] != num_items or array.shape[1] < 1:
        raise UsageError(f"{path}: embeddings have shape {array.shape}, expected ({num_items}, d), d >= 1")
    if not np.isfinite(array).all():
        raise UsageError(f"{path}: embeddings contain NaN or infinite values")
    return array.astype(np.float32)
