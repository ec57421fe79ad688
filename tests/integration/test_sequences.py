"""`onerec prepare --source sequences` end to end: leave-one-out, tokenize, train, evaluate, baselines @5/@10."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.integration


def write_sequences(path: Path, users: int = 240, items: int = 120, seed: int = 0) -> None:
    """Users walk a ring of items (next item = current + 1..3), so the next item is predictable."""
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, users + 1):
        item, seq = int(rng.integers(items)), []
        for _ in range(int(rng.integers(6, 14))):
            seq.append(item + 1)
            item = (item + int(rng.integers(1, 4))) % items
        lines.append(" ".join(map(str, [user, *seq])))
    path.write_text("\n".join(lines) + "\n")


def test_sequences_run_leave_one_out(tmp_path: Path):
    data, run = tmp_path / "ring.txt", tmp_path / "run"
    write_sequences(data)
    for step in (("prepare", "--source", "sequences", "--path", data, "--preset", "tiny", "--out", run),
                 ("tokenize", "--run", run, "--preset", "tiny"),
                 ("train", "--run", run, "--preset", "tiny", "--epochs", "2")):
        code, out, err = run_cli(*step)
        assert code == 0, f"{step[0]}: {out}{err}"
    prepared = json.loads((run / "prepare.json").read_text())
    assert prepared["data"]["protocol"] == "leave_one_out" and prepared["data"]["history_len"] == 50
    assert prepared["stats"]["sessions"]["test"] == 240 == prepared["stats"]["sessions"]["val"]
    code, out, err = run_cli("evaluate", "--run", run, "--json", "--beam-width", "16")
    assert code == 0, err
    result = json.loads(out)
    assert result["protocol"] == "leave_one_out" and result["users"] == 240 and result["valid_sid_rate"] == 1.0
    for side in ("model", "popular"):
        assert 0.0 <= result[side]["recall@5"] <= result[side]["recall@10"] <= 1.0
        assert result[side]["ndcg@5"] <= result[side]["recall@5"] + 1e-12  # one target: NDCG@k <= HR@k
    code, out, err = run_cli("baselines", "--run", run, "--json", "--only", "popular,ease")
    assert code == 0, err
    baselines = json.loads(out)
    assert baselines["popular"]["recall@10"] == pytest.approx(result["popular"]["recall@10"])  # same users, code
    assert baselines["ease"]["recall@10"] > baselines["popular"]["recall@10"]  # the ring is learnable


def test_the_preset_is_chosen_from_the_data_and_recorded(tmp_path: Path):
    """No --preset anywhere: prepare picks the source's (sequences: small-seq), records it, and tokenize and train
    use it; --preset still overrides."""
    data, run = tmp_path / "ring.txt", tmp_path / "run"
    write_sequences(data, users=60)
    for step in (("prepare", "--source", "sequences", "--path", data, "--out", run),
                 ("tokenize", "--run", run, "--iters", "3"),
                 ("train", "--run", run, "--epochs", "1")):
        code, out, err = run_cli(*step)
        assert code == 0, f"{step[0]}: {out}{err}"
    for stage in ("prepare", "tokenize", "train"):
        assert json.loads((run / f"{stage}.json").read_text())["preset"] == "small-seq", stage
    trained = json.loads((run / "train.json").read_text())
    assert trained["train"]["batch_size"] == 128 and trained["train"]["select"] == "ndcg@10"
    assert trained["train"]["all_positions"]  # small-seq: every position of each user's sequence a target
    assert json.loads((run / "tokenize.json").read_text())["tokenizer"]["cooccurrence_window"] == 3
    assert "val_ndcg@10" in trained["history"][0]
    code, out, err = run_cli("tokenize", "--run", run, "--preset", "tiny")
    assert code == 0, err
    assert json.loads((run / "tokenize.json").read_text())["preset"] == "tiny"
