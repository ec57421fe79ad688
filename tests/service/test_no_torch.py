"""The gateway process never loads torch (nor onnx/onnxruntime): checked in a fresh interpreter, as a worker starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "onnx", "onnxruntime")


@pytest.mark.parametrize("entry", [
    "import service.app; service.app.create_app()",  # what uvicorn's factory runs in every worker
    "import cli.main",  # `onerec serve` parses its options here before uvicorn starts
    "import cli.serving, cli.local, cli.pipeline",  # every command module, before a command runs
])
def test_gateway_entry_points_import_no_torch(entry: str):
    probe = f"{entry}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "ONEREC_MODEL_REPO": "/nonexistent"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"{entry} loaded {done.stdout.strip()}"
