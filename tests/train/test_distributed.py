"""Data-parallel training: shards, the combined loss == one process's, and real torchrun runs (gloo, 2 CPU processes)
whose per-step losses equal one process's, whose crash resumes, and whose model evaluates like any other."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from onerec import config
from onerec.config import PRESETS
from onerec.model.onerec import OneRecModel
from onerec.train import ntp
from onerec.train.distributed import Cluster, RoutingTap, combine, local_terms, shard, torchrun_command
from tests.conftest import read_json, run_cli

# The stated tolerance: one process and 2 torchrun processes with the same seed and global batch give the same loss
# (and MoE aux loss) at every step up to float32 summation order. Measured on this project's 2-core x86_64 CPU: at
# most 1.9e-7 relative over the 32 steps below (2 epochs, batch 61: a 31/30 split and a last batch of one session),
# 2.6e-7 over 290 steps (10 epochs, batch 32), not growing. Averaging per-rank mean losses instead is off by 6.7e-6
# at step 2 here, so a looser 1e-5 would not catch it.
STEP_RTOL = 1e-6


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in this process, as in each torchrun rank (OMP_NUM_THREADS=1): 15x faster for these small
    batches on 2 busy cores, and the one-process reference runs as a rank does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- shards -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2, 5, 8, 61])
def test_shards_cover_the_global_batch_once(world: int, batch: int):
    shards = [shard(batch, Cluster(rank=r, world_size=world)) for r in range(world)]
    real = np.concatenate([positions for positions, weight in shards if weight == 1.0])
    assert sorted(real.tolist()) == list(range(batch))  # every session once, on one rank
    sizes = [len(positions) for positions, weight in shards if weight == 1.0]
    assert max(sizes) - min(sizes) <= 1
    for positions, weight in shards:  # a rank without a session stands in with the first, weighted 0
        assert weight == 1.0 or (weight == 0.0 and positions.tolist() == [0])
    assert sum(weight == 0.0 for _, weight in shards) == max(0, world - batch)


def test_torchrun_command_separates_the_module_arguments():
    """torchrun's parser takes a `--run` after the module for its own `--run-path` unless a `--` comes first."""
    cmd = torchrun_command(2, "cli", ["train", "--run", "r"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("-m", 3):] == ["-m", "cli", "--", "train", "--run", "r"]
    assert "--standalone" in cmd and "--nproc-per-node=2" in cmd


# --- the combined loss, in one process --------------------------------------------------------------------


def _batch(seed: int, size: int):
    """A tiny model and `size` random sessions: histories of 1..6 items, some targets padded after 1..4 items."""
    torch.manual_seed(seed)
    cfg = PRESETS["tiny"].model
    model = OneRecModel(cfg).train()
    lengths = torch.randint(1, 7, (size,))
    history = torch.randint(0, cfg.codes, (size, 6, cfg.levels))
    mask = torch.arange(6)[None, :] < lengths[:, None]  # (B, N)
    targets = torch.randint(0, cfg.codes, (size, cfg.session_len, cfg.levels))
    for row in range(0, size, 2):  # every other target ends early (leave-one-out windows)
        targets[row, 1 + row % 4 :] = -1
    return model, history, mask, targets


def _grads(model: OneRecModel, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params, strict=True)]


@pytest.mark.parametrize(("batch", "world"), [(9, 2), (7, 3), (2, 3)])
def test_ranks_combined_loss_is_the_one_process_loss(batch: int, world: int):
    """Each simulated rank backpropagates `combine` of its shard with the summed statistics: the mean of the ranks'
    gradients (what DDP applies) equals one process's gradient of CE + coef * aux over the whole batch, and the
    reported CE and aux are the whole batch's. Uneven shards, padded targets and (2 over 3 ranks) a stand-in
    session weighted 0 are covered. The mean of per-rank means, which DDP would give without it, is measurably off."""
    model, history, mask, targets = _batch(seed=batch * 10 + world, size=batch)
    coef = model.cfg.aux_loss_coef
    ce, aux = ntp.session_loss(model, history, mask, targets)
    expected = _grads(model, ce + coef * aux)

    tap = RoutingTap(model)
    parts = []
    for rank in range(world):
        positions, weight = shard(batch, Cluster(rank=rank, world_size=world))
        out = model(history[positions], mask[positions], targets[positions].clamp_min(0))
        parts.append(local_terms(out.logits, targets[positions], tap.take(), weight))
    tap.close()
    total = torch.stack([p.stats for p in parts]).sum(0)
    mean = [torch.zeros_like(g) for g in expected]
    for terms in parts:
        loss, ce_value, aux_value = combine(terms, total, world, coef)
        assert ce_value == pytest.approx(ce.item(), rel=1e-6)
        assert aux_value == pytest.approx(aux.item(), rel=1e-6)
        for acc, g in zip(mean, _grads(model, loss), strict=True):
            acc += g / world
    for got, want in zip(mean, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

    naive = [torch.zeros_like(g) for g in expected]  # each rank's own mean CE and aux, averaged
    for rank in range(min(world, batch)):
        positions, _ = shard(batch, Cluster(rank=rank, world_size=world))
        ce_r, aux_r = ntp.session_loss(model, history[positions], mask[positions], targets[positions])
        for acc, g in zip(naive, _grads(model, ce_r + coef * aux_r), strict=True):
            acc += g / world
    off = max(float((n - e).abs().max() / e.abs().max().clamp_min(1e-12)) for n, e in zip(naive, expected, strict=True))
    assert off > 0.1  # measured 0.45 to 1.2 of the largest gradient entry


def test_the_tap_ignores_validation_and_decoding():
    model, history, mask, targets = _batch(seed=0, size=3)
    tap = RoutingTap(model)
    with torch.no_grad():
        model(history, mask, targets.clamp_min(0))
    model.eval()
    model(history, mask, targets.clamp_min(0))
    assert tap.take() == []
    model.train()
    model(history, mask, targets.clamp_min(0))
    assert len(tap.take()) == model.cfg.decoder_layers
    tap.close()


# --- the CLI's checks before a launch ---------------------------------------------------------------------


def test_nproc_is_checked_before_torchrun_starts(tmp_path: Path):
    code, out, _ = run_cli("train", "--help")
    assert code == 0 and "--nproc" in out
    code, _, err = run_cli("train", "--run", tmp_path / "missing", "--nproc", "2")
    assert code == 2 and err.count("\n") == 1 and "--run" in err  # one line, not one per rank
    code, _, err = run_cli("train", "--run", tmp_path, "--nproc", "0")
    assert code == 2 and "--nproc" in err


# --- real torchrun processes ------------------------------------------------------------------------------

EPOCHS, BATCH = "2", "61"  # 916 training sessions: 15 batches of 61 and one of a single session per epoch

FAULT = '''"""Injected into the torchrun processes: the second validation (epoch 2, after its steps, before its
checkpoint) raises, as a crash of rank 0 would."""
from onerec.train import ntp

_real = ntp.evaluate_loss
_calls = [0]


def _flaky(*args, **kwargs):
    _calls[0] += 1
    if _calls[0] == 2:
        raise RuntimeError("injected fault")
    return _real(*args, **kwargs)


ntp.evaluate_loss = _flaky
'''


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic run up to its catalog (300 users, 916 training sessions)."""
    run = tmp_path_factory.mktemp("dist") / "base"
    for step in (("prepare", "--source", "synthetic", "--users", "300", "--items", "400", "--preset", "tiny",
                  "--out", run), ("tokenize", "--run", run, "--preset", "tiny")):
        code, out, err = run_cli(*step)
        assert code == 0, f"onerec {step[0]} failed ({code}): {out}{err}"
    return run


def _copy(run: Path, name: str) -> Path:
    out = run.parent / name
    shutil.copytree(run, out)
    return out


def _steps(run: Path) -> list[dict]:
    return ntp.read_steps(run / "checkpoints" / "last" / ntp.STEPS)


@pytest.mark.integration
@pytest.mark.slow
def test_torchrun_two_processes_train_as_one(tokenized: Path, monkeypatch: pytest.MonkeyPatch):
    """`onerec train --nproc 2` (rank 0 crashes in epoch 2, after its steps), then `torchrun --nproc-per-node 2 -m cli
    -- train --resume`: every step's loss and aux equal one process's within STEP_RTOL, the crash leaves the epoch-1
    checkpoint and no marker, rank 0 writes the marker, and the model evaluates like the one-process model's (at
    most one user's answer apart)."""
    single = _copy(tokenized, "single")
    code, out, err = run_cli("train", "--run", single, "--epochs", EPOCHS, "--batch-size", BATCH)
    assert code == 0, out + err
    reference = _steps(single)
    assert len(reference) == 2 * 16 and [r["step"] for r in reference] == list(range(1, 33))

    dist = _copy(tokenized, "dist")
    fault = tokenized.parent / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(FAULT)
    with monkeypatch.context() as env:  # Python imports sitecustomize at startup, in every torchrun process
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(fault), os.environ.get("PYTHONPATH")])))
        code, out, err = run_cli("train", "--run", dist, "--epochs", EPOCHS, "--batch-size", BATCH, "--nproc", "2")
    assert code != 0 and "torchrun --nproc-per-node 2 exited" in err
    assert not (dist / "train.json").exists()
    assert read_json(dist / "checkpoints" / "last" / "progress.json")["epoch"] == 1
    assert [r["step"] for r in _steps(dist)] == list(range(1, 17))  # epoch 1's steps, written with its checkpoint

    resumed = subprocess.run(torchrun_command(2, "cli", ["train", "--run", str(dist), "--epochs", EPOCHS,
                                                         "--batch-size", BATCH, "--resume"]),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-3000:]
    marker = read_json(dist / "train.json")
    assert marker["processes"] == 2 and marker["best_epoch"] == 2 and len(marker["history"]) == 2

    steps = _steps(dist)
    assert [r["step"] for r in steps] == [r["step"] for r in reference]
    for mine, theirs in zip(steps, reference, strict=True):
        assert mine["lr"] == theirs["lr"]
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=STEP_RTOL), mine["step"]
        assert mine["aux"] == pytest.approx(theirs["aux"], rel=STEP_RTOL), mine["step"]
    # the models compute the same function (not the same weights: the attention key biases get no gradient but
    # float noise, which Adam scales to lr-sized steps, so they wander apart without changing any output)
    for mine, theirs in zip(marker["history"], read_json(single / "train.json")["history"], strict=True):
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=STEP_RTOL)

    scores = []
    for run in (single, dist):
        code, out, err = run_cli("evaluate", "--run", run, "--json", "--limit", "100")
        assert code == 0, err
        scores.append(json.loads(out))
    assert scores[1]["valid_sid_rate"] == 1.0 and scores[1]["users"] == 100
    for key, value in scores[0]["model"].items():
        assert scores[1]["model"][key] == pytest.approx(value, abs=1 / 100), key


ALL_POSITIONS = '''"""Injected into the torchrun processes: the tiny preset, causal, trained on every position."""
import dataclasses

from onerec import config

_tiny = config.PRESETS["tiny"]
config.PRESETS["tiny"] = dataclasses.replace(
    _tiny, model=dataclasses.replace(_tiny.model, causal_encoder=True),
    train=dataclasses.replace(_tiny.train, all_positions=True))
'''


@pytest.mark.integration
@pytest.mark.slow
def test_torchrun_trains_every_position_as_one_process(tokenized: Path, monkeypatch: pytest.MonkeyPatch):
    """`TrainConfig.all_positions` under `onerec train --nproc 2`: one sequence per user (300 rows: 5 global batches
    of 61, the last of 56, per epoch), every step's loss and aux equal one process's within STEP_RTOL."""
    patch = tokenized.parent / "all_positions"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(ALL_POSITIONS)
    tiny = config.PRESETS["tiny"]
    monkeypatch.setitem(config.PRESETS, "tiny", dataclasses.replace(
        tiny, model=dataclasses.replace(tiny.model, causal_encoder=True),
        train=dataclasses.replace(tiny.train, all_positions=True)))
    single = _copy(tokenized, "positions-single")
    code, out, err = run_cli("train", "--run", single, "--epochs", EPOCHS, "--batch-size", BATCH)
    assert code == 0, out + err
    reference = _steps(single)
    assert [r["step"] for r in reference] == list(range(1, 11))
    assert read_json(single / "train.json")["train"]["all_positions"] is True

    dist = _copy(tokenized, "positions-dist")
    with monkeypatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(patch), os.environ.get("PYTHONPATH")])))
        code, out, err = run_cli("train", "--run", dist, "--epochs", EPOCHS, "--batch-size", BATCH, "--nproc", "2")
    assert code == 0, out + err
    marker = read_json(dist / "train.json")
    assert marker["processes"] == 2 and marker["train"]["all_positions"] is True
    steps = _steps(dist)
    assert [r["step"] for r in steps] == [r["step"] for r in reference]
    for mine, theirs in zip(steps, reference, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=STEP_RTOL), mine["step"]
        assert mine["aux"] == pytest.approx(theirs["aux"], rel=STEP_RTOL), mine["step"]
