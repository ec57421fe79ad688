"""Synthetic interactions with planted structure (topics, user interests, Zipf popularity), vectorised."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onerec.data.interactions import Interactions
from onerec.errors import UsageError

log = logging.getLogger(__name__)

POSITIVE_RATING = 5.0
NEGATIVE_RATING = 1.0
ITEM_NOISE = 0.35  # expected norm of an item's offset from its topic centre (centres have unit norm)
START_TIME = 1_000_000_000  # timestamps: seconds, users start within a day of this
MAX_GAP = 3600  # seconds between one user's consecutive interactions: uniform in [1, MAX_GAP]


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and knobs of the generator; U users, N items, T topics."""

    users: int = 2000  # U
    items: int = 5000  # N
    topics: int = 50  # T
    interests_per_user: int = 3  # topics each user draws positives from
    latent_dim: int = 32  # D
    interactions_per_user: int = 60  # draws per user, before repeated (user, item) pairs are dropped
    zipf_a: float = 1.1  # within a topic, the item of popularity rank r is drawn with weight (r + 1) ** -a
    negative_rate: float = 0.1  # fraction of draws that are negatives: a uniform random item, rated 1
    seed: int = 0


@dataclass(frozen=True)
class SyntheticData:
    """What `generate` plants and what it observes."""

    interactions: Interactions  # positives rated 5, negatives 1; by user, timestamps rising per user
    item_vectors: np.ndarray  # (N, latent_dim) float32 planted item vectors (item video id i -> row i)
    item_topics: np.ndarray  # (N,) int64 planted topic of each item
    user_interests: np.ndarray  # (U, interests_per_user) int64 topics, distinct per user


def _check(cfg: SyntheticConfig) -> None:
    """UsageError naming the first option that cannot work."""
    positive = ("users", "items", "topics", "interests_per_user", "latent_dim", "interactions_per_user")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UsageError(f"synthetic {name}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.topics > cfg.items:
        raise UsageError(f"synthetic topics: {cfg.topics} topics need as many items, got {cfg.items}")
    if cfg.interests_per_user > cfg.topics:
        raise UsageError(f"synthetic interests_per_user: {cfg.interests_per_user} > topics={cfg.topics}")
    if not 0.0 <= cfg.negative_rate <= 1.0:
        raise UsageError(f"synthetic negative_rate: must lie in [0, 1], got {cfg.negative_rate}")
    if cfg.zipf_a < 0:
        raise UsageError(f"synthetic zipf_a: must be >= 0, got {cfg.zipf_a}")


def plant_items(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Topic of each item (balanced: sizes differ by at most 1) and its vector = topic centre + noise."""
    item_topics = rng.permutation(np.arange(cfg.items, dtype=np.int64) % cfg.topics)  # (N,)
    centres = rng.standard_normal((cfg.topics, cfg.latent_dim), dtype=np.float32)  # (T, D)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((cfg.items, cfg.latent_dim), dtype=np.float32)  # (N, D)
    noise *= np.float32(ITEM_NOISE / np.sqrt(cfg.latent_dim))
    item_vectors = centres[item_topics] + noise  # (N, D)
    return item_vectors, item_topics


def pick_interests(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """(U, k) distinct interest topics per user: the k smallest of T uniform keys."""
    keys = rng.random((cfg.users, cfg.topics))  # (U, T)
    return np.argsort(keys, axis=1)[:, : cfg.interests_per_user].astype(np.int64)


def topic_members(item_topics: np.ndarray, topics: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of items by topic: members[offsets[t]:offsets[t+1]] are topic t's items, most popular first.

    Items are numbered at random (`plant_items` permutes topics), so id order within a topic is already
    a random popularity order.
    """
    members = np.argsort(item_topics, kind="stable").astype(np.int64)  # (N,)
    offsets = np.zeros(topics + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(item_topics, minlength=topics))
    return members, offsets


def zipf_ranks(sizes: np.ndarray, a: float, rng: np.random.Generator) -> np.ndarray:
    """For each entry, a popularity rank r in [0, sizes[i]) drawn with weight (r + 1) ** -a (inverse CDF)."""
    weights = np.arange(1, int(sizes.max()) + 1, dtype=np.float64) ** -a  # (n_max,)
    cdf = np.cumsum(weights)  # the CDF truncated to n items is the prefix cdf[:n]
    u = rng.random(sizes.shape[0]) * cdf[sizes - 1]
    ranks = np.searchsorted(cdf, u, side="right")
    return np.minimum(ranks, sizes - 1)


def draw_interactions(
    cfg: SyntheticConfig, item_topics: np.ndarray, interests: np.ndarray, rng: np.random.Generator
) -> Interactions:
    """interactions_per_user draws per user; repeated (user, item) pairs keep only their first draw."""
    per_user = cfg.interactions_per_user
    users = np.repeat(np.arange(cfg.users, dtype=np.int64), per_user)  # (E,)
    choice = rng.integers(0, cfg.interests_per_user, size=users.shape[0])
    topic = interests[users, choice]  # (E,)
    members, offsets = topic_members(item_topics, cfg.topics)
    sizes = offsets[topic + 1] - offsets[topic]
    items = members[offsets[topic] + zipf_ranks(sizes, cfg.zipf_a, rng)]  # (E,)
    negative = rng.random(users.shape[0]) < cfg.negative_rate
    items[negative] = rng.integers(0, cfg.items, size=int(negative.sum()))
    ratings = np.where(negative, NEGATIVE_RATING, POSITIVE_RATING).astype(np.float32)
    starts = rng.integers(0, 86_400, size=cfg.users)  # (U,)
    gaps = rng.integers(1, MAX_GAP + 1, size=(cfg.users, per_user))  # (U, per_user)
    timestamps = (START_TIME + starts[:, None] + np.cumsum(gaps, axis=1)).reshape(-1)  # (E,) rising per user
    _, first = np.unique(users * cfg.items + items, return_index=True)  # first draw of each (user, item)
    keep = np.sort(first)
    return Interactions(users[keep], items[keep], ratings[keep], timestamps[keep])


def generate(cfg: SyntheticConfig) -> SyntheticData:
    """Planted data: topic centres, items around them, users with a few interest topics, Zipf picks.

    Each draw picks one of the user's interests uniformly, then an item of that topic by Zipf-skewed
    popularity (positive, rating 5); with probability negative_rate it is instead a uniformly random item
    (negative, rating 1). Deterministic given cfg.seed.
    """
    _check(cfg)
    rng = np.random.default_rng(cfg.seed)
    item_vectors, item_topics = plant_items(cfg, rng)
    interests = pick_interests(cfg, rng)
    interactions = draw_interactions(cfg, item_topics, interests, rng)
    log.info(
        "synthetic: %d users, %d items, %d topics, %d interactions", cfg.users, cfg.items, cfg.topics,
        len(interactions),
    )
    return SyntheticData(interactions, item_vectors, item_topics, interests)
