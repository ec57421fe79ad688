"""User-facing errors: the CLI turns a UsageError into one line on stderr and exit code 2."""


class UsageError(Exception):
    """Bad input from the user (a file, an option, a run directory); the message names it."""
