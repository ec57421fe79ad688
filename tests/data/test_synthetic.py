"""Synthetic generator: determinism, planted structure, Zipf sampling, scale."""

from __future__ import annotations

import numpy as np
import pytest

from onerec.data.synthetic import SyntheticConfig, generate, topic_members, zipf_ranks
from onerec.errors import UsageError

SMALL = SyntheticConfig(users=200, items=600, topics=12, interests_per_user=2, latent_dim=8,
                        interactions_per_user=30, seed=3)


def test_same_seed_same_data_other_seed_differs() -> None:
    a, b, c = generate(SMALL), generate(SMALL), generate(SyntheticConfig(**{**SMALL.__dict__, "seed": 4}))
    for name in ("users", "items", "ratings", "timestamps"):
        np.testing.assert_array_equal(getattr(a.interactions, name), getattr(b.interactions, name))
    np.testing.assert_array_equal(a.item_vectors, b.item_vectors)
    np.testing.assert_array_equal(a.user_interests, b.user_interests)
    assert not np.array_equal(a.item_vectors, c.item_vectors)


def test_shapes_dtypes_and_ratings() -> None:
    d = generate(SMALL)
    assert d.item_vectors.shape == (600, 8) and d.item_vectors.dtype == np.float32
    assert d.item_topics.shape == (600,) and d.item_topics.dtype == np.int64
    assert np.bincount(d.item_topics).tolist() == [50] * 12  # balanced topics
    assert d.user_interests.shape == (200, 2) and d.user_interests.dtype == np.int64
    assert all(len(set(row)) == 2 for row in d.user_interests.tolist())
    assert set(np.unique(d.interactions.ratings).tolist()) == {1.0, 5.0}
    x = d.interactions
    assert np.all(np.diff(x.users) >= 0)
    same_user = np.diff(x.users) == 0
    assert np.all(np.diff(x.timestamps)[same_user] > 0)  # strictly increasing per user
    keys = x.users * 600 + x.items
    assert len(np.unique(keys)) == len(x)  # no repeated (user, item)
    assert np.bincount(x.users).max() <= 30


def test_positives_fall_in_the_users_interest_topics() -> None:
    d = generate(SMALL)
    x = d.interactions
    in_interest = (d.user_interests[x.users] == d.item_topics[x.items][:, None]).any(axis=1)
    positive = x.ratings == 5.0
    assert in_interest[positive].mean() == 1.0
    assert in_interest[~positive].mean() < 0.4  # negatives are uniform: about 2 / 12 of them
    assert 0.05 < (~positive).mean() < 0.2


def test_items_sit_closest_to_their_own_topic_mean() -> None:
    d = generate(SMALL)
    means = np.stack([d.item_vectors[d.item_topics == t].mean(axis=0) for t in range(12)])
    nearest = np.argmin(((d.item_vectors[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (nearest == d.item_topics).mean() > 0.95


def test_zipf_ranks_match_hand_worked_frequencies() -> None:
    # Three items, a = 1: weights 1, 1/2, 1/3 -> probabilities 6/11, 3/11, 2/11.
    ranks = zipf_ranks(np.full(200_000, 3), 1.0, np.random.default_rng(0))
    np.testing.assert_allclose(np.bincount(ranks) / len(ranks), [6 / 11, 3 / 11, 2 / 11], atol=0.005)
    # Truncation: size-1 topics always give rank 0; mixed sizes stay in range.
    assert zipf_ranks(np.ones(100, dtype=np.int64), 1.1, np.random.default_rng(0)).tolist() == [0] * 100
    sizes = np.array([1, 2, 5] * 1000)
    assert np.all(zipf_ranks(sizes, 1.1, np.random.default_rng(1)) < sizes)


def test_topic_members_csr() -> None:
    members, offsets = topic_members(np.array([2, 0, 2, 1, 0]), 3)
    assert members.tolist() == [1, 4, 3, 0, 2]
    assert offsets.tolist() == [0, 2, 3, 5]


def test_a_million_items_is_cheap() -> None:
    d = generate(SyntheticConfig(users=20, items=1_000_000, topics=1000, interactions_per_user=10))
    assert d.item_vectors.shape == (1_000_000, 32)
    assert d.interactions.items.max() < 1_000_000


@pytest.mark.parametrize(
    ("change", "option"),
    [({"users": 0}, "users"), ({"topics": 700}, "topics"), ({"interests_per_user": 13}, "interests_per_user"),
     ({"negative_rate": 1.5}, "negative_rate")],
)
def test_bad_config_names_the_option(change: dict, option: str) -> None:
    with pytest.raises(UsageError, match=f"synthetic {option}"):
        generate(SyntheticConfig(**{**SMALL.__dict__, **change}))
