"""Fit and score the named baselines on one split: {"popular": {...}, "itemknn": ..., "ease": ..., "sasrec": ...}."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from onerec.baselines.ease import EASEConfig, ease_scorer, ease_weights
from onerec.baselines.itemknn import ItemKNNConfig, itemknn_scorer, itemknn_similarity
from onerec.baselines.popular import popular_scorer
from onerec.baselines.protocol import HeldOut, TrainMatrix, evaluate_scorer
from onerec.baselines.sasrec import SASRecConfig, sasrec_scorer, train_sasrec

log = logging.getLogger(__name__)

NAMES = ("popular", "itemknn", "ease", "sasrec")


@dataclass(frozen=True)
class BaselinesConfig:
    itemknn: ItemKNNConfig = field(default_factory=ItemKNNConfig)
    ease: EASEConfig = field(default_factory=EASEConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)


def check_names(only: Sequence[str] | None) -> tuple[str, ...]:
    """The baselines to run, in NAMES order; ValueError naming an unknown one."""
    if not only:
        return NAMES
    unknown = [n for n in only if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {', '.join(NAMES)}")
    return tuple(n for n in NAMES if n in only)


def run_baselines(data: TrainMatrix, users: HeldOut, val: HeldOut, cfg: BaselinesConfig | None = None,
                  only: Sequence[str] | None = None, progress: bool = False) -> dict[str, dict]:
    """Each baseline's metrics on `users` (recall/ndcg @5 and @10) plus `seconds` (fit + score); SASRec also
    `best_epoch` (early-stopped on `val`)."""
    cfg = cfg or BaselinesConfig()
    results: dict[str, dict] = {}
    for name in check_names(only):
        started = time.time()
        extra: dict = {}
        if name == "popular":
            scorer = popular_scorer(data.matrix)
        elif name == "itemknn":
            scorer = itemknn_scorer(itemknn_similarity(data.matrix, cfg.itemknn))
        elif name == "ease":
            scorer = ease_scorer(ease_weights(data.matrix, cfg.ease))
        else:
            trained = train_sasrec(data, val, cfg.sasrec, progress=progress)
            scorer = sasrec_scorer(trained.model, next(trained.model.parameters()).device)
            extra = {"best_epoch": trained.best_epoch, "epochs": len(trained.history)}
        metrics = evaluate_scorer(scorer, data, users)
        results[name] = {**metrics, **extra, "seconds": round(time.time() - started, 1)}
        log.info("baselines: %s %s", name, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return results
