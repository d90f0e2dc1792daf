"""What makes a directory a cldist run directory, the lock on it, and reading its files.

* Ownership: a directory is cldist's only if its `state.json` says so - `format_version`
  (written first, when `cldist run` creates the run), or, for runs made before the marker
  existed, the `completed_tasks` and `status` keys every cldist state.json has held. Any
  other non-empty directory is refused by name, never filled or overwritten.
* The lock: every command that writes into a run directory holds an exclusive flock on
  `RUN/cldist.lock` for as long as it runs. The kernel drops a flock when its process dies,
  so a crashed run never leaves a stale lock; the file holds the holder's pid and host while
  it is held (empty otherwise) so a refused writer can say who holds it.
* Run files are JSON read through `read_json`: size- and depth-capped, so a damaged or
  hostile file is one message naming it instead of a RecursionError or a memory blow-up.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

from ..errors import UserError

FORMAT_VERSION = 1
STATE_FILE = "state.json"
LOCK_FILE = "cldist.lock"
# far above any real run file (a 100-task state.json is a few MB), far below a memory problem
MAX_JSON_BYTES = 256 * 1024 * 1024
MAX_JSON_DEPTH = 64  # cldist's own files nest 6 levels at most

DAMAGED = "the run directory is damaged: restore the file from a backup or start a new run"


# ------------------------------------------------------------------------------- reading
def read_json(path: str | os.PathLike, remedy: str = DAMAGED, *, max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH, expect: type | None = dict) -> Any:
    """`path` parsed as JSON; a UserError naming the file when it is unreadable, too large,
    nested deeper than `max_depth`, not JSON, or not of type `expect`. A missing file raises
    FileNotFoundError (callers say what its absence means)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); check the run directory's "
                        f"permissions") from None
    if len(raw) > max_bytes:
        raise UserError(f"{path} is larger than {max_bytes} bytes, far more than cldist "
                        f"writes; {remedy}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:  # the C parser recurses once per nesting level
        raise UserError(f"{path} is nested deeper than {max_depth} levels, which cldist never "
                        f"writes; {remedy}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {remedy}") from None
    if _too_deep(data, max_depth):
        raise UserError(f"{path} is nested deeper than {max_depth} levels, which cldist never "
                        f"writes; {remedy}")
    if expect is not None and not isinstance(data, expect):
        raise UserError(f"{path} must hold a JSON {'object' if expect is dict else expect.__name__}, "
                        f"not {type(data).__name__}; {remedy}")
    return data


def _too_deep(data: Any, max_depth: int) -> bool:
    stack = [(data, 1)]  # iterative: the check itself must not recurse
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                return True
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return False


# ----------------------------------------------------------------------------- ownership
def state_marker_problem(data: Any) -> str | None:
    """Why `data` (a parsed state.json) is not cldist's marker; None when it is."""
    if not isinstance(data, dict):
        return "it is not a JSON object"
    version = data.get("format_version")
    if version is None:  # a run made before the marker: its state.json always had these
        return None if {"completed_tasks", "status"} <= data.keys() else \
            "it has no format_version and not the keys cldist writes"
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return f"format_version is {version!r}, not a version number"
    if version > FORMAT_VERSION:
        return (f"it was written by a newer cldist (format_version {version}; this one reads "
                f"{FORMAT_VERSION}) - use that version")
    return None


def read_run_file(run_dir, name: str):
    """RUN/name read by `read_json`; a missing file means RUN is not a run directory."""
    try:
        return read_json(Path(run_dir) / name)
    except FileNotFoundError:
        raise UserError(f"{run_dir} is not a cldist run directory (no {name}); give the "
                        f"directory a `cldist run` wrote") from None


def require_run_dir(run_dir: str | os.PathLike) -> dict:
    """state.json of the cldist run in `run_dir`; a UserError when the directory is not one."""
    root = Path(run_dir)
    if not root.is_dir():
        what = "it is a file" if root.exists() else "it does not exist"
        raise UserError(f"{run_dir} is not a cldist run directory ({what}); give the directory "
                        f"a `cldist run` wrote")
    path = root / STATE_FILE
    data = read_run_file(run_dir, STATE_FILE)
    problem = state_marker_problem(data)
    if problem:
        raise UserError(f"{path} is not a cldist run state ({problem}); {run_dir} is not a "
                        f"cldist run directory, or {DAMAGED}")
    return data


def foreign_entries(run_dir: str | os.PathLike) -> list[str]:
    """What a directory about to become a new run holds besides cldist's lock file."""
    try:
        return sorted(p.name for p in Path(run_dir).iterdir() if p.name != LOCK_FILE)
    except OSError as e:
        raise UserError(f"cannot read run_dir={run_dir} ({e.strerror or e}); choose another "
                        f"run_dir=") from None


# ---------------------------------------------------------------------------------- lock
class RunDirLocked(UserError):
    """Another process holds the run directory's lock."""


_held: dict[str, list] = {}  # realpath -> [fd, count]: one process may nest its own holds


def acquire_lock(run_dir: str | os.PathLike) -> None:
    """Take `RUN/cldist.lock` exclusively (re-entrant within this process) or raise
    RunDirLocked naming the holder. The directory must exist."""
    key = os.path.realpath(run_dir)
    if key in _held:
        _held[key][1] += 1
        return
    path = Path(run_dir) / LOCK_FILE
    try:
        # O_NOFOLLOW: a planted symlink must not make cldist truncate a file elsewhere
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"cannot open the lock file {path} ({e.strerror or e}); it must be a "
                        f"plain file in a writable run directory") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{path} is not a plain file; remove it (cldist creates it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            raise RunDirLocked(f"{run_dir} is in use by another cldist process"
                               f"{f' ({holder})' if holder else ''}; wait for it to finish "
                               f"or stop it - two writers would mix their runs") from None
        except OSError as e:
            raise UserError(f"cannot lock {path} ({e.strerror or e}); the file system must "
                            f"support flock") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    _held[key] = [fd, 1]


def release_lock(run_dir: str | os.PathLike) -> None:
    key = os.path.realpath(run_dir)
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    fd = entry[0]
    try:
        os.ftruncate(fd, 0)  # an empty file: nobody holds it
    except OSError:
        pass
    os.close(fd)  # closing drops the flock


class run_dir_lock:
    """`with run_dir_lock(RUN):` holds the run directory's lock for the block."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = run_dir

    def __enter__(self):
        acquire_lock(self.run_dir)
        return self

    def __exit__(self, *exc) -> None:
        release_lock(self.run_dir)
