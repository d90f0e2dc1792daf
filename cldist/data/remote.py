"""Opening shards and manifests wherever they live.

- local paths and `file:` URLs: plain `open`;
- `http://` and `https://`: the standard library (`urllib`), so no external tool is needed and
  a 404 reads as a missing shard;
- other schemes webdataset's `gopen` knows (`pipe:`, `gs://`, `hf://`, `ais://`, ...): gopen;
- anything else (`s3://`, `gcs://`, `az://`, `memory://`, ...): fsspec, when it and the
  scheme's filesystem package are installed.

`download_to_spool` / `download_to_file` copy a remote shard while hashing it, so a shard is
downloaded once, checked against its manifest sha256, and only then parsed (with a cache
directory the copy is kept for the next epoch or run, named by its sha256).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from cldist.errors import DataError

HTTP_TIMEOUT_S = 60
SPOOL_IN_MEMORY_BYTES = 64 << 20  # remote shards up to this size are never written to disk
SHARD_CACHE_ENV = "CLDIST_SHARD_CACHE"  # default cache directory for remote shards
_CHUNK = 1 << 20


def is_local(url: str) -> bool:
    return url.startswith("file:") or ("://" not in url and not url.startswith("pipe:"))


def local_path(url: str) -> str:
    return re.sub(r"^file:(//)?", "", url)


def scheme(url: str) -> str:
    return url.split(":", 1)[0].lower() if not is_local(url) else "file"


def open_url(url: str) -> BinaryIO:
    """A binary read stream for `url`.

    Raises FileNotFoundError when the object does not exist, OSError when it cannot be read,
    DataError when nothing here can open the scheme.
    """
    if is_local(url):
        return open(local_path(url), "rb")
    kind = scheme(url)
    if kind in ("http", "https"):
        try:
            return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise FileNotFoundError(url) from None
            raise OSError(f"HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise OSError(str(exc.reason)) from None
    from webdataset.gopen import gopen, gopen_schemes

    if kind in gopen_schemes and kind != "__default__":
        return gopen(url, "rb")
    try:
        import fsspec
    except ImportError:
        raise DataError(f"cannot open {url}: the {kind}:// scheme needs fsspec and its "
                        f"filesystem package (e.g. s3fs for s3://); install them, or copy the "
                        f"shards somewhere local or behind http(s)") from None
    try:
        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as exc:  # unknown protocol or its package is missing
        raise DataError(f"cannot open {url}: fsspec has no usable filesystem for {kind}:// "
                        f"({exc}); install the package fsspec names") from None


def read_url(url: str, limit: int, what: str) -> bytes:
    """The whole object at `url` (at most `limit` bytes), for small files such as manifests."""
    try:
        with open_url(url) as stream:
            data = stream.read(limit + 1)
    except FileNotFoundError:
        raise DataError(f"no {what} at {url}: build one with `cldist data build` and serve "
                        f"its directory") from None
    except OSError as exc:
        raise DataError(f"cannot read {what} {url}: {exc}") from None
    if len(data) > limit:
        raise DataError(f"{what} {url} is larger than {limit} bytes; refusing to read it")
    return data


def copy_hashing(source: BinaryIO, target: BinaryIO) -> str:
    """Copy `source` to `target`; return the sha256 of what was copied."""
    digest = hashlib.sha256()
    while chunk := source.read(_CHUNK):
        digest.update(chunk)
        target.write(chunk)
    return digest.hexdigest()


class ChecksumMismatch(Exception):
    """A downloaded shard whose sha256 is not the manifest's."""

    def __init__(self, actual: str):
        super().__init__(actual)
        self.actual = actual


def download_to_spool(url: str, expected_sha256: str | None) -> BinaryIO:
    """An open temporary copy of `url` (memory, then disk past SPOOL_IN_MEMORY_BYTES) that
    disappears when closed. Raises ChecksumMismatch when its sha256 is not
    `expected_sha256` (None: no check)."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES)
    try:
        with open_url(url) as stream:
            actual = copy_hashing(stream, spool)
        if expected_sha256 is not None and actual != expected_sha256:
            raise ChecksumMismatch(actual)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


def download_to_file(url: str, expected_sha256: str, target: str | os.PathLike) -> None:
    """Copy `url` to `target` (via a temporary name in its directory) if and only if its
    sha256 is `expected_sha256`; else raise ChecksumMismatch and leave nothing behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=".download-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out, open_url(url) as stream:
            actual = copy_hashing(stream, out)
        if actual != expected_sha256:
            raise ChecksumMismatch(actual)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
