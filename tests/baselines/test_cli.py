"""`onerec baselines` on the tiny run: same users and popular numbers as evaluate's code, the four keys in --json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onerec import stages
from onerec.data.sessions import Sessions
from onerec.eval import score_recommendations
from onerec.runs import RunDir
from onerec.tokenizer.catalog import Catalog
from tests.conftest import read_json, run_cli


def test_popular_baseline_equals_evaluates_popular_on_the_same_users(tiny_run):
    """Rebuild what `onerec.eval.evaluate` computes for most-popular (its user filter, `most_popular` with the
    history excluded) and check the baseline's numbers are identical, not just close."""
    run = RunDir(tiny_run)
    catalog = Catalog.load(run.catalog)
    sessions = Sessions.load(run.sessions("test"))
    rows = [i for i in range(len(sessions)) if (catalog.rows_of(sessions.history_of(i)) >= 0).any()]
    lists = [catalog.most_popular(10, exclude=sessions.history_of(i).tolist()).tolist() for i in rows]
    got = stages.baselines(run, only=["popular"])["popular"]
    for k in (5, 10):
        recall, ndcg = score_recommendations(lists, sessions.targets[rows], k)
        assert got[f"recall@{k}"] == recall
        assert got[f"ndcg@{k}"] == ndcg
    assert read_json(run.root / "baselines.json")["users"] == len(rows)


@pytest.mark.slow
def test_baselines_json_prints_the_four_baselines(tiny_run):
    code, out, err = run_cli("baselines", "--run", tiny_run, "--json", "--sasrec-epochs", "2")
    assert code == 0, err
    payload = json.loads(out)
    assert list(payload) == ["popular", "itemknn", "ease", "sasrec"]
    for metrics in payload.values():
        values = [metrics[k] for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10")]
        assert all(0.0 <= v <= 1.0 for v in values) and np.isfinite(values).all()
    assert payload["sasrec"]["epochs"] <= 2


def test_baselines_only_and_bad_names(tiny_run):
    code, out, err = run_cli("baselines", "--run", tiny_run, "--json", "--only", "ease,popular", "--split", "val")
    assert code == 0, err
    assert list(json.loads(out)) == ["popular", "ease"]
    code, _, err = run_cli("baselines", "--run", tiny_run, "--only", "ease,bpr")
    assert code == 2 and "bpr" in err
    code, out, _ = run_cli("baselines", "--run", tiny_run, "--only", "popular")
    assert code == 0 and "popular" in out and "recall@5" in out


def test_baselines_needs_a_prepared_run(tmp_path):
    code, _, err = run_cli("baselines", "--run", tmp_path / "nothing")
    assert code == 2 and "prepare" in err


def test_sasrec_seed_reaches_sasrec_and_reproduces_its_run(tiny_run, monkeypatch):
    """`--sasrec-seed` replaces SASRec's seed only, and one seed gives one result exactly (what makes a seed spread
    measurable)."""
    run = RunDir(tiny_run)
    first = stages.baselines(run, only=["sasrec"], sasrec_epochs=1, sasrec_seed=3)["sasrec"]
    again = stages.baselines(run, only=["sasrec"], sasrec_epochs=1, sasrec_seed=3)["sasrec"]
    assert {k: v for k, v in first.items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}
    seen = {}

    def capture(data, users, val, cfg, only, progress):
        seen["cfg"] = cfg
        return {}

    monkeypatch.setattr("onerec.baselines.suite.run_baselines", capture)
    stages.baselines(run, only=["sasrec"], sasrec_epochs=1, sasrec_seed=3)
    assert seen["cfg"].sasrec.seed == 3 and seen["cfg"].sasrec.max_epochs == 1
    stages.baselines(run, only=["sasrec"])
    assert seen["cfg"].sasrec.seed == 0
    code, _, err = run_cli("baselines", "--run", tiny_run, "--only", "sasrec", "--sasrec-seed", "x")
    assert code == 2 and "sasrec-seed" in err
