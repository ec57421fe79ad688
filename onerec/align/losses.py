"""Preference losses (DPO, cDPO, IPO, SimPO) over sequence log-probabilities, behind one registry keyed by `--loss`.

Legend: B preference pairs, m items per session, L levels, K codes. Log-probabilities are sums over a session's
m*L code tokens; h = (pi_c - ref_c) - (pi_r - ref_r) is the policy-vs-reference log-ratio difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from onerec.errors import UsageError

_FIELDS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "chosen_len", "rejected_len")


@dataclass(frozen=True, eq=False)
class PreferenceBatch:
    """Per-pair sequence log-probabilities, all shape (B,).

    `policy_*` carry gradients; `ref_*` come from the frozen reference (compute them under `torch.no_grad()`;
    SimPO ignores them). `*_len` are token counts (positive), read only by length-normalised losses (SimPO).
    """

    policy_chosen: Tensor  # (B,) sum of log pi(chosen tokens)
    policy_rejected: Tensor  # (B,)
    ref_chosen: Tensor  # (B,) sum of log pi_ref(chosen tokens)
    ref_rejected: Tensor  # (B,)
    chosen_len: Tensor  # (B,) token count of the chosen session
    rejected_len: Tensor  # (B,)

    def __post_init__(self) -> None:
        shape = self.policy_chosen.shape
        if len(shape) != 1:
            raise ValueError(f"PreferenceBatch tensors must be 1-D (B,), got policy_chosen {tuple(shape)}")
        for name in _FIELDS[1:]:
            got = tuple(getattr(self, name).shape)
            if got != tuple(shape):
                raise ValueError(f"PreferenceBatch.{name} has shape {got}, want {tuple(shape)}")

    @classmethod
    def fixed_length(
        cls, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, n_tokens: int
    ) -> PreferenceBatch:
        """A batch whose sessions all have `n_tokens` tokens (OneRec sessions: m*L)."""
        length = torch.full_like(policy_chosen, float(n_tokens))  # (B,)
        return cls(policy_chosen, policy_rejected, ref_chosen, ref_rejected, length, length.clone())


@dataclass(frozen=True)
class LossConfig:
    """Loss hyper-parameters; IPO uses `beta` as tau, only cDPO reads `label_smoothing`, only SimPO `simpo_gamma`."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO's epsilon: probability that a preference label is flipped, in [0, 0.5)
    simpo_gamma: float = 0.5  # SimPO's target reward margin gamma

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise UsageError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UsageError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not math.isfinite(self.simpo_gamma):
            raise UsageError(f"simpo_gamma must be finite, got {self.simpo_gamma}")


@dataclass(frozen=True)
class PreferenceStats:
    """Mean loss (differentiable scalar) and detached logging numbers over a batch."""

    loss: Tensor  # () mean per-example loss, with grad
    reward_margin: float  # mean(r_chosen - r_rejected) of the implicit rewards
    accuracy: float  # fraction of pairs with r_chosen > r_rejected
    chosen_reward: float  # mean r_chosen
    rejected_reward: float  # mean r_rejected


# ---- sequence log-probabilities ----------------------------------------------------------------------------


def sequence_logprob(logits: Tensor, targets: Tensor) -> tuple[Tensor, int]:
    """Sum over a session's tokens of log softmax(logits)[target], and the token count m*L.

    logits (B, m, L, K) from the teacher-forced forward `model(history, mask, targets).logits`; targets (B, m, L)
    codes. Computed in float32 at least (fp16/bf16 logits are upcast) as logit[target] - logsumexp(logit).
    """
    if logits.dim() < 2 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} + (K,)")
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    picked = x.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # (B, m, L)
    token_logp = picked - torch.logsumexp(x, dim=-1)  # (B, m, L)
    n_tokens = math.prod(targets.shape[1:])
    return token_logp.reshape(targets.shape[0], -1).sum(dim=1), n_tokens  # (B,), m*L


# ---- losses ------------------------------------------------------------------------------------------------


def log_ratio_margin(batch: PreferenceBatch) -> Tensor:
    """h = (pi_c - ref_c) - (pi_r - ref_r), shape (B,)."""
    return (batch.policy_chosen - batch.ref_chosen) - (batch.policy_rejected - batch.ref_rejected)


def dpo_loss(batch: PreferenceBatch, cfg: LossConfig) -> Tensor:
    """DPO (Rafailov et al. 2023): -log sigma(beta * h), shape (B,)."""
    return -F.logsigmoid(cfg.beta * log_ratio_margin(batch))


def cdpo_loss(batch: PreferenceBatch, cfg: LossConfig) -> Tensor:
    """Conservative DPO: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), eps = label_smoothing; shape (B,).

    Equals DPO at eps = 0 (and DPO + eps * beta * h in general).
    """
    logits = cfg.beta * log_ratio_margin(batch)  # (B,)
    eps = cfg.label_smoothing
    return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def ipo_loss(batch: PreferenceBatch, cfg: LossConfig) -> Tensor:
    """IPO (Azar et al. 2023): (h - 1 / (2 tau))^2 with tau = beta, shape (B,); minimal at h = 1 / (2 tau).

    h is the log-ratio difference of summed (not length-averaged) log-probabilities.
    """
    return (log_ratio_margin(batch) - 1.0 / (2.0 * cfg.beta)) ** 2


def simpo_loss(batch: PreferenceBatch, cfg: LossConfig) -> Tensor:
    """SimPO (Meng et al. 2024): -log sigma(beta (pi_c/|c| - pi_r/|r|) - gamma), reference-free; shape (B,)."""
    chosen, rejected = _simpo_rewards(batch, cfg)  # (B,) each
    return -F.logsigmoid(chosen - rejected - cfg.simpo_gamma)


PreferenceLoss = Callable[[PreferenceBatch, LossConfig], Tensor]

PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": dpo_loss,
    "cdpo": cdpo_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
}


def get_loss(name: str) -> PreferenceLoss:
    """The registered loss `name`; UsageError naming `--loss` and the known names otherwise."""
    try:
        return PREFERENCE_LOSSES[name]
    except KeyError:
        known = ", ".join(PREFERENCE_LOSSES)
        raise UsageError(f"--loss: unknown preference loss {name!r}; known: {known}") from None


def preference_loss(name: str, batch: PreferenceBatch, cfg: LossConfig) -> Tensor:
    """Per-example loss (B,) of the registered loss `name`."""
    return get_loss(name)(batch, cfg)


def mean_preference_loss(name: str, batch: PreferenceBatch, cfg: LossConfig) -> Tensor:
    """Mean over the batch of `preference_loss`, a differentiable scalar."""
    return preference_loss(name, batch, cfg).mean()


# ---- implicit rewards and logging ----------------------------------------------------------------------------


def _simpo_rewards(batch: PreferenceBatch, cfg: LossConfig) -> tuple[Tensor, Tensor]:
    chosen = cfg.beta * batch.policy_chosen / batch.chosen_len.to(batch.policy_chosen.dtype)  # (B,)
    rejected = cfg.beta * batch.policy_rejected / batch.rejected_len.to(batch.policy_rejected.dtype)  # (B,)
    return chosen, rejected


def implicit_rewards(name: str, batch: PreferenceBatch, cfg: LossConfig) -> tuple[Tensor, Tensor]:
    """Implicit rewards (r_chosen, r_rejected), each (B,), detached.

    SimPO: beta * pi / |y| (its reference-free reward); the others: beta * (pi - ref) (the DPO reward).
    """
    get_loss(name)
    with torch.no_grad():
        if name == "simpo":
            return _simpo_rewards(batch, cfg)
        chosen = cfg.beta * (batch.policy_chosen - batch.ref_chosen)  # (B,)
        rejected = cfg.beta * (batch.policy_rejected - batch.ref_rejected)  # (B,)
        return chosen, rejected


def preference_stats(name: str, batch: PreferenceBatch, cfg: LossConfig) -> PreferenceStats:
    """Mean loss (with grad) plus implicit-reward margin and accuracy (r_chosen > r_rejected) for logging."""
    loss = mean_preference_loss(name, batch, cfg)
    chosen, rejected = implicit_rewards(name, batch, cfg)
    return PreferenceStats(
        loss=loss,
        reward_margin=float((chosen - rejected).mean()),
        accuracy=float((chosen > rejected).float().mean()),
        chosen_reward=float(chosen.mean()),
        rejected_reward=float(rejected.mean()),
    )
