"""Preference losses against hand-computed values, gradient directions, the registry, and sequence log-probs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from onerec.align.losses import (
    PREFERENCE_LOSSES,
    LossConfig,
    PreferenceBatch,
    implicit_rewards,
    mean_preference_loss,
    preference_loss,
    preference_stats,
    sequence_logprob,
)
from onerec.errors import UsageError


def make_batch(pc: float, pr: float, rc: float, rr: float, lc: float = 15.0, lr: float = 15.0) -> PreferenceBatch:
    """A one-pair batch; policy_* require grad."""

    def t(x: float, grad: bool = False) -> torch.Tensor:
        return torch.tensor([x], dtype=torch.float64, requires_grad=grad)

    return PreferenceBatch(t(pc, True), t(pr, True), t(rc), t(rr), t(lc), t(lr))


def first(loss: torch.Tensor) -> float:
    """The first element as a float, detached."""
    return loss.detach()[0].item()


# The running example: beta = 0.1, pi_c = -3, pi_r = -5, ref_c = ref_r = -4
#   h = (-3 + 4) - (-5 + 4) = 1 - (-1) = 2, beta * h = 0.2
EXAMPLE = (-3.0, -5.0, -4.0, -4.0)


def test_dpo_hand_value() -> None:
    # -log sigma(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388694
    loss = preference_loss("dpo", make_batch(*EXAMPLE), LossConfig(beta=0.1))
    assert first(loss) == pytest.approx(0.5981388694, abs=1e-6)


def test_cdpo_hand_value() -> None:
    # eps = 0.1: 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2) = 0.9 * 0.5981388694 + 0.1 * 0.7981388694
    #          = 0.5383249824 + 0.0798138869 = 0.6181388694 (= dpo + eps * beta * h = 0.5981388694 + 0.02)
    loss = preference_loss("cdpo", make_batch(*EXAMPLE), LossConfig(beta=0.1, label_smoothing=0.1))
    assert first(loss) == pytest.approx(0.6181388694, abs=1e-6)


def test_cdpo_without_smoothing_is_dpo() -> None:
    gen = torch.Generator().manual_seed(0)
    logps = torch.randn(4, 6, generator=gen)  # rows: pi_c, pi_r, ref_c, ref_r
    batch = PreferenceBatch.fixed_length(*logps, n_tokens=15)
    cfg = LossConfig(beta=0.3, label_smoothing=0.0)
    torch.testing.assert_close(preference_loss("cdpo", batch, cfg), preference_loss("dpo", batch, cfg))


def test_ipo_hand_value_and_minimum() -> None:
    # tau = beta = 0.1 -> target 1 / (2 tau) = 5; h = 2 -> (2 - 5)^2 = 9
    cfg = LossConfig(beta=0.1)
    assert first(preference_loss("ipo", make_batch(*EXAMPLE), cfg)) == pytest.approx(9.0, abs=1e-6)
    # h = 5 exactly (pi_c - ref_c = 5, pi_r - ref_r = 0): loss 0, and it grows on both sides
    at_min = first(preference_loss("ipo", make_batch(1.0, -4.0, -4.0, -4.0), cfg))
    below = first(preference_loss("ipo", make_batch(0.5, -4.0, -4.0, -4.0), cfg))  # h = 4.5
    above = first(preference_loss("ipo", make_batch(1.5, -4.0, -4.0, -4.0), cfg))  # h = 5.5
    assert at_min == pytest.approx(0.0, abs=1e-12)
    assert below == pytest.approx(0.25, abs=1e-6) and above == pytest.approx(0.25, abs=1e-6)


def test_simpo_hand_values_and_length_normalisation() -> None:
    cfg = LossConfig(beta=0.1, simpo_gamma=0.5)
    # pi_c/|c| = -3/3 = -1, pi_r/|r| = -5/5 = -1: -log sigma(0.1 * 0 - 0.5) = log(1 + e^0.5) = 0.9740769842
    same_avg = make_batch(-3.0, -5.0, 0.0, 0.0, lc=3.0, lr=5.0)
    assert first(preference_loss("simpo", same_avg, cfg)) == pytest.approx(0.9740769842, abs=1e-6)
    # |c| = 6: -3/6 = -0.5 vs -1: -log sigma(0.1 * 0.5 - 0.5) = log(1 + e^0.45) = 0.9432489460
    longer = make_batch(-3.0, -5.0, 0.0, 0.0, lc=6.0, lr=5.0)
    assert first(preference_loss("simpo", longer, cfg)) == pytest.approx(0.9432489460, abs=1e-6)
    # Scaling a session's log-prob and its length together leaves SimPO unchanged; the reference is ignored
    scaled = make_batch(-6.0, -5.0, 123.0, -7.0, lc=12.0, lr=5.0)
    assert first(preference_loss("simpo", scaled, cfg)) == pytest.approx(0.9432489460, abs=1e-6)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_gradient_pushes_chosen_up_and_rejected_down(name: str) -> None:
    batch = make_batch(*EXAMPLE)
    preference_loss(name, batch, LossConfig(beta=0.1, label_smoothing=0.1)).sum().backward()
    assert float(batch.policy_chosen.grad[0]) < 0  # raising log pi(chosen) lowers the loss
    assert float(batch.policy_rejected.grad[0]) > 0


def test_increasing_policy_chosen_decreases_dpo() -> None:
    cfg = LossConfig(beta=0.1)
    losses = [first(preference_loss("dpo", make_batch(pc, -5.0, -4.0, -4.0), cfg)) for pc in (-4.0, -3.0, -2.0)]
    assert losses[0] > losses[1] > losses[2]


def test_dpo_is_stable_for_large_margins() -> None:
    cfg = LossConfig(beta=1.0)
    big = preference_loss("dpo", make_batch(0.0, -1e4, 0.0, 0.0), cfg)  # -log sigma(1e4) ~ 0
    tiny = preference_loss("dpo", make_batch(-1e4, 0.0, 0.0, 0.0), cfg)  # -log sigma(-1e4) = 1e4
    assert first(big) == pytest.approx(0.0, abs=1e-12)
    assert first(tiny) == pytest.approx(1e4)


def test_unknown_loss_names_flag_and_known_losses() -> None:
    with pytest.raises(UsageError, match="--loss") as err:
        preference_loss("kto", make_batch(*EXAMPLE), LossConfig())
    assert "'kto'" in str(err.value)
    for name in ("dpo", "cdpo", "ipo", "simpo"):
        assert name in str(err.value)


@pytest.mark.parametrize("kwargs", [{"beta": 0.0}, {"label_smoothing": 0.5}, {"label_smoothing": -0.1}])
def test_bad_loss_config_is_a_usage_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        LossConfig(**kwargs)


def test_batch_shapes_must_agree() -> None:
    with pytest.raises(ValueError, match="ref_chosen"):
        PreferenceBatch(torch.zeros(2), torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.ones(2), torch.ones(2))


def test_stats_reward_margin_and_accuracy() -> None:
    # DPO rewards beta * (pi - ref): pair 1: 0.1 * 1 = 0.1 vs 0.1 * -1 = -0.1 (correct, margin 0.2)
    #                                pair 2: 0.1 * -1 = -0.1 vs 0.1 * 2 = 0.2 (wrong, margin -0.3)
    batch = PreferenceBatch(
        torch.tensor([-3.0, -5.0], requires_grad=True),
        torch.tensor([-5.0, -2.0], requires_grad=True),
        torch.tensor([-4.0, -4.0]),
        torch.tensor([-4.0, -4.0]),
        torch.full((2,), 15.0),
        torch.full((2,), 15.0),
    )
    cfg = LossConfig(beta=0.1)
    stats = preference_stats("dpo", batch, cfg)
    assert stats.reward_margin == pytest.approx((0.2 - 0.3) / 2, abs=1e-6)
    assert stats.accuracy == pytest.approx(0.5)
    assert stats.chosen_reward == pytest.approx(0.0, abs=1e-6)
    assert stats.rejected_reward == pytest.approx(0.05, abs=1e-6)
    # -log sigma(0.2) and -log sigma(-0.3) = log(1 + e^0.3) = 0.8543552444; mean = (0.5981388694 + 0.8543552444) / 2
    assert stats.loss.item() == pytest.approx((0.5981388694 + 0.8543552444) / 2, abs=1e-6)
    assert stats.loss.requires_grad
    torch.testing.assert_close(stats.loss, mean_preference_loss("dpo", batch, cfg))
    chosen, _ = implicit_rewards("simpo", batch, cfg)  # beta * pi / |y|: 0.1 * -3 / 15 = -0.02
    assert float(chosen[0]) == pytest.approx(-0.02, abs=1e-6)


# ---- sequence_logprob ---------------------------------------------------------------------------------------


def test_sequence_logprob_uniform_logits() -> None:
    # B=2, m=2, L=2, K=3, all logits equal: every token has log(1/3); 4 tokens -> 4 * log(1/3) = -4.3944491547
    logits = torch.zeros(2, 2, 2, 3)
    targets = torch.tensor([[[0, 1], [2, 0]], [[1, 1], [2, 2]]])
    logp, n_tokens = sequence_logprob(logits, targets)
    assert logp.shape == (2,) and n_tokens == 4
    assert logp.tolist() == pytest.approx([-4.3944491547] * 2, abs=1e-6)


def test_sequence_logprob_hand_made_logits() -> None:
    # one session of m=1 item, L=2 levels, K=3 codes:
    #   level 0 logits (0, ln 2, 0) -> probs (1/4, 1/2, 1/4), target 1 -> log(1/2)
    #   level 1 logits (ln 2, 0, 0) -> probs (1/2, 1/4, 1/4), target 2 -> log(1/4)
    # total log(1/8) = -2.0794415417
    ln2 = math.log(2.0)
    logits = torch.tensor([[[[0.0, ln2, 0.0], [ln2, 0.0, 0.0]]]], requires_grad=True)  # (1, 1, 2, 3)
    logp, n_tokens = sequence_logprob(logits, torch.tensor([[[1, 2]]]))
    assert n_tokens == 2
    assert first(logp) == pytest.approx(-2.0794415417, abs=1e-6)
    logp.sum().backward()
    assert float(logits.grad[0, 0, 0, 1]) > 0  # raising the target's logit raises its log-prob


def test_sequence_logprob_matches_cross_entropy_and_upcasts_half() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 2, 7, generator=gen)
    targets = torch.randint(0, 7, (3, 5, 2), generator=gen)
    logp, n_tokens = sequence_logprob(logits, targets)
    ce = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), reduction="none").reshape(3, -1).sum(1)
    torch.testing.assert_close(logp, -ce)
    assert n_tokens == 10
    half, _ = sequence_logprob(logits.to(torch.bfloat16), targets)
    assert half.dtype == torch.float32


def test_sequence_logprob_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="logits"):
        sequence_logprob(torch.zeros(2, 5, 3, 7), torch.zeros(2, 5, 2, dtype=torch.long))


def test_fixed_length_batch() -> None:
    pc = torch.tensor([-3.0, -4.0])
    batch = PreferenceBatch.fixed_length(pc, pc, pc, pc, n_tokens=15)
    assert batch.chosen_len.tolist() == [15.0, 15.0] and batch.rejected_len.tolist() == [15.0, 15.0]
