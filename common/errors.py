"""The one error type for bad input.

A ``UserError`` is something the user can fix (a flag, a config key, a file): the console script prints
it as one ``error: ...`` line and exits with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, named by its flag, key or file. A ``ValueError`` so library callers can catch it as one."""


class ConfigError(UserError):
    """All problems of a config, one per line (``errors``), raised once."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = errors
        super().__init__(f"{source} has {len(errors)} error(s):\n  - " + "\n  - ".join(errors))
