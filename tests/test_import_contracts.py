"""The layering contracts of `make lint` (pyproject.toml [tool.importlinter]) hold, and each one catches a violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("onerec", "export", "service", "stack", "cli", "loadtest")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess:
    """`lint-imports` over the packages under `root` (found first on the path), uncached."""
    args = [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache", "--no-logo"]
    for contract in contracts:
        args += ["--contract", contract]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_contracts_hold_on_this_tree():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A copy of the packages and pyproject.toml, to break."""
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize(("contract", "module", "line"), [
    ("library", "onerec/errors.py", "import service.app"),  # the library reaching up into the gateway
    ("library", "onerec/runs.py", "import typer"),  # the library growing a CLI dependency
    ("gateway", "service/settings.py", "import torch"),
    ("gateway", "service/settings.py", "import onerec.device"),  # torch through the library counts too
    ("gateway", "service/history.py", "from stack.probes import free_ports"),
    ("gateway", "service/recommender.py", "import export.repository"),
    ("layers", "export/verify.py", "import cli.main"),
    ("layers", "stack/child.py", "import cli.common"),
    ("loadtest", "loadtest/zipf.py", "import service.settings"),
])
def test_a_back_reference_breaks_its_contract(scratch: Path, contract: str, module: str, line: str):
    assert lint_imports(scratch, contract).returncode == 0  # the untouched copy keeps it
    path = scratch / module
    path.write_text(path.read_text() + f"\n{line}  # deliberate violation\n")
    done = lint_imports(scratch, contract)
    assert done.returncode != 0, done.stdout
    assert "BROKEN" in done.stdout and "0 broken" not in done.stdout
