"""The Debian tools the stack tests need (`make tools`): found, else a failure in CI and a skip with its reason."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from onerec.errors import UsageError


def require_tool(find: Callable[[], Path]) -> Path:
    """`find()`'s path; when it raises UsageError, fail under CI=true, else skip saying what is missing."""
    try:
        return find()
    except UsageError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{e} (CI runs `make tools` first)")
        pytest.skip(reason=f"tool missing, run `make tools`: {e}")
