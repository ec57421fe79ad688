"""Balanced residual k-means: item embeddings (N, d) -> semantic IDs (N, L), codebooks and a quality report."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from onerec.config import TokenizerConfig
from onerec.device import resolve_device
from onerec.errors import UsageError
from onerec.tokenizer.kmeans import balanced_kmeans, check_k
from onerec.tokenizer.unique import cap_groups, distinct_last_codes

# Shapes legend: N items, K codes per level, L levels, d embedding dim, U unique SIDs.

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeResult:
    """What `residual_quantize` produces."""

    sids: np.ndarray  # (N, L) int32 semantic IDs, row i = item i of the input
    codebooks: list[np.ndarray]  # L arrays (K, d) float32; item i ~ sum_l codebooks[l][sids[i, l]]
    report: dict[str, Any]  # JSON-ready quality numbers (see `residual_quantize`)


def _check_embeddings(x: np.ndarray) -> np.ndarray:
    """(N, d) float32 copy of `x`, or ValueError for a wrong shape or non-finite values."""
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"residual_quantize needs a non-empty (N, d) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("residual_quantize: embeddings contain NaN or infinity")
    return arr


def level_report(level: int, assign: torch.Tensor, residual: torch.Tensor, k: int, seconds: float) -> dict:
    """One level's numbers: code utilisation, cluster size range, mean squared residual norm after it."""
    counts = torch.bincount(assign, minlength=k)  # (K,)
    return {
        "level": level,
        "utilisation": float((counts > 0).sum()) / k,
        "min_cluster": int(counts.min()),
        "max_cluster": int(counts.max()),
        "reconstruction_mse": float((residual.double() ** 2).sum(1).mean()),
        "seconds": round(seconds, 3),
    }


def collision_stats(sids: np.ndarray) -> dict[str, Any]:
    """num_unique_sids, collision_rate (the fraction of items whose full SID another item shares) and coverage
    (the fraction of items some SID leads to: unique SIDs / items)."""
    _, inverse, counts = np.unique(sids, axis=0, return_inverse=True, return_counts=True)
    shared = counts[inverse.reshape(-1)] > 1  # (N,)
    # coverage: the inverted index serves one video per SID, so only that many items can ever be recommended
    return {"num_unique_sids": int(counts.shape[0]), "collision_rate": float(shared.mean()),
            "coverage": float(counts.shape[0] / sids.shape[0])}


def _make_room(codes: list[np.ndarray], level: int, levels: int, assign: torch.Tensor, residual: torch.Tensor,
               centroids: torch.Tensor, k: int) -> torch.Tensor:
    """With `unique`: at level L-2 no prefix group may exceed K items, at level L-1 codes are distinct per prefix."""
    if level < levels - 2:
        return assign
    prefix = np.stack(codes, axis=1) if codes else np.zeros((assign.shape[0], 0), dtype=np.int32)  # (N, level)
    args = (prefix, assign.cpu().numpy(), residual.cpu().numpy(), centroids.cpu().numpy())
    fixed = cap_groups(*args, cap=k) if level == levels - 2 else distinct_last_codes(*args)
    return torch.from_numpy(np.asarray(fixed, dtype=np.int64)).to(assign.device)


def fit_shape(cfg: TokenizerConfig, n: int, codes_given: bool = False, levels_given: bool = False) -> TokenizerConfig:
    """The preset's K x L fitted to a catalogue of `n` items, where the user did not set them: K at most N, and
    with `unique` enough levels that K^L >= N (a preset's two levels of 128 hold 16,384 items; more items get a
    third level instead of a UsageError). What the user set is kept and checked by `residual_quantize`."""
    codes, levels = cfg.codes, cfg.levels
    if not codes_given and codes > n:
        codes = max(2, n)
    if cfg.unique and not levels_given:
        while codes**levels < n:
            levels += 1
    if (codes, levels) != (cfg.codes, cfg.levels):
        log.info("tokenize: %d items: K x L = %d x %d instead of the preset's %d x %d", n, codes, levels,
                 cfg.codes, cfg.levels)
    return dataclasses.replace(cfg, codes=codes, levels=levels)


def residual_quantize(x: np.ndarray, cfg: TokenizerConfig) -> QuantizeResult:
    """Tokenize items: level l clusters the residual x - sum_{j<l} centroid_j with balanced k-means.

    report = {"num_items", "num_codes", "input_mse" (mean squared norm of x), "levels": [per level
    {"level", "utilisation", "min_cluster", "max_cluster", "reconstruction_mse", "seconds"}],
    "num_unique_sids", "collision_rate", "coverage"}. With `cfg.unique` the last level is made collision-free
    (`onerec.tokenizer.unique`), so coverage is 1.0."""
    arr = _check_embeddings(x)
    n, k = arr.shape[0], cfg.codes
    check_k(k, n)
    if cfg.levels < 1:
        raise UsageError(f"--levels: must be at least 1, got {cfg.levels}")
    if cfg.unique and n > k**cfg.levels:
        raise UsageError(f"--codes: {n} items need unique SIDs but K^L = {k}^{cfg.levels} = {k**cfg.levels}")
    device = resolve_device(cfg.device)
    residual = torch.from_numpy(arr).to(device)  # (N, d)
    input_mse = float((residual.double() ** 2).sum(1).mean())
    codes, codebooks, levels = [], [], []
    for level in range(cfg.levels):
        start = time.perf_counter()
        centroids, assign = balanced_kmeans(residual, k, cfg.iters, cfg.seed + level, device=device)
        if cfg.unique:
            assign = _make_room(codes, level, cfg.levels, assign, residual, centroids, k)
        residual = residual - centroids[assign]
        levels.append(level_report(level, assign, residual, k, time.perf_counter() - start))
        log.info("level %d: %s", level, levels[-1])
        codes.append(assign.cpu().numpy().astype(np.int32))
        codebooks.append(centroids.cpu().numpy().astype(np.float32))
    sids = np.stack(codes, axis=1)  # (N, L)
    report = {"num_items": n, "num_codes": k, "input_mse": input_mse, "levels": levels, **collision_stats(sids)}
    return QuantizeResult(sids=sids, codebooks=codebooks, report=report)
