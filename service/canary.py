"""The canary split: a stable hash of `user_id` sends a fixed share of users to the candidate version."""

from __future__ import annotations

import hashlib

_SCALE = float(1 << 64)


def bucket(user_id: str, salt: str) -> float:
    """A user's position in [0, 1): the 8-byte BLAKE2b of user_id keyed by `salt`, the same in every process and
    on every machine (Python's `hash` is salted per process). `salt` is the candidate version, so each new
    candidate draws a fresh slice of users, while raising one candidate's share only adds users to it."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8, key=salt.encode()[:64]).digest()
    return int.from_bytes(digest, "big") / _SCALE


def in_canary(user_id: str, candidate: str, share: float) -> bool:
    """Whether `user_id` is served by `candidate` when it takes `share` of the users."""
    return share > 0 and bucket(user_id, candidate) < share
