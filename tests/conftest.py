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


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def exported_repo(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported (fp32) into a fresh Triton model repository; returns the repository."""
    repo = tmp_path_factory.mktemp("model_repo")
    code, out, err = run_cli("export", "--run", tiny_run, "--out", repo, "--precision", "fp32")
    assert code == 0, f"onerec export failed ({code}): {out}{err}"
    return repo
