"""PPMI-SVD collaborative embeddings on hand-made cases, and external embedding files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import onerec.data.embeddings as emb
from onerec.data.embeddings import cooccurrence, load_embeddings, ppmi, ppmi_svd_embeddings, window_cooccurrence
from onerec.data.interactions import Interactions
from onerec.data.synthetic import SyntheticConfig, generate
from onerec.errors import UsageError


def _watch(pairs: list[tuple[int, int]]) -> Interactions:
    users, items = zip(*pairs, strict=True)
    n = len(pairs)
    return Interactions(users=users, items=items, ratings=np.full(n, 5.0), timestamps=np.arange(n))


def _two_groups() -> Interactions:
    """Group A = videos 100-102 watched in full by users 0-8; group B = 200-203 by users 9-12.

    Both blocks get the same PPMI value log(102 / 36) (total co-occurrence 9*6 + 4*12 = 102, marginals
    9*2 and 4*3), so the PPMI matrix is c*(J - I) per block: eigenvalues 3c (B), 2c (A) and -c. The top
    two singular directions are the uniform vector of B, then of A.
    """
    pairs = [(u, v) for u in range(9) for v in (100, 101, 102)]
    pairs += [(u, v) for u in range(9, 13) for v in (200, 201, 202, 203)]
    pairs += [(0, 100), (13, 777)]  # a repeat (binarised) and a video outside video_ids (ignored)
    return _watch(pairs)


VIDEO_IDS = np.array([100, 101, 102, 200, 201, 202, 203, 999])  # 999 is never watched


def test_cooccurrence_counts_shared_users_without_diagonal() -> None:
    x = _watch([(0, 1), (0, 2), (1, 1), (1, 2), (1, 3), (1, 3)])
    C = cooccurrence(x, np.array([1, 2, 3, 4])).toarray()
    np.testing.assert_array_equal(C, [[0, 2, 1, 0], [2, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])


def test_window_cooccurrence_hand_worked() -> None:
    """User 0 watches 1, 2, 3, 4 in that order (timestamps), user 1 watches 4 then 1; window 2, weight 1/distance.
    Pairs: (1,2) 1, (2,3) 1, (3,4) 1, (1,3) 1/2, (2,4) 1/2, and user 1's (4,1) 1; never across users; the 4, 1 of
    user 1 are not adjacent to user 0's items. An item outside video_ids (9) is dropped before the distances."""
    x = Interactions(users=[1, 0, 0, 1, 0, 0, 0], items=[4, 3, 1, 1, 9, 2, 4], ratings=np.ones(7),
                     timestamps=[0, 2, 0, 1, 1, 1, 3])
    C = window_cooccurrence(x, np.array([1, 2, 3, 4]), 2).toarray()
    np.testing.assert_allclose(C, [[0, 1, 0.5, 1], [1, 0, 1, 0.5], [0.5, 1, 0, 1], [1, 0.5, 1, 0]])
    wide = window_cooccurrence(x, np.array([1, 2, 3, 4]), 3).toarray()
    assert wide[0, 3] == pytest.approx(1 + 1 / 3)  # 1 and 4 three apart for user 0, adjacent for user 1
    assert np.array_equal(C, C.T) and np.all(np.diag(C) == 0)


def test_a_window_embeds_items_by_what_follows_them() -> None:
    """Two users' sequences alternate between blocks A (1..3) and B (4..6) only at their ends: with the whole
    history every item co-occurs with every other, so A and B blur; within a window of 1 they separate."""
    seq = [1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6]
    users = [0] * 12 + [1] * 12
    x = Interactions(users=users, items=seq + seq[::-1], ratings=np.ones(24), timestamps=list(range(24)))
    ids = np.arange(1, 7)
    near = ppmi_svd_embeddings(x, ids, 2, window=1)
    within, across = near[0] @ near[1], near[0] @ near[4]
    assert within > across + 0.5, (within, across)


def test_ppmi_hand_worked() -> None:
    import scipy.sparse as sp

    C = sp.csr_matrix(np.array([[0, 6, 1, 0], [6, 0, 0, 1], [1, 0, 0, 3], [0, 1, 3, 0]], dtype=float))
    # total 22, marginals 7, 7, 4, 4: PMI(0,1) = log(6*22/49), PMI(2,3) = log(3*22/16); the 1s are < 0.
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[1, 0] = np.log(132 / 49)
    expected[2, 3] = expected[3, 2] = np.log(66 / 16)
    np.testing.assert_allclose(ppmi(C).toarray(), expected, rtol=1e-12)


def test_groups_that_never_cooccur_are_orthogonal() -> None:
    e = ppmi_svd_embeddings(_two_groups(), VIDEO_IDS, dim=2)
    assert e.shape == (8, 2) and e.dtype == np.float32
    np.testing.assert_allclose(e[:3], [[0, 1]] * 3, atol=1e-6)  # group A: second direction
    np.testing.assert_allclose(e[3:7], [[1, 0]] * 4, atol=1e-6)  # group B: first direction
    np.testing.assert_array_equal(e[7], [0, 0])  # never watched -> zero row


def test_all_directions_still_separate_groups_and_rows_are_unit() -> None:
    e = ppmi_svd_embeddings(_two_groups(), VIDEO_IDS, dim=7)
    np.testing.assert_allclose(np.linalg.norm(e[:7], axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(e[:3] @ e[3:7].T, 0.0, atol=1e-6)


def test_dim_above_active_items_is_clamped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="onerec.data.embeddings"):
        e = ppmi_svd_embeddings(_two_groups(), VIDEO_IDS, dim=20)
    assert e.shape == (8, 7)
    assert "clamped to 7" in caplog.text


def test_randomized_path_matches_exact_and_is_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    d = generate(SyntheticConfig(users=300, items=400, topics=8, interests_per_user=2, latent_dim=8,
                                 interactions_per_user=40, negative_rate=0.0, seed=1))
    ids = np.arange(400)
    exact = ppmi_svd_embeddings(d.interactions, ids, dim=8)
    monkeypatch.setattr(emb, "DENSE_SVD_MAX", 10)
    fast = ppmi_svd_embeddings(d.interactions, ids, dim=8, seed=5)
    again = ppmi_svd_embeddings(d.interactions, ids, dim=8, seed=5)
    np.testing.assert_array_equal(fast, again)
    np.testing.assert_allclose(fast, exact, atol=2e-3)


def test_load_embeddings_reads_float_npy_as_float32(tmp_path: Path) -> None:
    path = tmp_path / "e.npy"
    np.save(path, np.arange(6, dtype=np.float64).reshape(3, 2))
    e = load_embeddings(path, 3)
    assert e.dtype == np.float32
    np.testing.assert_array_equal(e, [[0, 1], [2, 3], [4, 5]])


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 2)), r"shape \(4, 2\), expected \(3, d\)"),
        (np.zeros(3), r"shape \(3,\)"),
        (np.array([[0.0, np.nan]] * 3), "NaN"),
        (np.array([["a", "b"]] * 3), "real-valued"),
    ],
)
def test_load_embeddings_rejects_bad_arrays(tmp_path: Path, array: np.ndarray, message: str) -> None:
    path = tmp_path / "e.npy"
    np.save(path, array)
    with pytest.raises(UsageError, match=rf"e\.npy: .*{message}"):
        load_embeddings(path, 3)


def test_load_embeddings_rejects_missing_pickled_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="missing.npy: embeddings file not found"):
        load_embeddings(tmp_path / "missing.npy", 3)
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(UsageError, match="obj.npy: cannot read"):
        load_embeddings(pickled, 3)
    garbage = tmp_path / "text.npy"
    garbage.write_text("hello")
    with pytest.raises(UsageError, match="text.npy: cannot read"):
        load_embeddings(garbage, 3)
    archive = tmp_path / "a.npz"
    np.savez(archive, x=np.zeros((3, 2)))
    with pytest.raises(UsageError, match="a.npz: .*not an .npz"):
        load_embeddings(archive, 3)
