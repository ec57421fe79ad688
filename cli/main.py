"""The `onerec` command: the composition root. Each command parses its options, calls the library, prints."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from cli import baselines, blocklist, catalog, local, pipeline, rollout, serving

app = typer.Typer(
    help="OneRec-style generative recommendation: build a run directory stage by stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
groups = (pipeline.app, baselines.app, serving.app, rollout.app, blocklist.app, local.app)  # `onerec --help`'s order
for group in groups:
    app.registered_commands += group.registered_commands
app.add_typer(catalog.app, name="catalog")  # `onerec catalog add`


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    """Logs go to stderr; machine-readable output (--json) goes to stdout."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )



if __name__ == "__main__":
    app()
