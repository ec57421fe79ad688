"""Hand-worked baselines on a 3-user x 3-item matrix, the shared protocol, and the metric equivalence with eval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onerec.baselines import (
    EASEConfig,
    HeldOut,
    ItemKNNConfig,
    ease_weights,
    evaluate_scorer,
    held_out,
    itemknn_similarity,
    popularity_scores,
    top_k,
    train_matrix,
)
from onerec.baselines.ease import ease_scorer
from onerec.baselines.itemknn import itemknn_scorer
from onerec.baselines.popular import popular_scorer
from onerec.baselines.protocol import history_matrix
from onerec.data.interactions import Interactions
from onerec.data.sessions import Sessions
from onerec.eval import ndcg_at_k, recall_at_k, score_recommendations

# users x items: u0 {0, 1}, u1 {1, 2}, u2 {0, 1, 2}; video ids 10, 20, 30 (and 40, never a training positive)
X = np.array([[1, 1, 0], [0, 1, 1], [1, 1, 1]], dtype=np.float64)


def _interactions(users, items, timestamps=None) -> Interactions:
    n = len(users)
    return Interactions(np.asarray(users), np.asarray(items), np.full(n, 5.0),
                        np.arange(n) if timestamps is None else np.asarray(timestamps))


def _tiny_data():
    train = _interactions([0, 0, 1, 1, 2, 2, 2], [10, 20, 20, 30, 10, 20, 30])
    everything = _interactions([0, 0, 1, 1, 2, 2, 2, 3], [10, 20, 20, 30, 10, 20, 30, 40])
    return train_matrix(everything, train)


def test_train_matrix_is_the_binary_positives_over_the_whole_catalogue():
    data = _tiny_data()
    assert data.video_ids.tolist() == [10, 20, 30, 40]
    np.testing.assert_array_equal(data.matrix.toarray()[:, :3], X)
    assert data.matrix.toarray()[:, 3].sum() == 0  # item 40: in the catalogue, no training positive
    assert [s.tolist() for s in data.sequences] == [[0, 1], [1, 2], [0, 1, 2]]
    assert data.rows_of(np.array([30, 99, 10])).tolist() == [2, -1, 0]


def test_train_matrix_sequences_are_chronological_and_duplicates_stay_binary():
    train = _interactions([5, 5, 5], [30, 10, 30], timestamps=[3, 1, 2])
    data = train_matrix(train, train)
    assert data.sequences[0].tolist() == [0, 1, 1]  # 10 @1, 30 @2, 30 @3 -> rows 0, 1, 1
    assert data.matrix.toarray().tolist() == [[1.0, 1.0]]


def test_ease_closed_form_hand_worked():
    # G + λI (λ=1) = [[3,2,1],[2,4,2],[1,2,3]], det 16, P = (1/16)[[8,-4,0],[-4,8,-4],[0,-4,8]];
    # B[i, j] = -P[i, j] / P[j, j] = [[0, .5, 0], [.5, 0, .5], [0, .5, 0]]
    from scipy.sparse import csr_matrix

    b = ease_weights(csr_matrix(X), EASEConfig(lam=1.0))
    np.testing.assert_allclose(b, [[0, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0]], atol=1e-12)


def test_ease_equals_the_constrained_ridge_regression_column_by_column():
    rng = np.random.default_rng(0)
    x = (rng.random((30, 6)) < 0.4).astype(np.float64)
    from scipy.sparse import csr_matrix

    b = ease_weights(csr_matrix(x), EASEConfig(lam=3.0))
    for j in range(6):
        others = [i for i in range(6) if i != j]
        a = x[:, others]
        w = np.linalg.solve(a.T @ a + 3.0 * np.eye(5), a.T @ x[:, j])  # min ||x_j - A w||² + λ||w||²
        np.testing.assert_allclose(b[others, j], w, atol=1e-10)
        assert b[j, j] == 0.0


def test_itemknn_cosine_hand_worked():
    from scipy.sparse import csr_matrix

    s = itemknn_similarity(csr_matrix(X))
    a, h = 2 / math.sqrt(6), 0.5  # |U0∩U1| = 2, |U0| = 2, |U1| = 3; |U0∩U2| = 1, |U0| = |U2| = 2
    np.testing.assert_allclose(s, [[0, a, h], [a, 0, a], [h, a, 0]], atol=1e-12)
    top1 = itemknn_similarity(csr_matrix(X), ItemKNNConfig(neighbors=1))
    np.testing.assert_allclose(top1[[0, 2]], [[0, a, 0], [0, a, 0]], atol=1e-12)
    # a history {0, 2} scores item 1 with S[0, 1] + S[2, 1]
    np.testing.assert_allclose(itemknn_scorer(s)([np.array([0, 2])]), [[h, 2 * a, h]], atol=1e-12)


def test_itemknn_item_without_positives_scores_zero():
    data = _tiny_data()
    s = itemknn_similarity(data.matrix)
    assert s.shape == (4, 4)
    assert not s[3].any() and not s[:, 3].any()


def test_popular_with_history_excluded_and_ties_to_the_lower_video_id():
    data = _tiny_data()
    assert popularity_scores(data.matrix).tolist() == [2.0, 3.0, 2.0, 0.0]
    scores = popular_scorer(data.matrix)([np.array([1]), np.array([0])])
    assert top_k(scores, [np.array([1]), np.array([0])], 3).tolist() == [[0, 2, 3], [1, 2, 3]]


def test_top_k_masks_and_leaves_the_callers_scores_alone():
    scores = np.array([[0.1, 0.9, 0.5, 0.9]])
    assert top_k(scores, [np.array([], dtype=np.int64)], 4).tolist() == [[1, 3, 2, 0]]  # tie 0.9: lower row first
    assert top_k(scores, [np.array([1, 2])], 2).tolist() == [[3, 0]]
    assert scores.tolist() == [[0.1, 0.9, 0.5, 0.9]]


def test_history_matrix_is_binary():
    assert history_matrix([np.array([2, 0, 2]), np.array([1])], 3).toarray().tolist() == [[1, 0, 1], [0, 1, 0]]


def test_ease_scorer_is_history_times_b():
    from scipy.sparse import csr_matrix

    b = ease_weights(csr_matrix(X), EASEConfig(lam=1.0))
    np.testing.assert_allclose(ease_scorer(b)([np.array([0])]), [[0, 0.5, 0]])


def test_evaluate_scorer_scores_a_known_list_exactly_as_eval_does():
    data = _tiny_data()  # video ids 10, 20, 30, 40
    lists = [[40, 30, 20, 10], [20, 40, 30, 10]]  # what a fixed scorer recommends (rows 3,2,1,0 and 1,3,2,0)
    rank_scores = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 2.0, 3.0]])
    users = HeldOut(histories=[np.array([], dtype=np.int64), np.array([], dtype=np.int64)],
                    targets=np.array([[30, 99], [10, 40]]))
    got = evaluate_scorer(lambda histories: rank_scores[: len(histories)], data, users, ks=(1, 2, 5))
    for k in (1, 2, 5):
        want_r, want_n = score_recommendations(lists, users.targets.tolist(), k)
        assert got[f"recall@{k}"] == want_r
        assert got[f"ndcg@{k}"] == want_n
    # and by hand: user 0 hits 30 at rank 2, user 1 hits 40 at rank 2 and 10 at rank 4
    assert got["recall@2"] == pytest.approx((0.5 + 0.5) / 2)
    ideal = 1 + 1 / math.log2(3)
    assert got["ndcg@5"] == pytest.approx(((1 / math.log2(3)) / ideal + (1 / math.log2(3) + 1 / math.log2(5)) / ideal)
                                          / 2)


def test_score_recommendations_is_the_mean_of_the_per_user_metrics():
    recs = np.array([[1, 2, 3, 4, 5], [7, 1, 8, 2, 3]])
    targets = [[2, 5, 9, 10, 11], [7, 8]]
    r, n = score_recommendations(recs, targets, 5)
    assert r == pytest.approx((recall_at_k([1, 2, 3, 4, 5], targets[0]) + recall_at_k([7, 1, 8, 2, 3], targets[1])) / 2)
    assert n == pytest.approx((ndcg_at_k([1, 2, 3, 4, 5], targets[0]) + ndcg_at_k([7, 1, 8, 2, 3], targets[1])) / 2)
    with pytest.raises(ValueError):
        score_recommendations(recs, targets[:1], 5)


def test_held_out_drops_users_without_a_known_history_item():
    data = _tiny_data()
    sessions = Sessions(users=np.array([0, 1, 2]), history=np.array([20, 10, 99]),
                        history_offsets=np.array([0, 2, 2, 3]), targets=np.array([[30], [10], [20]]))
    users = held_out(sessions, data)
    assert [h.tolist() for h in users.histories] == [[1, 0]]  # user 1 has no history, user 2 only unknown 99
    assert users.targets.tolist() == [[30]]
