"""Shared fixtures: a tiny synthetic run directory built through the real CLI, once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "ml-100k"


def run_cli(*args: str) -> tuple[int, str, str]:
    """Invoke `onerec ARGS` in-process; (exit code, stdout, stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare (synthetic) -> tokenize -> train with the tiny preset; returns the run directory."""
    run = tmp_path_factory.mktemp("runs") / "synthetic"
    steps = [
        ("prepare", "--source", "synthetic", "--users", "300", "--items", "400", "--preset", "tiny",
         "--out", run),
        ("tokenize", "--run", run, "--preset", "tiny"),
        ("train", "--run", run, "--preset", "tiny", "--epochs", "3"),
    ]
    for step in steps:
        code, out, err = run_cli(*step)
        assert code == 0, f"onerec {step[0]} failed ({code}): {out}{err}"
    return run


def permuted_catalog_run(run: Path, out: Path, seed: int = 7) -> Path:
    """A copy of `run` at `out` whose videos' SIDs are shuffled: the same model weights over another catalog (another
    content hash), so a history gets another answer under each (the rollout tests deploy it)."""
    import shutil

    import numpy as np

    from onerec.runs import RunDir
    from onerec.tokenizer.catalog import Catalog

    shutil.copytree(run, out)
    catalog = Catalog.load(RunDir(out).catalog)
    order = np.random.default_rng(seed).permutation(catalog.num_items)
    shuffled = Catalog.build(catalog.video_ids, catalog.sids[order], catalog.popularity, catalog.num_codes)
    assert shuffled.content_hash != catalog.content_hash
    shutil.rmtree(RunDir(out).catalog)
    shuffled.save(RunDir(out).catalog)
    return out


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def exported_repo(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported (fp32) into a fresh Triton model repository; returns the repository."""
    repo = tmp_path_factory.mktemp("model_repo")
    code, out, err = run_cli("export", "--run", tiny_run, "--out", repo, "--precision", "fp32")
    assert code == 0, f"onerec export failed ({code}): {out}{err}"
    return repo
