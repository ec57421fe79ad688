"""Hand-worked Recall@k / NDCG@k values."""

import math

import pytest

from onerec.eval import ndcg_at_k, recall_at_k


def test_recall_counts_hits_over_target_size():
    assert recall_at_k([1, 2, 3, 4, 5], [2, 5, 9, 10, 11]) == pytest.approx(2 / 5)
    assert recall_at_k([1, 2, 3, 4, 5, 6], [6], k=5) == 0.0  # rank 6 is outside the top 5
    assert recall_at_k([1], []) == 0.0


def test_ndcg_hand_worked():
    # hits at ranks 1 and 3 of 5; 2 relevant items -> ideal hits at ranks 1 and 2
    dcg = 1 / math.log2(2) + 1 / math.log2(4)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k([7, 1, 8, 2, 3], [7, 8]) == pytest.approx(dcg / idcg)
    assert ndcg_at_k([7, 8, 1, 2, 3], [7, 8]) == pytest.approx(1.0)
    assert ndcg_at_k([1, 2, 3, 4, 5], [7, 8]) == 0.0
