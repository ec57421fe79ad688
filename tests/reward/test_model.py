"""Reward model: the BCE against hand-computed values, shapes, padding masks, AUC, persistence and scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onerec.errors import UsageError
from onerec.reward.labels import TARGETS
from onerec.reward.model import (
    RewardConfig,
    RewardModel,
    get_reward_config,
    load_reward_model,
    reward_loss,
    save_reward_model,
)
from onerec.reward.train import concordance, score_sessions

CFG = RewardConfig(levels=3, codes=8, history_len=6, session_len=5, d_model=16, n_heads=2, d_ff=32,
                   attention_hidden=8, tower_hidden=8, dropout=0.0)


def _model(seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(CFG).eval()


def _codes(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    return torch.from_numpy(rng.integers(0, CFG.codes, size=(*shape, CFG.levels)))


def test_bce_matches_hand_computed_value():
    # BCE(x, y) = log(1 + e^x) - x*y, averaged over the 2 sessions, summed over the 4 towers:
    #   swt: (log 2 - 0 + log(1+e) - 1) / 2           = (0.693147 + 0.313262) / 2 = 0.503205
    #   vtr: (log(1+e^2) - 2 + log 2 - 0) / 2           = (0.126928 + 0.693147) / 2 = 0.410038
    #   wtr: (log(1+e^-1) + log 2) / 2                  = (0.313262 + 0.693147) / 2 = 0.503205
    #   ltr: (log(1+e) - 0.2 + log(1+e^-2) + 2) / 2     = (1.113262 + 2.126928) / 2 = 1.620095
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0], [1.0, 0.0, 0.0, -2.0]])
    labels = torch.tensor([[0.5, 1.0, 0.0, 0.2], [1.0, 0.4, 0.0, 1.0]])
    assert float(reward_loss(logits, labels)) == pytest.approx(0.503205 + 0.410038 + 0.503205 + 1.620095, abs=1e-5)


def test_shapes_and_probabilities():
    rng = np.random.default_rng(0)
    history, session = _codes(rng, 3, 6), _codes(rng, 3, 5)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4, [True] + [False] * 5])
    model = _model()
    logits = model(history, mask, session)
    assert logits.shape == (3, len(TARGETS)) and torch.isfinite(logits).all()
    probs = model.score(history, mask, session)
    torch.testing.assert_close(probs, torch.sigmoid(logits))
    assert ((probs > 0) & (probs < 1)).all()


def test_padding_contents_and_length_do_not_change_scores():
    rng = np.random.default_rng(1)
    model = _model()
    real, session = _codes(rng, 2, 3), _codes(rng, 2, 5)
    short = model(real, torch.ones(2, 3, dtype=torch.bool), session)
    for pad in (1, 3):
        garbage = torch.cat([real, _codes(rng, 2, pad)], dim=1)  # (2, 3+pad, L): padded rows hold random codes
        mask = torch.cat([torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, pad, dtype=torch.bool)], dim=1)
        torch.testing.assert_close(model(garbage, mask, session), short, rtol=1e-5, atol=1e-6)
    unmasked = torch.cat([real, _codes(rng, 2, 3)], dim=1)  # the same rows counted as real do change scores
    assert not torch.allclose(model(unmasked, torch.ones(2, 6, dtype=torch.bool), session), short)


def test_scores_depend_on_history_and_session():
    rng = np.random.default_rng(2)
    model = _model()
    history, mask, session = _codes(rng, 1, 4), torch.ones(1, 4, dtype=torch.bool), _codes(rng, 1, 5)
    base = model(history, mask, session)
    assert not torch.allclose(model(_codes(rng, 1, 4), mask, session), base)
    assert not torch.allclose(model(history, mask, _codes(rng, 1, 5)), base)


def test_score_sessions_batches_truncates_and_restores_mode():
    rng = np.random.default_rng(3)
    model = _model().train()
    histories = [rng.integers(0, 8, size=(n, 3)) for n in (1, 6, 9)]  # 9 > history_len keeps its 6 most recent
    sessions = rng.integers(0, 8, size=(3, 5, 3))
    probs = score_sessions(model, histories, sessions, batch_size=2)
    assert probs.shape == (3, 4) and probs.dtype == np.float32 and model.training
    truncated = score_sessions(model, [histories[2][:6]], sessions[2:])
    np.testing.assert_allclose(probs[2:], truncated, rtol=1e-5)
    with pytest.raises(ValueError, match="sessions"):
        score_sessions(model, histories[:2], sessions)


def test_save_and_load_round_trip(tmp_path):
    model = _model(seed=5)
    save_reward_model(model, tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    assert loaded.cfg == CFG and not loaded.training
    rng = np.random.default_rng(4)
    history, session, mask = _codes(rng, 2, 4), _codes(rng, 2, 5), torch.ones(2, 4, dtype=torch.bool)
    torch.testing.assert_close(loaded(history, mask, session), model(history, mask, session))
    (tmp_path / "rm" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UsageError, match="model.safetensors"):
        load_reward_model(tmp_path / "rm")
    with pytest.raises(UsageError, match="not found"):
        load_reward_model(tmp_path / "missing")


def test_concordance_is_the_auc_for_binary_labels_and_ranks_graded_ones():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs (0.35 > 0.1) yes, (0.35 > 0.4) no, 0.8 beats both -> 3/4
    assert concordance(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert concordance(np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.4, 1.0])) == 1.0
    assert concordance(np.array([3.0, 2.0, 1.0]), np.array([0.0, 0.4, 1.0])) == 0.0
    assert concordance(np.array([1.0, 1.0]), np.array([0.0, 1.0])) == 0.5  # a tie counts half
    assert np.isnan(concordance(np.array([1.0, 2.0]), np.array([0.5, 0.5])))


def test_unknown_preset_is_a_usage_error():
    assert get_reward_config("tiny").epochs >= 1
    with pytest.raises(UsageError, match="tiny"):
        get_reward_config("huge")
