"""Reward model training on logged sessions: SID batches, the Adam loop, AUC, persistence and `score_sessions`.

`onerec train-reward` writes RUN/reward/{model.safetensors, model.json} and then, last, the marker RUN/reward.json
(config, label mapping, per-epoch and best validation metrics, catalog hash). Validation "AUC" is the
concordance of scores with the soft session labels (Harrell's C: over session pairs with different labels, the
share ordered the same way, ties in score counting half), which is exactly the ROC AUC when labels are 0/1.
The kept epoch is the one with the best mean validation AUC (IPA only ranks sessions). `val_auc_rated` repeats
the AUC on the validation windows without skipped impressions: the ranking among items users really rated.

Legend: S sessions, B batch, N history positions, m session items, L levels, T targets (4).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from onerec.config import DataConfig
from onerec.data.interactions import Interactions
from onerec.data.sid import known_histories, pad_histories
from onerec.device import resolve_device
from onerec.errors import UsageError
from onerec.reward.labels import TARGETS, LoggedSessions, build_logged_sessions
from onerec.reward.model import RewardConfig, RewardModel, load_reward_model, reward_loss
from onerec.runs import RunDir
from onerec.tokenizer.catalog import Catalog
from onerec.train.ntp import epoch_batches

log = logging.getLogger(__name__)

STAGE = "reward"  # RUN/reward.json is the marker, RUN/reward/ the model


@dataclass(frozen=True)
class RewardData:
    """Logged sessions in SID space, ready for batching. Unknown history videos are dropped."""

    history: np.ndarray  # (H, L) int64 SIDs, each session's history most recent first, concatenated
    offsets: np.ndarray  # (S+1,) int64
    sessions: np.ndarray  # (S, m, L) int64 SIDs
    labels: np.ndarray  # (S, T) float32 soft labels in TARGETS order

    def __len__(self) -> int:
        return int(self.sessions.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_logged(cls, logged: LoggedSessions, catalog: Catalog, history_len: int) -> RewardData:
        """Translate to SIDs; keep sessions whose items are catalog items and whose history has a known item."""
        item_sids = catalog.sids_of(logged.items.reshape(-1)).reshape(len(logged), -1, catalog.levels)
        rows, history, offsets = known_histories(catalog, logged.history, logged.history_offsets, item_sids,
                                                 history_len)
        return cls(history, offsets, item_sids[rows], logged.labels[rows])

    def batch(self, idx: np.ndarray, history_len: int) -> tuple[torch.Tensor, ...]:
        """history (B, N, L), mask (B, N), session (B, m, L), labels (B, T) for the sessions `idx`."""
        histories = [self.history[self.offsets[i] : self.offsets[i + 1]] for i in idx]
        history, mask = pad_histories(histories, history_len)
        return history, mask, torch.from_numpy(self.sessions[idx]), torch.from_numpy(self.labels[idx])


def concordance(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC generalised to graded labels (Harrell's C); the ROC AUC for 0/1 labels; nan with one label value.

    Over all pairs (i, j) with labels[i] > labels[j]: the share with scores[i] > scores[j], ties counting 1/2.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    levels = np.unique(labels)
    concordant, pairs = 0.0, 0
    for below, level in zip(levels[:-1], levels[1:], strict=True):
        lower = np.sort(scores[labels <= below])  # every session with a smaller label
        upper = scores[labels == level]
        left = np.searchsorted(lower, upper, side="left")
        right = np.searchsorted(lower, upper, side="right")
        concordant += float(left.sum() + 0.5 * (right - left).sum())
        pairs += len(lower) * len(upper)
    return concordant / pairs if pairs else float("nan")


@torch.no_grad()
def predict(model: RewardModel, data: RewardData, batch_size: int, device: torch.device) -> np.ndarray:
    """Logits (S, T) for every session of `data` (eval mode), in data order."""
    model.eval()
    out = np.zeros((len(data), len(TARGETS)), dtype=np.float32)
    order = np.argsort(data.lengths, kind="stable")  # similar lengths together: less padding
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        history, mask, session, _ = (t.to(device) for t in data.batch(idx, model.cfg.history_len))
        out[idx] = model(history, mask, session).float().cpu().numpy()
    return out


def evaluate(model: RewardModel, data: RewardData, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Validation BCE (mean over sessions, summed over towers) and per-target AUC (`concordance`)."""
    if len(data) == 0:
        return {"bce": float("nan"), "auc": {name: float("nan") for name in TARGETS}}
    logits = predict(model, data, batch_size, device)
    bce = float(reward_loss(torch.from_numpy(logits), torch.from_numpy(data.labels)))
    auc = {name: concordance(logits[:, t], data.labels[:, t]) for t, name in enumerate(TARGETS)}
    return {"bce": bce, "auc": auc}


@dataclass(frozen=True)
class RewardResult:
    model: RewardModel  # the epoch with the best mean validation AUC (eval mode)
    best_epoch: int
    best: dict[str, Any]  # that epoch's validation metrics
    history: list[dict[str, Any]]
    seconds: float


def train_reward(
    cfg: RewardConfig, train_data: RewardData, val_data: RewardData, progress: bool = True
) -> RewardResult:
    """Adam on the soft-label BCE; validation BCE and AUC each epoch; keeps the weights of the epoch with the best
    mean validation AUC: IPA only ranks sessions by reward (chosen = best, rejected = worst), and on ml-100k the
    validation BCE bottomed out an epoch or two before the AUC did."""
    if len(train_data) == 0:
        raise UsageError("no logged training sessions: the data has too few rated items per user")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = RewardModel(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict[str, Any]] = []
    best_state, best_epoch, best, best_auc = copy.deepcopy(model.state_dict()), 0, {"bce": math.inf}, -math.inf
    started = time.time()
    log.info("reward: training on %d sessions (%d val) for %d epochs on %s", len(train_data), len(val_data),
             cfg.epochs, device)
    for epoch in range(cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # the dropout stream of this epoch
        model.train()
        losses = []
        bar = tqdm(epoch_batches(train_data.lengths, cfg.batch_size, rng), desc=f"reward {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False)
        for idx in bar:
            history_t, mask, session, labels = (t.to(device) for t in train_data.batch(idx, cfg.history_len))
            loss = reward_loss(model(history_t, mask, session), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(bce=f"{np.mean(losses[-50:]):.3f}")
        metrics = evaluate(model, val_data, cfg.batch_size * 2, device)
        record = {"epoch": epoch + 1, "train_bce": float(np.mean(losses)), "val_bce": metrics["bce"],
                  "val_auc": metrics["auc"], "seconds": round(time.time() - started, 1)}
        history.append(record)
        log.info("reward epoch %d/%d train_bce %.4f val_bce %.4f val_auc %s", epoch + 1, cfg.epochs,
                 record["train_bce"], metrics["bce"], {k: round(v, 3) for k, v in metrics["auc"].items()})
        mean_auc = float(np.mean(list(metrics["auc"].values())))
        if not mean_auc <= best_auc:  # also true without validation data (nan): keep the last
            best_state, best_epoch, best, best_auc = copy.deepcopy(model.state_dict()), epoch + 1, metrics, mean_auc
    model.load_state_dict(best_state)
    return RewardResult(model.eval(), best_epoch, best, history, time.time() - started)


# ---- scoring (what IPA calls) ------------------------------------------------------------------------


@torch.inference_mode()
def score_sessions(
    model: RewardModel, histories: Sequence[np.ndarray], sessions: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Probabilities (B, T) in TARGETS order for B sessions (B, m, L) SIDs, each with its SID history (n_i, L),
    most recent first, n_i >= 1 (longer ones keep their history_len most recent items). Runs in eval mode on
    the model's device; the model's train/eval mode is restored afterwards."""
    sessions = np.asarray(sessions, dtype=np.int64)
    if sessions.ndim != 3 or sessions.shape[0] != len(histories) or sessions.shape[2] != model.cfg.levels:
        raise ValueError(f"score_sessions: sessions {sessions.shape} must be (B={len(histories)}, m, "
                         f"L={model.cfg.levels})")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros((len(histories), len(TARGETS)), dtype=np.float32)
    for start in range(0, len(histories), batch_size):
        stop = min(start + batch_size, len(histories))
        history, mask = pad_histories(histories[start:stop], model.cfg.history_len)
        session = torch.from_numpy(sessions[start:stop])
        out[start:stop] = torch.sigmoid(model(history.to(device), mask.to(device), session.to(device))).cpu().numpy()
    model.train(was_training)
    return out


# ---- in a run directory (the stage itself: onerec.stages.train_reward) -------------------------------


def reward_dir(run: RunDir) -> Path:
    """RUN/reward: the selected reward model."""
    return run.root / STAGE


def load_reward(run_dir: Path, device: str | torch.device = "cpu") -> RewardModel:
    """The reward model of a run (eval mode); UsageError if `onerec train-reward` has not completed there."""
    run = RunDir(Path(run_dir))
    if not run.is_complete(STAGE):
        raise UsageError(f"--run: {run.root} has no completed reward model; run `onerec train-reward` first")
    trained_on = run.read_marker(STAGE).get("catalog_hash")
    if trained_on != Catalog.read_hash(run.catalog):
        raise UsageError(f"{run.catalog}: catalog hash differs from the one the reward model was trained on; "
                         "run `onerec train-reward` again")
    return load_reward_model(reward_dir(run), device=device)


def reward_config_for(cfg: RewardConfig, catalog: Catalog, data: DataConfig) -> RewardConfig:
    """The preset's reward config with the catalog's L and K and the run's session length."""
    return dataclasses.replace(cfg, levels=catalog.levels, codes=catalog.num_codes, session_len=data.session_len)


def check_config(cfg: RewardConfig) -> None:
    """UsageError naming the first option that cannot work."""
    for name in ("epochs", "batch_size", "stride", "history_len", "copies"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.seed < 0:
        raise UsageError(f"--seed: must be >= 0, got {cfg.seed}")
    if cfg.lr <= 0 or not 0.0 <= cfg.skip_prob <= 1.0:
        raise UsageError(f"reward config: lr must be > 0 and skip_prob in [0, 1], got {cfg.lr}, {cfg.skip_prob}")


def build_reward_data(
    run: RunDir, catalog: Catalog, cfg: RewardConfig, data: DataConfig, skip_prob: float | None = None
) -> tuple[RewardData, RewardData]:
    """(train, val) RewardData from the run's interactions (see `onerec.reward.labels`); `skip_prob` overrides
    the config's (0 gives the logged sessions exactly as rated)."""
    split = build_logged_sessions(Interactions.load(run.interactions), catalog.video_ids, data,
                                  history_len=cfg.history_len, stride=cfg.stride,
                                  skip_prob=cfg.skip_prob if skip_prob is None else skip_prob, seed=cfg.seed,
                                  copies=cfg.copies)
    return (RewardData.from_logged(split.train, catalog, cfg.history_len),
            RewardData.from_logged(split.val, catalog, cfg.history_len))


def session_scorer(model: RewardModel, batch_size: int = 256) -> Callable[[list[np.ndarray], np.ndarray], np.ndarray]:
    """The reward model as the `SessionScorer` of `onerec.eval` and the IPA loop: (histories (b of (n_i, L)),
    sessions (b, R, m, L) with -1 rows for missing ones) -> (b, R, T) probabilities (missing rows score garbage:
    callers mask them)."""

    def score(histories: list[np.ndarray], sessions: np.ndarray) -> np.ndarray:
        b, R, m, L = sessions.shape
        flat = np.where(sessions < 0, 0, sessions).reshape(b * R, m, L)  # (bR, m, L)
        repeated = [h for h in histories for _ in range(R)]
        return score_sessions(model, repeated, flat, batch_size).reshape(b, R, -1)

    return score
