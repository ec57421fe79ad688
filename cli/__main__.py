"""`python -m cli ...` runs the `onerec` command (what the stack launches with this interpreter)."""

from cli.main import app

app()
