"""Errors raised at cldist's boundaries.

A `UserError` is a problem the user can fix (a bad override, a missing data root, a
manifest that does not match its shards). The CLI prints its message alone - no traceback -
and exits with status 2. The message must name the culprit and the fix.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the culprit and the fix."""

    exit_code = 2


class DataError(UserError):
    """A shard, manifest or data root that cannot be used as it is."""


class ConfigError(UserError):
    """One or more invalid configuration values; the message lists every problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")
