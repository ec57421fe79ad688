"""Balanced k-means: hand-worked clusterings, the balance property, and the sequential reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec.errors import UsageError
from onerec.tokenizer.kmeans import (
    balanced_assignment,
    balanced_kmeans,
    balanced_kmeans_sequential,
    cluster_capacities,
    init_centroids,
    tree_assign,
)

# Eight points: four tight pairs at the corners of a wide rectangle.
PAIRS = torch.tensor(
    [[0, 0], [0, 1], [100, 0], [100, 1], [0, 10], [0, 11], [100, 10], [100, 11]], dtype=torch.float32
)
# Six points on a line; balance forces point 3 (nearer the left group) into the right cluster.
LINE = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0]])




KMEANS = {
    "vectorised": lambda x, k, seed: balanced_kmeans(x, k, iters=10, seed=seed),
    "vectorised-tree": lambda x, k, seed: balanced_kmeans(x, k, iters=10, seed=seed, init="tree"),
    "sequential": lambda x, k, seed: balanced_kmeans_sequential(x, k, iters=10, seed=seed),
}


def partition(assign: torch.Tensor) -> set[frozenset[int]]:
    """The clustering as a set of member sets (label permutation does not matter)."""
    groups: dict[int, set[int]] = {}
    for i, c in enumerate(assign.tolist()):
        groups.setdefault(c, set()).add(i)
    return {frozenset(g) for g in groups.values()}


def sorted_rows(centroids: torch.Tensor) -> np.ndarray:
    return np.array(sorted(map(tuple, centroids.numpy().round(5))))


def assert_balanced(assign: torch.Tensor, n: int, k: int) -> None:
    counts = torch.bincount(assign, minlength=k)
    assert assign.shape == (n,) and assign.dtype == torch.long
    assert int(assign.min()) >= 0 and int(assign.max()) < k
    assert int(counts.min()) == n // k and int(counts.max()) == -(-n // k)
    assert int((counts == n // k + 1).sum()) == (n % k if n % k else 0)


@pytest.mark.parametrize("name", sorted(KMEANS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairs_k4_pins_pairs_and_midpoints(name: str, seed: int) -> None:
    centroids, assign = KMEANS[name](PAIRS, 4, seed)
    assert partition(assign) == {frozenset({0, 1}), frozenset({2, 3}), frozenset({4, 5}), frozenset({6, 7})}
    np.testing.assert_allclose(sorted_rows(centroids), [[0, 0.5], [0, 10.5], [100, 0.5], [100, 10.5]])


@pytest.mark.parametrize("name", sorted(KMEANS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairs_k2_pins_left_and_right_quads(name: str, seed: int) -> None:
    centroids, assign = KMEANS[name](PAIRS, 2, seed)
    assert partition(assign) == {frozenset({0, 1, 4, 5}), frozenset({2, 3, 6, 7})}
    np.testing.assert_allclose(sorted_rows(centroids), [[0, 5.5], [100, 5.5]])


@pytest.mark.parametrize(
    ("centres", "expected"),
    [
        ([[1.0], [8.0]], {frozenset({0, 1, 2}), frozenset({3, 4, 5})}),  # 3 is the farthest of 0..3 from 1
        ([[2.0], [7.0]], {frozenset({1, 2, 3}), frozenset({0, 4, 5})}),  # 0 is the farthest of 0..3 from 2
    ],
)
def test_capacity_pushes_the_farthest_proposer_out(centres: list, expected: set) -> None:
    """All of 0..3 prefer the left centroid; it keeps its 3 closest and the 4th goes right."""
    assign = balanced_assignment(LINE, torch.tensor(centres))
    assert partition(assign) == expected
    assert assign[4] == assign[5] == 1


@pytest.mark.parametrize("seed", range(3))
def test_line_converges_to_a_balanced_fixed_point(seed: int) -> None:
    """Balanced Lloyd keeps a fixed point: the means of its clusters reassign to the same clusters."""
    centroids, assign = balanced_kmeans(LINE, 2, iters=10, seed=seed)
    assert partition(assign) in (
        {frozenset({0, 1, 2}), frozenset({3, 4, 5})},
        {frozenset({1, 2, 3}), frozenset({0, 4, 5})},
    )
    assert torch.equal(balanced_assignment(LINE, centroids), assign)


def test_k_equal_n_gives_singletons() -> None:
    centroids, assign = balanced_kmeans(PAIRS, 8, iters=3, seed=0)
    assert sorted(assign.tolist()) == list(range(8))
    torch.testing.assert_close(centroids[assign], PAIRS)


@pytest.mark.parametrize("k", [0, -1, 9])
def test_bad_k_is_a_usage_error(k: int) -> None:
    with pytest.raises(UsageError, match="--codes: K="):
        balanced_kmeans(PAIRS, k, iters=3, seed=0)
    with pytest.raises(UsageError, match="--codes: K="):
        balanced_kmeans_sequential(PAIRS, k, iters=3, seed=0)


def test_k_larger_than_n_message_names_both() -> None:
    with pytest.raises(UsageError, match=r"^--codes: K=9 is larger than the item count N=8$"):
        balanced_kmeans(PAIRS, 9, iters=3, seed=0)


def test_cluster_capacities_sum_to_n() -> None:
    assert cluster_capacities(10, 4).tolist() == [3, 3, 2, 2]
    assert cluster_capacities(8, 4).tolist() == [2, 2, 2, 2]


def points(n: int, d: int, seed: int, grid: bool) -> torch.Tensor:
    """Random points; `grid` snaps them to a coarse lattice so that ties and duplicates happen."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return torch.from_numpy(np.round(x) if grid else x).float()


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 60), k_frac=st.floats(0.0, 1.0), d=st.integers(1, 4), seed=st.integers(0, 2**16),
    grid=st.booleans(), t=st.integers(1, 4), m=st.integers(1, 6),
    init=st.sampled_from(["kmeans++", "random", "tree"]),
)
def test_vectorised_is_always_balanced(
    n: int, k_frac: float, d: int, seed: int, grid: bool, t: int, m: int, init: str
) -> None:
    """Small candidate lists and neighbour graphs exercise every path, refreshes included."""
    k = max(1, round(k_frac * n))
    x = points(n, d, seed, grid)
    centroids, assign = balanced_kmeans(x, k, iters=3, seed=seed, candidates=t, neighbours=m, init=init)
    assert_balanced(assign, n, k)
    assert centroids.shape == (k, d)
    torch.testing.assert_close(centroids, _means(x, assign, k))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 80), k_frac=st.floats(0.0, 1.0), d=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_tree_assign_is_balanced(n: int, k_frac: float, d: int, seed: int) -> None:
    k = max(1, round(k_frac * n))
    assign = tree_assign(points(n, d, seed, grid=True), k, seed)
    assert_balanced(assign, n, k)


def test_tree_assign_splits_along_the_long_axis() -> None:
    """Points on a line stretched along y: the tree cuts y into consecutive runs of equal size."""
    y = torch.arange(12, dtype=torch.float32)
    x = torch.stack([torch.zeros(12), y * 10], 1)
    assign = tree_assign(x, 4, seed=0)
    assert partition(assign) == {frozenset(range(i, i + 3)) for i in (0, 3, 6, 9)}


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), k_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), grid=st.booleans())
def test_sequential_and_vectorised_agree_on_balance(n: int, k_frac: float, seed: int, grid: bool) -> None:
    k = max(1, round(k_frac * n))
    x = points(n, 2, seed, grid)
    _, vec = balanced_kmeans(x, k, iters=3, seed=seed)
    _, seq = balanced_kmeans_sequential(x, k, iters=3, seed=seed)
    assert_balanced(vec, n, k)
    assert_balanced(seq, n, k)
    assert sorted(torch.bincount(vec, minlength=k).tolist()) == sorted(torch.bincount(seq, minlength=k).tolist())


def _means(x: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack([x[assign == c].mean(0) for c in range(k)])


def _mse(x: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor) -> float:
    return float(((x - centroids[assign]) ** 2).sum(1).mean())


def test_neighbour_path_matches_reference_quality() -> None:
    """K above the neighbour limit, tree init: the approximate search still balances every cluster and
    reaches a quantisation error no worse than Algorithm 1's (same data, k-means++ init)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 8)) * 3
    x = torch.from_numpy(centres[rng.integers(0, 40, 4003)] + rng.normal(size=(4003, 8))).float()
    c_vec, a_vec = balanced_kmeans(x, 100, iters=10, seed=0, neighbours=16, init="tree")
    c_seq, a_seq = balanced_kmeans_sequential(x, 100, iters=10, seed=0)
    assert_balanced(a_vec, 4003, 100)
    assert_balanced(a_seq, 4003, 100)
    assert _mse(x, c_vec, a_vec) < 1.05 * _mse(x, c_seq, a_seq)


def test_same_seed_same_result_and_seed_matters() -> None:
    x = points(500, 4, 3, grid=False)
    c1, a1 = balanced_kmeans(x, 20, iters=4, seed=7)
    c2, a2 = balanced_kmeans(x, 20, iters=4, seed=7)
    torch.testing.assert_close(c1, c2)
    assert torch.equal(a1, a2)
    _, a3 = balanced_kmeans(x, 20, iters=4, seed=8)
    assert not torch.equal(a1, a3)


@pytest.mark.parametrize("method", ["random", "kmeans++"])
def test_init_picks_distinct_data_points(method: str) -> None:
    x = points(300, 3, 1, grid=False)
    c = init_centroids(x, 50, seed=0, method=method)
    assert c.shape == (50, 3)
    assert torch.unique(c, dim=0).shape[0] == 50
    assert all(bool((x == row).all(1).any()) for row in c)


def test_tree_init_centroids_are_cell_means() -> None:
    c = init_centroids(PAIRS, 4, seed=0, method="tree")
    np.testing.assert_allclose(sorted_rows(c), [[0, 0.5], [0, 10.5], [100, 0.5], [100, 10.5]])


def test_kmeans_plus_plus_copes_with_identical_points() -> None:
    c = init_centroids(torch.zeros(10, 2), 4, seed=0, method="kmeans++")
    assert c.shape == (4, 2)


def test_unknown_init_is_rejected() -> None:
    with pytest.raises(ValueError, match="init"):
        init_centroids(PAIRS, 2, seed=0, method="nope")
