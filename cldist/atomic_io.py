"""Crash-safe file writes: readers see the old file or the new one, never half of one.

Write a temporary file in the same directory, fsync it, rename it over the target (atomic on
POSIX) and fsync the directory so that the rename itself survives a crash. Every file cldist
persists (manifests, state.json, metrics.json) goes through here: the run directory
(cldist.rundir), the data builder (cldist.data), reports and sweeps. It sits on the ground floor
beside cldist.errors, so every package may import it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import StorageError


def fsync_dir(directory: str | os.PathLike) -> None:
    """Persist renames in `directory` (a no-op where directories cannot be opened/synced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_and_sync(fh, data: bytes) -> None:
    """Write `data` and force it to the disk: where a full disk or quota shows up."""
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Replace `path` with `data` atomically; a failed write leaves the old file and no tmp.

    An OSError (disk full, quota, read-only or forbidden directory) becomes a StorageError
    naming the file, so the CLI reports it in one line instead of a traceback.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _storage_error(path, e) from None
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            _write_and_sync(fh, data)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _storage_error(path, e) from None
        raise
    fsync_dir(path.parent)
    return path


def _storage_error(path: Path, e: OSError) -> StorageError:
    reason = e.strerror or str(e)
    return StorageError(f"cannot write {path}: {reason}; free space on that file system (or "
                        f"fix its permissions) and retry")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def _json_default(value: Any):
    # numpy scalars/arrays and torch tensors turn up in metrics; store them as plain values
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serialisable")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True,
                                              default=_json_default) + "\n")
