"""What every `onerec` command shares: run and reuse options, the UsageError -> exit 2 wrapper, progress."""

from __future__ import annotations

import sys
from collections.abc import Callable
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer

from onerec.errors import UsageError

RunOption = Annotated[Path, typer.Option("--run", help="Run directory written by `onerec prepare`.")]
ReuseOption = Annotated[bool, typer.Option("--reuse", help="Do nothing if this stage already completed.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
LimitOption = Annotated[int | None, typer.Option(help="Score only the first N users.")]


class Split(str, Enum):
    test = "test"
    val = "val"


SplitOption = Annotated[Split, typer.Option(help="Held-out split to score.")]
StateOption = Annotated[Path | None, typer.Option(help="Where the stack keeps pids, logs, data (default RUN/stack).")]


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn UsageError (bad file, option or run directory) into one line on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


def progress() -> bool:
    """tqdm bars only on a terminal."""
    return sys.stderr.isatty()


class Precision(str, Enum):
    auto = "auto"
    fp16 = "fp16"
    fp32 = "fp32"
