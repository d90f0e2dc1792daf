"""Errors raised at cldist's boundaries.

A `UserError` is a problem the user can fix (a bad override, a missing data root, a
manifest that does not match its shards). The CLI prints its message alone - no traceback -
and exits with status 2. The message must name the culprit and the fix.

When such an error stops a run that already has a run directory, the stream driver records
the directory on the error (`stopped_run`), and the message ends with the command that
continues the run once the cause is fixed.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the culprit and the fix."""

    exit_code = 2
    # set by the stream driver: the run directory this error stopped, its finished tasks
    stopped_run: str | None = None
    finished_tasks: list[int] | None = None
    # what `cldist resume` needs besides the directory to get past this error, if anything
    resume_overrides: str = ""

    def __str__(self) -> str:
        text = super().__str__()
        if self.stopped_run is None:
            return text
        done = "" if self.finished_tasks is None else f" (finished tasks: {self.finished_tasks})"
        args = f" {self.resume_overrides}" if self.resume_overrides else ""
        return (f"{text}\nthe run stopped at a task boundary{done}; once that is fixed, "
                f"`cldist resume {self.stopped_run}{args}` continues it")


class DataError(UserError):
    """A shard, manifest or data root that cannot be used as it is."""


class StorageError(UserError):
    """A file cldist must write cannot be written (disk full, quota, permissions)."""


class ConfigError(UserError):
    """One or more invalid configuration values; the message lists every problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


class Interrupted(BaseException):
    """SIGTERM or SIGINT stopped a run (a BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it). The CLI exits with 128 + the signal number."""

    def __init__(self, signum: int):
        import signal
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(signal.Signals(signum).name)

    stopped_run: str | None = None
    finished_tasks: list[int] | None = None

    def __str__(self) -> str:
        text = f"stopped by {self.args[0]}"
        if self.stopped_run is None:
            return text
        done = "" if self.finished_tasks is None else f" (finished tasks: {self.finished_tasks})"
        return (f"{text}; the run {self.stopped_run} is recorded as interrupted{done}, and "
                f"`cldist resume {self.stopped_run}` continues it")
