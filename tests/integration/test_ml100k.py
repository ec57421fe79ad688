"""Acceptance on real data: MovieLens 100K through the whole offline pipeline with the defaults beats item-kNN and
EASE, both computed here on the same split, users, exclusions and metric code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ML100K, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(2400)  # ~12 min alone on 2 cores; far more when the machine is shared
@pytest.mark.skipif(not ML100K.is_dir(), reason=f"MovieLens 100K not found at {ML100K}")
def test_small_preset_beats_itemknn_and_ease_on_ml100k(tmp_path: Path):
    run = tmp_path / "ml-100k"
    for step in (
        ("prepare", "--source", "movielens", "--path", ML100K, "--out", run),
        ("tokenize", "--run", run),
        ("train", "--run", run),
    ):
        code, out, err = run_cli(*step)
        assert code == 0, f"onerec {step[0]} failed: {out}{err}"
    code, out, err = run_cli("evaluate", "--run", run, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["users"] == 934
    assert result["valid_sid_rate"] == 1.0
    assert json.loads((run / "tokenize.json").read_text())["report"]["coverage"] == 1.0  # every item reachable
    code, out, err = run_cli("baselines", "--run", run, "--only", "itemknn,ease", "--json")
    assert code == 0, err
    baselines = json.loads(out)
    # EASE: beaten by each of three seeds since the EMA of the weights (the lowest R@5 0.0767 / N@5 0.0805 against
    # 0.0739 / 0.0748; docs/QUALITY.md), so one run asserts it
    for name in ("popular", "itemknn", "ease"):
        peer = result["popular"] if name == "popular" else baselines[name]
        for metric in ("recall@5", "ndcg@5"):
            assert result["model"][metric] > peer[metric], (name, metric, result["model"], peer)
