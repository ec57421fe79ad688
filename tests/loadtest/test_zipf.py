"""The Zipf sampler: rank 1 most frequent, frequencies close to 1/k**s, deterministic given the seed."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.zipf import ZipfSampler, shuffled, zipf_probabilities


def test_probabilities_follow_one_over_k_to_the_s():
    p = zipf_probabilities(3, s=1.0)
    assert p == pytest.approx(np.array([1, 1 / 2, 1 / 3]) / (11 / 6))
    assert zipf_probabilities(4, s=0.0) == pytest.approx([0.25] * 4)
    with pytest.raises(ValueError):
        zipf_probabilities(0)


def test_sample_frequencies_rank_one_most_frequent():
    sampler = ZipfSampler([f"u{i}" for i in range(1, 21)], s=1.1, seed=7)
    draws = sampler.sample_many(40_000)
    counts = np.array([draws.count(f"u{i}") for i in range(1, 21)])
    assert counts.argmax() == 0
    assert all(counts[:5] > counts[1:6])  # decreasing over the head ranks
    assert counts / counts.sum() == pytest.approx(zipf_probabilities(20, 1.1), abs=0.01)


def test_sampler_is_deterministic_given_the_seed():
    items = list(range(100))
    assert ZipfSampler(items, seed=3).sample_many(50) == ZipfSampler(items, seed=3).sample_many(50)
    assert ZipfSampler(items, seed=3).sample_many(50) != ZipfSampler(items, seed=4).sample_many(50)
    assert all(0 <= r < 100 for r in ZipfSampler(items, seed=1).ranks(10_000))
    assert ZipfSampler(["only"], seed=0).sample() == "only"


def test_shuffled_is_a_fixed_permutation():
    users = [str(i) for i in range(50)]
    assert shuffled(users, 0) == shuffled(users, 0) != users
    assert sorted(shuffled(users, 0)) == sorted(users)
