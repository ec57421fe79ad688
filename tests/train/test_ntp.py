"""Training recipe: batching, LR schedule, determinism by seed, and resume == uninterrupted run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from onerec.config import PRESETS, TrainConfig
from onerec.data.sessions import Sessions
from onerec.data.sid import SidSessions
from onerec.errors import UsageError
from onerec.runs import RunDir
from onerec.tokenizer.catalog import Catalog
from onerec.train import ntp


def test_epoch_batches_cover_every_session_once():
    lengths = np.array([5, 1, 9, 3, 3, 7, 2, 8, 4, 6, 1])
    batches = ntp.epoch_batches(lengths, batch_size=4, rng=np.random.default_rng(0))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert [len(b) for b in batches].count(4) == 2


def test_lr_warmup_then_cosine_to_a_tenth():
    cfg = TrainConfig(lr=1.0, warmup_steps=4)
    assert ntp.lr_at(0, 100, cfg) == pytest.approx(0.25)
    assert ntp.lr_at(3, 100, cfg) == pytest.approx(1.0)
    assert ntp.lr_at(4, 100, cfg) == pytest.approx(1.0)
    assert ntp.lr_at(100, 100, cfg) == pytest.approx(0.1)
    assert ntp.lr_at(52, 100, cfg) == pytest.approx(0.55)  # cosine midpoint


def _data(run: Path):
    rd = RunDir(run)
    catalog = Catalog.load(rd.catalog)
    train = SidSessions.from_sessions(Sessions.load(rd.sessions("train")), catalog, 32)
    val = SidSessions.from_sessions(Sessions.load(rd.sessions("val")), catalog, 32)
    return catalog, train, val


def _train(tmp: Path, run: Path, resume: bool = False, epochs: int = 2):
    catalog, train, val = _data(run)
    preset = dataclasses.replace(PRESETS["tiny"], train=dataclasses.replace(PRESETS["tiny"].train, epochs=epochs))
    ntp.train(preset, catalog, train, val, tmp / "ckpt", tmp / "best", resume=resume, progress=False)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.mark.slow
def test_same_seed_same_weights_and_resume_equals_uninterrupted(tiny_run: Path, tmp_path: Path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    _train(a, tiny_run)
    # b: interrupted in epoch 2 after its training steps, before the epoch-2 checkpoint
    real = ntp.evaluate_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ntp, "evaluate_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        _train(b, tiny_run)
    monkeypatch.setattr(ntp, "evaluate_loss", real)
    _train(b, tiny_run, resume=True)
    wa, wb = _weights(a / "ckpt"), _weights(b / "ckpt")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0, msg=name)


def test_resume_without_checkpoint_is_a_usage_error(tiny_run: Path, tmp_path: Path):
    with pytest.raises(UsageError, match="--resume"):
        _train(tmp_path, tiny_run, resume=True)


def test_padded_targets_lose_exactly_what_the_shorter_target_loses():
    """A leave-one-out window [a, b, -1, -1, -1] scores the same cross-entropy as the 2-item target [a, b]: the
    padding is skipped and, the decoder being causal, the stand-in inputs there change no earlier logit."""
    from onerec.model.onerec import OneRecModel

    torch.manual_seed(0)
    cfg = PRESETS["tiny"].model
    model = OneRecModel(cfg).eval()
    history = torch.randint(0, cfg.codes, (2, 4, cfg.levels))
    mask = torch.ones(2, 4, dtype=torch.bool)
    short = torch.randint(0, cfg.codes, (2, 2, cfg.levels))  # (B, 2, L)
    padded = torch.cat([short, torch.full((2, cfg.session_len - 2, cfg.levels), -1)], dim=1)  # (B, m, L)
    with torch.no_grad():
        ce_padded, _ = ntp.session_loss(model, history, mask, padded)
        ce_short, _ = ntp.session_loss(model, history, mask, short)
        ce_other, _ = ntp.session_loss(model, history, mask, torch.cat(
            [short, torch.randint(0, cfg.codes, (2, cfg.session_len - 2, cfg.levels))], dim=1))
    assert torch.allclose(ce_padded, ce_short, atol=1e-6)
    assert not torch.allclose(ce_padded, ce_other)  # real later items do count
