"""The `onerec` CLI end to end on a tiny synthetic run, and its one-line exit-2 errors on bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ML100K, read_json, run_cli

pytestmark = pytest.mark.integration

COMMANDS = ("prepare", "tokenize", "train", "evaluate", "export", "triton")


def test_help_lists_every_command_and_each_has_help():
    out = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert command in out.stdout
        code, text, _ = run_cli(command, "--help")
        assert code == 0 and "Usage" in text


def test_evaluate_json_object(tiny_run: Path):
    code, out, err = run_cli("evaluate", "--run", tiny_run, "--json", "--limit", "40", "--beam-width", "16")
    assert code == 0, err
    payload = json.loads(out)
    assert set(payload) == {"model", "popular", "valid_sid_rate", "users", "protocol"}
    assert set(payload["model"]) == set(payload["popular"]) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10"}
    assert payload["protocol"] == "session"
    assert payload["users"] == 40
    assert payload["valid_sid_rate"] == 1.0  # constrained decoding never leaves the catalog
    for side in ("model", "popular"):
        assert 0.0 <= payload[side]["recall@5"] <= payload[side]["recall@10"] <= 1.0  # the top 10 holds the top 5
        assert 0.0 <= payload[side]["ndcg@5"] <= 1.0 and 0.0 <= payload[side]["ndcg@10"] <= 1.0


def test_training_loss_falls_on_synthetic(tiny_run: Path):
    history = read_json(tiny_run / "train.json")["history"]
    assert len(history) == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # chance level is ln K per code (K = 8 in the tiny preset); planted structure is learnable
    assert history[-1]["val_loss"] < 0.95 * math.log(8)


def test_stages_are_marked_complete(tiny_run: Path):
    for stage in ("prepare", "tokenize", "train"):
        assert (tiny_run / f"{stage}.json").is_file()
    report = read_json(tiny_run / "tokenize.json")["report"]
    assert len(report["levels"]) == 3
    first = report["levels"][0]  # 400 items over K=8 codes: balanced means exactly 50 each
    assert first["min_cluster"] == first["max_cluster"] == 50
    # the unique SIDs (the default) move items at the last two levels only: roughly balanced, all codes used
    for level in report["levels"]:
        assert level["utilisation"] == 1.0 and 40 <= level["min_cluster"] <= level["max_cluster"] <= 60
    assert report["collision_rate"] == 0.0 and report["coverage"] == 1.0 and report["num_unique_sids"] == 400


# --- bad input: one line naming the file or option, exit 2, nothing left looking complete ------------


def _assert_usage_error(args: list, needle: str) -> None:
    code, out, err = run_cli(*args)
    assert code == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err


def test_missing_data_directory(tmp_path: Path):
    out = tmp_path / "run"
    _assert_usage_error(["prepare", "--path", tmp_path / "nope", "--out", out], "nope")
    assert not out.exists()


def test_malformed_ratings_file(tmp_path: Path):
    bad = tmp_path / "ml"
    bad.mkdir()
    (bad / "u.data").write_text("1\t2\t5\t100\nnot a row\n")
    out = tmp_path / "run"
    _assert_usage_error(["prepare", "--path", bad, "--out", out], "u.data")
    assert not out.exists()


def test_unknown_preset(tiny_run: Path):
    _assert_usage_error(["train", "--run", tiny_run, "--preset", "huge"], "--preset")


def test_codes_larger_than_item_count(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    _assert_usage_error(["tokenize", "--run", run, "--codes", "100000"], "--codes")
    assert (run / "tokenize.json").is_file()  # the earlier, good catalog still stands


def test_existing_output_needs_force(tiny_run: Path):
    _assert_usage_error(["prepare", "--source", "synthetic", "--out", tiny_run], "--force")


def test_stage_order_is_enforced(tmp_path: Path):
    _assert_usage_error(["tokenize", "--run", tmp_path / "nothing"], "--run")


def test_corrupt_checkpoint(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    (run / "model" / "model.safetensors").write_bytes(b"garbage")
    _assert_usage_error(["evaluate", "--run", run], "model.safetensors")


def test_corrupt_catalog(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    (run / "catalog" / "catalog.npz").write_bytes(b"garbage")
    _assert_usage_error(["train", "--run", run, "--preset", "tiny"], "catalog")


@pytest.mark.skipif(not ML100K.is_dir(), reason=f"MovieLens 100K not found at {ML100K}")
def test_prepare_movielens_100k(tmp_path: Path):
    out = tmp_path / "ml"
    code, _, err = run_cli("prepare", "--source", "movielens", "--path", ML100K, "--out", out)
    assert code == 0, err
    stats = read_json(out / "prepare.json")["stats"]
    assert stats["interactions"] == 100_000 and stats["users"] == 943 and stats["items"] == 1682
    assert stats["sessions"]["test"] > 900


def test_bad_embeddings_file_keeps_the_good_catalog(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    bad = tmp_path / "emb.npy"
    bad.write_bytes(b"not an npy file")
    _assert_usage_error(["tokenize", "--run", run, "--embeddings", bad], "emb.npy")
    assert (run / "tokenize.json").is_file() and (run / "train.json").is_file()
