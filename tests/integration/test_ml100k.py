"""Acceptance on real data: MovieLens 100K through the whole offline pipeline with the defaults beats item-kNN and
stays within 5% of EASE, both computed here on the same split, users, exclusions and metric code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ML100K, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(2400)  # ~12 min alone on 2 cores; far more when the machine is shared
@pytest.mark.skipif(not ML100K.is_dir(), reason=f"MovieLens 100K not found at {ML100K}")
def test_small_preset_beats_itemknn_and_nears_ease_on_ml100k(tmp_path: Path):
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
    for name in ("popular", "itemknn"):
        peer = result["popular"] if name == "popular" else baselines[name]
        for metric in ("recall@5", "ndcg@5"):
            assert result["model"][metric] > peer[metric], (name, metric, result["model"], peer)
    # EASE: beaten on the mean of three seeds (R@5 +4%, N@5 +7%, docs/QUALITY.md) and by seeds 0 and 2, not by
    # seed 1 (R@5 0.0713 vs 0.0739): one run does not beat it surely, so issue 14's "beats EASE" is not asserted
    # yet; this bound (seed 1 is at 0.965) catches a regression
    for metric in ("recall@5", "ndcg@5"):
        assert result["model"][metric] > 0.95 * baselines["ease"][metric], (metric, result["model"], baselines)
