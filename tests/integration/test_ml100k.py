"""Acceptance on real data: MovieLens 100K through the whole offline pipeline beats the popularity baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ML100K, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(2400)  # ~12 min alone on 2 cores; far more when the machine is shared
@pytest.mark.skipif(not ML100K.is_dir(), reason=f"MovieLens 100K not found at {ML100K}")
def test_small_preset_beats_most_popular_on_ml100k(tmp_path: Path):
    run = tmp_path / "ml-100k"
    for step in (
        ("prepare", "--source", "movielens", "--path", ML100K, "--out", run),
        ("tokenize", "--run", run),
        ("train", "--run", run, "--preset", "small"),
    ):
        code, out, err = run_cli(*step)
        assert code == 0, f"onerec {step[0]} failed: {out}{err}"
    code, out, err = run_cli("evaluate", "--run", run, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["users"] == 934
    assert result["valid_sid_rate"] == 1.0
    assert result["model"]["recall@5"] > result["popular"]["recall@5"]
    assert result["model"]["ndcg@5"] > result["popular"]["ndcg@5"]
