"""Iterative Preference Alignment (paper §3.3.2, Algorithm 2): self-generated pairs picked by reward, NTP + λ·DPO.

Each iteration t starts from model t−1 (t = 1 from the NTP-trained base), freezes a copy as the DPO reference,
beam-searches `responses` sessions for a sampled fraction `dpo_ratio` of the training users with the current
model, scores them with the reward model, keeps the best as chosen and the worst as rejected, then runs one pass
over the training sessions with loss = NTP + aux + λ · preference loss (the preference pairs spread evenly over
the NTP batches). The result is saved as a model directory that loads, evaluates and exports like `RUN/model`.

Legend: U sampled users, N responses per user, P pairs, B batch, m items per session, L levels.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from onerec.align.losses import LossConfig, PreferenceBatch, get_loss, preference_stats, sequence_logprob
from onerec.align.pairs import PreferencePairs, gather_pairs, sample_users, select_pairs
from onerec.config import BeamConfig
from onerec.data.sid import SidSessions, pad_histories
from onerec.errors import UsageError
from onerec.eval import REWARD_TARGETS, SessionScorer
from onerec.model.generate import generate
from onerec.model.onerec import OneRecModel, save_model
from onerec.tokenizer.catalog import Catalog
from onerec.train.ntp import epoch_batches, session_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignConfig:
    """One IPA run: T iterations of (generate, score, pick pairs, NTP + λ·preference loss)."""

    iterations: int = 1  # T
    dpo_ratio: float = 0.01  # r_DPO: fraction of training sessions whose user gets self-generated pairs
    responses: int = 128  # N sessions beam-searched per sampled user (beam width = N)
    loss: str = "dpo"  # a name of onerec.align.losses.PREFERENCE_LOSSES
    beta: float = 0.1
    lam: float = 1.0  # λ: weight of the preference loss beside NTP
    label_smoothing: float = 0.0  # cDPO's ε
    target: str = "swt"  # the reward tower that picks chosen / rejected
    lr: float = 2e-5  # the NTP schedule's final rate: higher trades recall for reward (docs/ALIGNMENT.md)
    batch_size: int = 64
    grad_clip: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """UsageError naming the first option that cannot work."""
        if self.iterations < 1:
            raise UsageError(f"--iterations: must be >= 1, got {self.iterations}")
        if not 0 < self.dpo_ratio <= 1:
            raise UsageError(f"--dpo-ratio: must lie in (0, 1], got {self.dpo_ratio}")
        if not 2 <= self.responses <= 1024:
            raise UsageError(f"--responses: must lie in [2, 1024], got {self.responses}")
        if self.target not in REWARD_TARGETS:
            raise UsageError(f"--target: one of {', '.join(REWARD_TARGETS)}, got {self.target!r}")
        if self.lam < 0 or self.lr <= 0:
            raise UsageError(f"--lam must be >= 0 and --lr > 0, got {self.lam} and {self.lr}")
        get_loss(self.loss)


@dataclass(frozen=True)
class Preferences:
    """What one iteration trains on besides NTP: P (history, chosen, rejected) triples and their rewards."""

    histories: list[np.ndarray]  # P arrays (n_i, L)
    chosen: np.ndarray  # (P, m, L) SIDs
    rejected: np.ndarray  # (P, m, L) SIDs
    pairs: PreferencePairs

    def __len__(self) -> int:
        return len(self.histories)


def self_generated_pairs(model: OneRecModel, catalog: Catalog, histories: list[np.ndarray], scorer: SessionScorer,
                         cfg: AlignConfig, device: torch.device) -> Preferences:
    """Beam-search N sessions per history with the current model, score them, keep (best, worst) per user."""
    # as served: the user's history is excluded (a session of already-watched items is not a candidate)
    beam = BeamConfig(beam_width=cfg.responses, num_sessions=cfg.responses, exclude_history=True)
    target = REWARD_TARGETS.index(cfg.target)
    kept_histories, sessions, scores = [], [], []
    model.eval()
    for start in range(0, len(histories), 8):
        chunk = histories[start : start + 8]
        seen = [catalog.trie.leaf_of(h) for h in chunk]
        result = generate(model, catalog.trie, chunk, beam, exclude=[s[s >= 0] for s in seen], device=device)
        found = result.sessions.cpu().numpy()  # (b, N, m, L), -1 rows where fewer than N sessions exist
        reward = scorer(chunk, found)[:, :, target]  # (b, N)
        for b, history in enumerate(chunk):
            complete = found[b, :, 0, 0] >= 0
            if complete.all():  # users with fewer than N sessions would compare unequal sets: skipped
                kept_histories.append(history)
                sessions.append(found[b])
                scores.append(reward[b])
    if not sessions:
        none = np.zeros(0, dtype=np.int64)
        empty = np.zeros((0, model.cfg.session_len, model.cfg.levels), dtype=np.int64)
        return Preferences([], empty, empty, PreferencePairs(none, none, none, none.astype(float), none.astype(float)))
    pairs = select_pairs(np.stack(scores))  # drops users whose best and worst tie
    chosen, rejected = gather_pairs(np.stack(sessions), pairs)
    return Preferences([kept_histories[u] for u in pairs.users], chosen, rejected, pairs)


def pair_logprobs(model: OneRecModel, histories: list[np.ndarray], chosen: np.ndarray, rejected: np.ndarray,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(log π(chosen | h), log π(rejected | h), tokens) under `model`, teacher-forced: (P,), (P,), m·L."""
    history, mask = pad_histories(histories, model.cfg.history_len)
    history, mask = history.to(device), mask.to(device)
    both = torch.from_numpy(np.concatenate([chosen, rejected])).to(device)  # (2P, m, L)
    logits = model(torch.cat([history, history]), torch.cat([mask, mask]), both).logits  # (2P, m, L, K)
    logp, tokens = sequence_logprob(logits, both)
    return logp[: len(histories)], logp[len(histories) :], tokens


def pair_batches(n_pairs: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The P pairs shuffled and spread over `steps` NTP batches (some batches get none when P < steps)."""
    order = rng.permutation(n_pairs)
    return [order[(i * n_pairs) // steps : ((i + 1) * n_pairs) // steps] for i in range(steps)]


@dataclass(frozen=True)
class IterationResult:
    iteration: int
    users: int
    pairs: int
    chosen_reward: float  # mean reward (cfg.target) of the chosen sessions
    rejected_reward: float
    ntp_loss: float
    preference_loss: float
    preference_accuracy: float  # share of pairs whose implicit reward ranks chosen above rejected (last batches)
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def align_iteration(model: OneRecModel, catalog: Catalog, train_data: SidSessions, scorer: SessionScorer,
                    cfg: AlignConfig, iteration: int, device: torch.device, progress: bool = False
                    ) -> IterationResult:
    """One IPA iteration, in place on `model` (its reference is a frozen copy taken first)."""
    started = time.time()
    rng = np.random.default_rng([cfg.seed, iteration])
    torch.manual_seed(cfg.seed * 1_000_003 + iteration)
    users = sample_users(len(train_data), cfg.dpo_ratio, rng)
    prefs = self_generated_pairs(model, catalog, train_data.histories(users), scorer, cfg, device)
    log.info("iteration %d: %d users sampled, %d preference pairs", iteration, len(users), len(prefs))
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    loss_cfg = LossConfig(beta=cfg.beta, label_smoothing=cfg.label_smoothing)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches = epoch_batches(train_data.lengths, cfg.batch_size, rng)
    spread = pair_batches(len(prefs), len(batches), rng)
    ntp_losses, pref_losses, accuracies = [], [], []
    model.train()
    bar = tqdm(zip(batches, spread, strict=True), total=len(batches), desc=f"align {iteration}/{cfg.iterations}",
               disable=not progress, leave=False)
    for idx, pair_idx in bar:
        history, mask, targets = (t.to(device) for t in train_data.batch(idx, model.cfg.history_len))
        ce, aux = session_loss(model, history, mask, targets)
        loss = ce + model.cfg.aux_loss_coef * aux
        if len(pair_idx):
            stats = preference_step(model, reference, prefs, pair_idx, cfg.loss, loss_cfg, device)
            loss = loss + cfg.lam * stats.loss
            pref_losses.append(stats.loss.item())
            accuracies.append(stats.accuracy)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        ntp_losses.append(ce.item())
    return IterationResult(
        iteration=iteration, users=len(users), pairs=len(prefs),
        chosen_reward=float(prefs.pairs.chosen_score.mean()) if len(prefs) else math.nan,
        rejected_reward=float(prefs.pairs.rejected_score.mean()) if len(prefs) else math.nan,
        ntp_loss=float(np.mean(ntp_losses)),
        preference_loss=float(np.mean(pref_losses)) if pref_losses else math.nan,
        preference_accuracy=float(np.mean(accuracies[-10:])) if accuracies else math.nan,
        seconds=time.time() - started)


def preference_step(model: OneRecModel, reference: OneRecModel, prefs: Preferences, pair_idx: np.ndarray,
                    loss: str, loss_cfg: LossConfig, device: torch.device):
    """The preference loss (with gradients for `model`) of the pairs `pair_idx`."""
    histories = [prefs.histories[i] for i in pair_idx]
    chosen, rejected = prefs.chosen[pair_idx], prefs.rejected[pair_idx]
    policy_c, policy_r, tokens = pair_logprobs(model, histories, chosen, rejected, device)
    with torch.no_grad():
        ref_c, ref_r, _ = pair_logprobs(reference, histories, chosen, rejected, device)
    batch = PreferenceBatch.fixed_length(policy_c, policy_r, ref_c, ref_r, tokens)
    return preference_stats(loss, batch, loss_cfg)


def align(model: OneRecModel, catalog: Catalog, train_data: SidSessions, scorer: SessionScorer, cfg: AlignConfig,
          out_dir: Path, device: torch.device, progress: bool = False,
          on_iteration: Callable[[IterationResult, Path], None] | None = None) -> list[IterationResult]:
    """T iterations; model t is saved to `out_dir/iter_t/` (a model directory like RUN/model)."""
    cfg.check()
    if len(train_data) == 0:
        raise UsageError("no training sessions to align on")
    results = []
    for t in range(1, cfg.iterations + 1):
        result = align_iteration(model, catalog, train_data, scorer, cfg, t, device, progress)
        directory = save_model(model, out_dir / f"iter_{t}")
        log.info("iteration %d: %d pairs, chosen %.3f vs rejected %.3f, preference loss %.4f, ntp %.4f -> %s", t,
                 result.pairs, result.chosen_reward, result.rejected_reward, result.preference_loss, result.ntp_loss,
                 directory)
        results.append(result)
        if on_iteration is not None:
            on_iteration(result, directory)
    return results
