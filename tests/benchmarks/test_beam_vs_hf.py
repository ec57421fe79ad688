"""The serving benchmark's own arithmetic: the FLOP count it divides by, and its synthetic catalog's shape."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from onerec.config import ModelConfig

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "beam_vs_hf.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("beam_vs_hf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["beam_vs_hf"] = module  # dataclasses look their module up while the script executes
    spec.loader.exec_module(module)
    yield module
    del sys.modules["beam_vs_hf"]


def test_decode_step_flops_by_hand(bench):
    cfg = ModelConfig(codes=16, d_model=4, n_heads=2, decoder_layers=1, d_ff=8, n_experts=3, top_k=2)
    # one row, one layer, D=4, H=2, hd=2, T=past+1=3, N=256 memory positions, 5 candidates:
    per_row = (2 * 4 * 12 + 2 * 4 * 4  # qkv + out = 96 + 32
               + 2 * 2 * 2 * 3 * 2  # self scores + values = 48
               + 2 * 4 * 4 * 2  # cross q + out = 64
               + 2 * 2 * 2 * 256 * 2  # cross scores + values = 4096
               + 2 * 4 * 3  # gate = 24
               + 2 * 2 * (2 * 4 * 8))  # two experts of up + down = 256
    assert per_row == 4616
    assert bench.decode_step_flops(cfg, beams=1, past=2, candidates=5) == per_row + 2 * 4 * 5
    assert bench.decode_step_flops(cfg, beams=3, past=2, candidates=5) == 3 * (per_row + 40)


def test_synthetic_catalog_is_balanced_at_every_level(bench):
    catalog = bench.synthetic_catalog(items=1000, codes=64, seed=0)
    assert catalog.num_items == 1000 and catalog.levels == 3
    for level in range(3):
        counts = np.bincount(catalog.sids[:, level], minlength=64)
        assert counts.min() == 1000 // 64 and counts.max() == -(-1000 // 64)


def test_encoder_and_request_flops_by_hand(bench):
    cfg = ModelConfig(codes=16, levels=2, session_len=2, d_model=4, n_heads=2, encoder_layers=1, decoder_layers=1,
                      d_ff=8, n_experts=3, top_k=2)
    # per history token: qkv + out 2*4*16 = 128, scores + values 2*2*256*4 = 4096, FFN 2*2*4*8 = 128;
    # then the decoder layer's cross K/V projection 2*4*8 = 64
    assert bench.encoder_flops(cfg, 256) == 256 * (128 + 4096 + 128 + 64)
    # m=2 items of L=2 levels: positions 0..4 = BOS, s1, s2, BOS, s1 -> they score the codes of
    # levels 0, 1, (ignored), 0, 1; position 0 runs one row (all beams are BOS on an empty cache)
    children = (7, 3)
    steps = [bench.decode_step_flops(cfg, 4 if p else 1, p, c) for p, c in enumerate((7, 3, 1, 7, 3))]
    assert bench.request_flops(cfg, 4, children) == bench.encoder_flops(cfg, 256) + sum(steps)
