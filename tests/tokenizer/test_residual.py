"""Residual quantizer: SID shapes, the report's numbers, and user errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from onerec.config import PRESETS, TokenizerConfig
from onerec.device import resolve_device
from onerec.errors import UsageError
from onerec.tokenizer.residual import collision_stats, residual_quantize


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, d)) * 4
    return (centres[rng.integers(0, 12, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_tiny_preset_report_numbers() -> None:
    # K=8, L=3, 10 iterations; plain balanced residual k-means (paper Algorithm 1): `unique` re-balances nothing
    # above the last level but trades the last level's balance for distinct SIDs (tests/tokenizer/test_unique.py)
    cfg = dataclasses.replace(PRESETS["tiny"].tokenizer, unique=False)
    x = clustered(200, cfg.embedding_dim)
    result = residual_quantize(x, cfg)
    assert result.sids.shape == (200, 3) and result.sids.dtype == np.int32
    assert [c.shape for c in result.codebooks] == [(8, 16)] * 3
    report = result.report
    json.dumps(report)  # JSON-ready
    assert report["num_items"] == 200 and report["num_codes"] == 8
    levels = report["levels"]
    assert [lv["level"] for lv in levels] == [0, 1, 2]
    for lv in levels:
        assert lv["utilisation"] == 1.0  # N >= K: balance leaves no code unused
        assert lv["min_cluster"] == lv["max_cluster"] == 25
    mses = [report["input_mse"]] + [lv["reconstruction_mse"] for lv in levels]
    assert all(a > b for a, b in zip(mses, mses[1:], strict=False))


def test_reconstruction_mse_matches_codebooks() -> None:
    x = clustered(101, 4, seed=1)
    result = residual_quantize(x, TokenizerConfig(levels=2, codes=10, iters=5, unique=False))  # 101 > K^L = 100
    recon = sum(cb[result.sids[:, level]] for level, cb in enumerate(result.codebooks))
    expected = float(((x - recon).astype(np.float64) ** 2).sum(1).mean())
    assert result.report["levels"][-1]["reconstruction_mse"] == pytest.approx(expected, rel=1e-4)
    first = result.report["levels"][0]
    assert (first["min_cluster"], first["max_cluster"]) == (10, 11)  # 101 = 10 * 10 + 1


def test_collision_stats_hand_worked() -> None:
    sids = np.array([[0, 1], [2, 2], [0, 1], [1, 0], [2, 2], [0, 1]])
    assert collision_stats(sids) == {"num_unique_sids": 3, "collision_rate": 5 / 6, "coverage": 3 / 6}
    assert residual_quantize(clustered(8, 2), TokenizerConfig(levels=1, codes=8, iters=2)).report[
        "collision_rate"
    ] == 0.0


def test_same_config_same_sids() -> None:
    x = clustered(120, 6)
    cfg = TokenizerConfig(levels=2, codes=6, iters=4, seed=3, unique=False)  # 120 items > K^L = 36: plain k-means
    np.testing.assert_array_equal(residual_quantize(x, cfg).sids, residual_quantize(x, cfg).sids)


def test_k_larger_than_n_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"^--codes: K=300 is larger than the item count N=200$"):
        residual_quantize(clustered(200, 4), TokenizerConfig(codes=300))


@pytest.mark.parametrize("bad", [np.zeros((0, 4)), np.zeros(5), np.full((3, 2), np.nan)])
def test_bad_embeddings_are_rejected(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        residual_quantize(bad, TokenizerConfig(codes=1))


def test_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--device: cuda"):
            resolve_device("cuda")


def test_fit_shape_fits_the_presets_k_and_l_to_the_catalogue_unless_the_user_set_them():
    from onerec.tokenizer.residual import fit_shape

    preset = TokenizerConfig(codes=128, levels=2)
    assert fit_shape(preset, 12_101) == preset  # Beauty: 12,101 <= 128^2 = 16,384
    assert (fit_shape(preset, 16_385).codes, fit_shape(preset, 16_385).levels) == (128, 3)  # one more level
    assert (fit_shape(preset, 120).codes, fit_shape(preset, 120).levels) == (120, 2)  # K <= N
    assert fit_shape(preset, 120, codes_given=True).codes == 128  # --codes stays, and residual_quantize refuses it
    assert fit_shape(preset, 20_000, levels_given=True).levels == 2
    assert fit_shape(dataclasses.replace(preset, unique=False), 20_000).levels == 2  # collisions allowed: no need
