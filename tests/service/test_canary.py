"""The canary split: a stable hash of user_id, the same in every process, honouring the share."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.canary import bucket, in_canary

USERS = [f"u{i}" for i in range(20_000)]


def test_bucket_is_stable_across_processes():
    """Python's hash() is salted per process; the split must not be (every gateway worker agrees)."""
    code = ("from service.canary import bucket; "
            "print(','.join(f'{bucket(u, \"3\"):.12f}' for u in ['196', 'alice', 'u:42', '']))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "random")}
    assert len(outputs) == 1
    assert outputs.pop().strip() == ",".join(f"{bucket(u, '3'):.12f}" for u in ["196", "alice", "u:42", ""])


@pytest.mark.parametrize("share", [0.01, 0.05, 0.2, 0.5, 0.9])
def test_share_is_honoured(share):
    chosen = sum(in_canary(u, "3", share) for u in USERS) / len(USERS)
    assert abs(chosen - share) < 4 * (share * (1 - share) / len(USERS)) ** 0.5 + 1e-3


def test_edges_and_monotone_ramp():
    assert not any(in_canary(u, "3", 0.0) for u in USERS[:1000])
    assert all(in_canary(u, "3", 1.0) for u in USERS[:1000])
    at_10 = {u for u in USERS if in_canary(u, "3", 0.1)}
    at_30 = {u for u in USERS if in_canary(u, "3", 0.3)}
    assert at_10 < at_30  # raising one candidate's share only adds users to it


def test_each_candidate_draws_its_own_slice():
    """The salt is the candidate version: the next canary does not land on the same users again."""
    first = {u for u in USERS if in_canary(u, "3", 0.2)}
    second = {u for u in USERS if in_canary(u, "4", 0.2)}
    overlap = len(first & second) / len(first)
    assert 0.15 < overlap < 0.25  # independent slices overlap by about the share
    assert all(0.0 <= bucket(u, "3") < 1.0 for u in USERS[:100])
