"""`onerec train-reward` -> `onerec align` -> `onerec evaluate --checkpoint` (reward in the JSON) -> `onerec export
--checkpoint`, on a copy of the tiny synthetic run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_align_evaluate_and_export_an_iteration(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, out, err = run_cli("train-reward", "--run", run, "--preset", "tiny")
    assert code == 0, err
    assert set(json.loads(out.splitlines()[-1])["val_auc"]) == {"swt", "vtr", "wtr", "ltr"}
    code, out, err = run_cli("align", "--run", run, "--iterations", 2, "--dpo-ratio", 0.05, "--responses", 8,
                             "--beta", 0.5, "--lr", 1e-3, "--batch-size", 64)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [line["iteration"] for line in lines] == [1, 2] and all(line["pairs"] > 0 for line in lines)
    assert json.loads((run / "align" / "align.json").read_text())["iterations"] == lines
    for checkpoint in (None, run / "align" / "iter_2"):
        flags = ["--checkpoint", checkpoint] if checkpoint else []
        code, out, err = run_cli("evaluate", "--run", run, "--json", "--limit", 20, "--beam-width", 8, *flags)
        assert code == 0, err
        reward = json.loads(out)["reward"]
        assert set(reward) == {"swt", "vtr", "wtr", "ltr"}
        assert all(0 <= v["mean"] <= v["max"] <= 1 for v in reward.values())
    code, out, err = run_cli("export", "--run", run, "--out", tmp_path / "repo", "--precision", "fp32",
                             "--checkpoint", run / "align" / "iter_2")
    assert code == 0, err
    manifest = json.loads((tmp_path / "repo" / "onerec" / "1" / "manifest.json").read_text())
    assert manifest["source_checkpoint"] == str((run / "align" / "iter_2").resolve())
    # what Triton's backend runs (the ONNX engine) serves the aligned version with no change
    from onerec.serving.engine import Engine
    from onerec.tokenizer.catalog import Catalog

    version = tmp_path / "repo" / "onerec" / "1"
    engine, catalog = Engine(version, device="cpu"), Catalog.load(version)
    [answer] = engine.generate([engine.query(catalog.sids[:10], beam_width=8, num_sessions=2)])
    assert (catalog.trie.leaf_of(answer.sessions[0].cpu().numpy().reshape(-1, catalog.levels)) >= 0).all()


def test_bad_flags_are_one_line_errors(tiny_run: Path, tmp_path: Path):
    code, _, err = run_cli("align", "--run", tiny_run, "--loss", "nope")
    assert code == 2 and "--loss" in err
    code, _, err = run_cli("export", "--run", tiny_run, "--out", tmp_path, "--checkpoint", tmp_path / "missing")
    assert code == 2 and "--checkpoint" in err
