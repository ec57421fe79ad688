"""SASRec+: training windows, padding that changes nothing, and a short training run on the tiny run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from onerec.baselines.protocol import held_out, train_matrix
from onerec.baselines.sasrec import SASRec, SASRecConfig, sasrec_scorer, train_sasrec, training_windows
from onerec.data.interactions import Interactions
from onerec.data.sessions import Sessions
from onerec.runs import RunDir

TINY = SASRecConfig(hidden=16, blocks=1, max_len=8, dropout=0.0, batch_size=4, max_epochs=2, patience=1)


def test_training_windows_make_every_positive_a_target_once():
    windows = training_windows([np.arange(10), np.array([4]), np.array([1, 2])], max_len=4)
    # tokens are rows + 1; windows of <= 5 from the end, consecutive ones sharing one item
    assert [w.tolist() for w in windows] == [[6, 7, 8, 9, 10], [2, 3, 4, 5, 6], [1, 2], [2, 3]]
    targets = sum(len(w) - 1 for w in windows)
    assert targets == 9 + 0 + 1


def test_padding_and_batching_change_no_score():
    torch.manual_seed(0)
    model = SASRec(num_items=12, cfg=TINY).eval()
    score = sasrec_scorer(model)
    histories = [np.array([3, 1, 4, 1, 5]), np.array([9]), np.arange(12)]  # the last is longer than max_len
    together = score(histories)  # (3, 12)
    for i, h in enumerate(histories):
        np.testing.assert_allclose(together[i], score([h])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score([np.arange(12)]), score([np.arange(8)]), rtol=1e-5, atol=1e-5)  # last 8 only


@pytest.mark.slow
def test_sasrec_trains_on_the_tiny_run_and_returns_valid_metrics(tiny_run):
    run = RunDir(tiny_run)
    data = train_matrix(Interactions.load(run.interactions), Interactions.load(run.train_interactions))
    val = held_out(Sessions.load(run.sessions("val")), data)
    cfg = dataclasses.replace(TINY, hidden=32, max_len=50, batch_size=64, max_epochs=3, patience=3)
    result = train_sasrec(data, val, cfg)
    assert len(result.history) == 3
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert 1 <= result.best_epoch <= 3
    for record in result.history:
        assert all(0.0 <= record[k] <= 1.0 for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10"))
    assert result.best_val == max(r["ndcg@10"] for r in result.history)
