"""Which torch device a stage runs on: `auto` means CUDA only when it is really there."""

from __future__ import annotations

import torch

from onerec.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available else cpu; "cpu" / "cuda[:n]" as asked (UsageError if cuda is absent)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.split(":")[0] == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device: cuda was asked for but no CUDA device is available")
        return torch.device(name)
    raise UsageError(f"--device: unknown device {name!r}; known: auto, cpu, cuda")
