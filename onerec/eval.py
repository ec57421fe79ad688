"""Offline evaluation: Recall@k / NDCG@k of generated sessions vs held-out targets, valid-SID rate, popular baseline."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from onerec.config import BeamConfig
from onerec.data.sessions import Sessions
from onerec.model.generate import generate
from onerec.model.onerec import OneRecModel
from onerec.recommend import sessions_to_videos
from onerec.tokenizer.catalog import Catalog

log = logging.getLogger(__name__)


def recall_at_k(recommended: Sequence[int], target: Sequence[int], k: int = 5) -> float:
    """|top-k ∩ target| / |target|."""
    if not target:
        return 0.0
    return len(set(recommended[:k]) & set(target)) / len(set(target))


def ndcg_at_k(recommended: Sequence[int], target: Sequence[int], k: int = 5) -> float:
    """Binary-relevance NDCG@k: DCG = sum 1/log2(rank+1) over hits, normalised by the ideal ordering."""
    relevant = set(target)
    dcg = sum(1.0 / math.log2(i + 2) for i, v in enumerate(recommended[:k]) if v in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal if ideal else 0.0


def score_recommendations(recommended: Sequence[Sequence[int]] | np.ndarray,
                          targets: Sequence[Sequence[int]] | np.ndarray, k: int = 5) -> tuple[float, float]:
    """Mean Recall@k and NDCG@k over U users: row u of `recommended` (U, >=k) video ids vs targets[u] (U, m).

    The one metric code: `evaluate` scores the model and most-popular with it, `onerec.baselines` the rest."""
    if len(recommended) != len(targets):
        raise ValueError(f"score_recommendations: {len(recommended)} recommendation rows for {len(targets)} targets")
    recs = [list(r) for r in (recommended.tolist() if isinstance(recommended, np.ndarray) else recommended)]
    tgts = [list(t) for t in (targets.tolist() if isinstance(targets, np.ndarray) else targets)]
    recalls = [recall_at_k(r, t, k) for r, t in zip(recs, tgts, strict=True)]
    ndcgs = [ndcg_at_k(r, t, k) for r, t in zip(recs, tgts, strict=True)]
    return float(np.mean(recalls)), float(np.mean(ndcgs))


# (histories: b arrays (n_i, L) of SIDs, sessions (b, R, m, L) SIDs with -1 rows for missing) -> (b, R, T) scores
SessionScorer = Callable[[list[np.ndarray], np.ndarray], np.ndarray]
REWARD_TARGETS = ("swt", "vtr", "wtr", "ltr")


PROTOCOLS = ("session", "leave_one_out")
CUTOFFS = (5, 10)  # every metric is reported at 5 and 10


@dataclass(frozen=True)
class EvalResult:
    model_recall: float  # @5
    model_ndcg: float
    popular_recall: float
    popular_ndcg: float
    valid_sid_rate: float
    users: int
    seconds: float
    reward: dict[str, dict[str, float]] | None = field(default=None)  # target -> {"mean", "max"}
    at10: dict[str, dict[str, float]] = field(default_factory=dict)  # "model" | "popular" -> recall@10, ndcg@10
    protocol: str = "session"

    def as_json(self) -> dict:
        """The CLI's `--json` object: per model the same metric keys as `onerec baselines --json`."""
        payload = {
            "model": {"recall@5": self.model_recall, "ndcg@5": self.model_ndcg, **self.at10.get("model", {})},
            "popular": {"recall@5": self.popular_recall, "ndcg@5": self.popular_ndcg,
                        **self.at10.get("popular", {})},
            "valid_sid_rate": self.valid_sid_rate,
            "users": self.users,
            "protocol": self.protocol,
        }
        if self.reward is not None:
            payload["reward"] = self.reward
        return payload


def reward_summary(per_user_mean: list[np.ndarray], per_user_max: list[np.ndarray],
                   targets: Sequence[str] = REWARD_TARGETS) -> dict[str, dict[str, float]]:
    """Users' mean and max reward over their generated sessions, averaged over users, per target."""
    means, maxes = np.stack(per_user_mean), np.stack(per_user_max)  # (U, T)
    return {t: {"mean": float(means[:, i].mean()), "max": float(maxes[:, i].mean())} for i, t in enumerate(targets)}


def session_rewards(scorer: SessionScorer, histories: list[np.ndarray], sessions: np.ndarray
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per user, the mean and the max of each reward target over the sessions beam search found."""
    scores = scorer(histories, sessions)  # (b, R, T)
    found = sessions[:, :, 0, 0] >= 0  # (b, R)
    means, maxes = [], []
    for b in range(scores.shape[0]):
        mine = scores[b][found[b]]  # (R', T)
        if len(mine):
            means.append(mine.mean(axis=0))
            maxes.append(mine.max(axis=0))
    return means, maxes


@torch.inference_mode()
def evaluate(
    model: OneRecModel,
    catalog: Catalog,
    sessions: Sessions,
    beam: BeamConfig,
    k: int = 5,
    batch_size: int = 16,
    limit: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    scorer: SessionScorer | None = None,
    protocol: str = "session",
    new_item_share: float = 0.0,
) -> EvalResult:
    """Generate a session per held-out user and score it and the most-popular baseline on the same users, at
    `k` and at 10.

    Both exclude the user's history when `beam.exclude_history` (MovieLens users rate a movie once, so the
    history can never be a hit). The model's answer is exactly what the gateway serves: the best session
    mapped through the inverted index, backfilled from later sessions and then from popularity. With a
    `scorer` (the reward model), every generated session is scored too: `reward` holds, per target, the users'
    mean and max over their sessions, averaged over users (the paper's IPA table).

    The model's answer under the session protocol is generated as the gateway does: sessions of
    `beam.session_len` items (1, the default: beam search's best next items in score order; 0: whole m-item
    sessions). The top 10 is the served answer continued the same way (the best session, then the later
    sessions' new items); under `leave_one_out` (one target item), beam search over the first item
    of the session only, the ten best distinct first items in score order (TIGER's ranked list); the valid-SID
    rate then counts those items, and the reward (a session-level score) is not computed. `new_item_share` is the
    gateway's ONEREC_NEW_ITEM_SHARE: new items placed by prefix match (`sessions_to_videos`).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"evaluate: unknown protocol {protocol!r}; use {' or '.join(PROTOCOLS)}")
    top = max(k, *CUTOFFS)
    ranked = dataclasses.replace(beam, beam_width=max(beam.beam_width, top), num_sessions=top)
    model.eval()
    started = time.time()
    rows = [i for i in range(len(sessions)) if (catalog.rows_of(sessions.history_of(i)) >= 0).any()]
    rows = rows[:limit] if limit else rows
    if not rows:
        raise ValueError("no evaluable users: no held-out session has a history item known to the catalog")
    model_lists: list[list[int]] = []
    popular_lists: list[list[int]] = []
    targets: list[list[int]] = []
    generated, valid = 0, 0
    reward_means: list[np.ndarray] = []
    reward_maxes: list[np.ndarray] = []
    bar = tqdm(total=len(rows), desc="evaluate", unit="user", disable=not progress)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        histories_video = [sessions.history_of(i) for i in chunk]
        histories = [catalog.known_sids(h) for h in histories_video]
        exclude = [catalog.leaves_of(h) for h in histories_video]
        allowed = [e[e >= 0] for e in exclude]
        if protocol == "leave_one_out":  # one target: the best first items, as a ranked list
            result = generate(model, catalog.trie, histories, ranked, exclude=allowed, device=device, session_len=1)
        else:  # what the gateway serves: sessions of beam.session_len items (1: the ranked next items)
            result = generate(model, catalog.trie, histories, beam, exclude=allowed, device=device,
                              session_len=beam.session_len or None)
        best = result.sessions[:, 0].cpu().numpy()  # (b, m, L), m = 1 under leave_one_out
        found = best[:, :, 0] >= 0
        generated += int(found.sum())
        valid += int((catalog.trie.leaf_of(best[found]) >= 0).sum())
        leaves = result.leaves.cpu().numpy()  # (b, R, m)
        if scorer is not None and protocol == "session":  # the reward model scores whole m-item sessions
            whole = result if result.sessions.shape[2] == model.cfg.session_len else generate(
                model, catalog.trie, histories, beam, exclude=allowed, device=device)
            means, maxes = session_rewards(scorer, histories, whole.sessions.cpu().numpy())
            reward_means += means
            reward_maxes += maxes
        for row, hist, session_leaves in zip(chunk, histories_video, leaves, strict=True):
            banned = hist.tolist() if beam.exclude_history else []
            model_lists.append(list(sessions_to_videos(catalog, session_leaves, exclude=banned, k=top,
                                                       new_share=new_item_share).video_ids))
            popular_lists.append(catalog.most_popular(top, exclude=banned).tolist())
            targets.append([int(v) for v in sessions.targets[row] if v >= 0])
        bar.update(len(chunk))
    bar.close()
    model_recall, model_ndcg = score_recommendations(model_lists, targets, k)
    popular_recall, popular_ndcg = score_recommendations(popular_lists, targets, k)
    at10 = {name: dict(zip(("recall@10", "ndcg@10"), score_recommendations(lists, targets, 10), strict=True))
            for name, lists in (("model", model_lists), ("popular", popular_lists))}
    return EvalResult(
        model_recall=model_recall,
        model_ndcg=model_ndcg,
        popular_recall=popular_recall,
        popular_ndcg=popular_ndcg,
        valid_sid_rate=valid / generated if generated else 0.0,
        users=len(rows),
        seconds=time.time() - started,
        reward=reward_summary(reward_means, reward_maxes) if scorer is not None and reward_means else None,
        at10=at10,
        protocol=protocol,
    )


