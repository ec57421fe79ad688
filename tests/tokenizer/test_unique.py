"""Collision-free SIDs: hand-worked reassignments, the capacity fix, and residual_quantize's coverage."""

from __future__ import annotations

import numpy as np
import pytest

from onerec.config import TokenizerConfig
from onerec.errors import UsageError
from onerec.tokenizer.residual import collision_stats, residual_quantize
from onerec.tokenizer.unique import cap_groups, distinct_last_codes

CENTROIDS = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=np.float32)  # K = 3 codes in 2-d


def test_colliding_items_get_the_cheapest_distinct_codes():
    # group 0: items 0, 1 both nearest code 0; item 1 is nearer code 1 (dist^2 36) than item 0 (dist^2 64)
    # -> item 0 keeps 0, item 1 takes 1 (total 4 + 36 = 40 < 0 + 1 + 64 alternatives). Group 1 has no collision.
    prefix = np.array([[0], [0], [1]])
    residual = np.array([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    codes = np.array([0, 0, 0], dtype=np.int32)
    out = distinct_last_codes(prefix, codes, residual, CENTROIDS)
    assert out.tolist() == [0, 1, 0] and out.dtype == np.int32


def test_a_group_larger_than_k_is_refused():
    prefix = np.zeros((4, 1), dtype=np.int32)
    with pytest.raises(UsageError, match="4 items share one SID prefix but K=3"):
        distinct_last_codes(prefix, np.zeros(4, dtype=np.int32), np.zeros((4, 2), dtype=np.float32), CENTROIDS)


def test_cap_groups_moves_the_item_whose_next_code_is_nearest():
    # three items on code 0 of prefix 0, cap 2: item 2 at (6, 0) is 16 from code 1 (the others 64, 100) -> moves
    prefix = np.zeros((3, 1), dtype=np.int32)
    residual = np.array([[0.0, 0.0], [2.0, 0.0], [6.0, 0.0]], dtype=np.float32)
    out = cap_groups(prefix, np.zeros(3, dtype=np.int32), residual, CENTROIDS, cap=2)
    assert out.tolist() == [0, 0, 1]
    assert cap_groups(prefix, np.array([0, 1, 2]), residual, CENTROIDS, cap=2).tolist() == [0, 1, 2]  # no change


def test_cap_groups_skips_full_groups():
    # cap 1: items 1 and 2 must leave code 0; code 1 takes the first (item 2, nearest), item 1 goes on to code 2
    prefix = np.zeros((3, 1), dtype=np.int32)
    residual = np.array([[0.0, 0.0], [3.0, 2.0], [6.0, 0.0]], dtype=np.float32)
    assert cap_groups(prefix, np.zeros(3, dtype=np.int32), residual, CENTROIDS, cap=1).tolist() == [0, 2, 1]


@pytest.mark.parametrize(("n", "k"), [(300, 8), (500, 8), (2000, 16)])
def test_unique_quantization_reaches_every_item(n: int, k: int):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    x[: n // 2] *= 0.05  # a dense clump, so that plain residual k-means collides a lot
    plain = residual_quantize(x, TokenizerConfig(codes=k, levels=3, iters=5, device="cpu", unique=False))
    unique = residual_quantize(x, TokenizerConfig(codes=k, levels=3, iters=5, device="cpu", unique=True))
    assert plain.report["coverage"] < 1.0
    assert unique.report["coverage"] == 1.0 and unique.report["collision_rate"] == 0.0
    assert collision_stats(unique.sids)["num_unique_sids"] == n
    assert np.array_equal(unique.sids[:, 0], plain.sids[:, 0])  # only the last two levels may change


def test_unique_needs_k_to_the_l_codes():
    x = np.random.default_rng(0).normal(size=(600, 4)).astype(np.float32)
    with pytest.raises(UsageError, match="--codes: 600 items need unique SIDs but K\\^L = 8\\^3 = 512"):
        residual_quantize(x, TokenizerConfig(codes=8, levels=3, iters=2, device="cpu", unique=True))
