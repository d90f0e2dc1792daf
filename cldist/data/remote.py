"""Where shards and manifests may be read from, and opening them.

`check_location` is the one place that decides whether cldist may read a location:
- local paths and `file:` URLs (the caller keeps shard paths inside their dataset root, see
  `cldist.data.manifest.shard_path_problem`); only regular files are opened, never a device
  or FIFO;
- `http://` / `https://` URLs whose host the user allowed (`scenario.allowed_hosts`; by
  default none, so a remote URL is refused with a message naming the key). Redirects are
  followed only to the same host, and link-local / cloud-metadata addresses
  (169.254.0.0/16, fe80::/10, metadata.google.internal) are refused even when listed;
- object stores through fsspec (`s3://`, `gs://`, `gcs://`, `az://`, `abfs://`, `abfss://`,
  `memory://`) for the buckets listed as `SCHEME://BUCKET`, when fsspec and the scheme's
  package are installed.
Nothing else: no `pipe:` and none of webdataset's other `gopen` schemes (they run commands
through a shell), no `ftp:`, no unknown scheme.

`download_to_spool` / `download_to_file` copy a remote shard while hashing it, so a shard is
downloaded once, checked against its manifest sha256, and only then parsed (with a cache
directory the copy is kept for the next epoch or run, named by its sha256).

Shard access: `open_shard` is how readers open a shard. When asked to verify, it checks the
shard against its manifest sha256 before anything in it is parsed: a local shard once per
process (`verify_shard_checksum`, cached by path, size and mtime), a remote one as it is
downloaded (into a temporary spool, or into the shard cache directory - `cache_dir`, default
$CLDIST_SHARD_CACHE - where it is kept under its sha256 and read locally from then on). Every
failure to read a shard is one DataError naming it and the fix (`shard_read_errors`).
"""
from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Iterable

from cldist.errors import DataError

HTTP_TIMEOUT_S = 60
SPOOL_IN_MEMORY_BYTES = 64 << 20  # remote shards up to this size are never written to disk
SHARD_CACHE_ENV = "CLDIST_SHARD_CACHE"  # default cache directory for remote shards
ALLOWED_HOSTS_KEY = "scenario.allowed_hosts"  # where the user allows remote hosts
HTTP_SCHEMES = ("http", "https")
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss", "memory")
# Cloud metadata services answer with credentials: never read, whatever the allow-list says.
_METADATA_HOSTS = ("metadata.google.internal", "metadata", "instance-data")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_CHUNK = 1 << 20


def url_scheme(location: str) -> str | None:
    """The scheme of `location` (lower case), None for a plain local path."""
    match = _SCHEME_RE.match(location)
    return match.group(1).lower() if match else None


def is_local(url: str) -> bool:
    return url_scheme(url) in (None, "file")


def local_path(url: str) -> str:
    return re.sub(r"^file:(//(localhost)?)?", "", url, flags=re.IGNORECASE)


def scheme(url: str) -> str:
    return url_scheme(url) or "file"


def _refused_host(host: str) -> str | None:
    """Why `host` is never contacted (None when it may be, if allowed)."""
    if host.rstrip(".") in _METADATA_HOSTS:
        return "a cloud metadata service"
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None
    if address.is_link_local or (getattr(address, "ipv4_mapped", None)
                                 and address.ipv4_mapped.is_link_local):
        return "a link-local address (cloud metadata services live there)"
    return None


def _host_allowed(kind: str, parts: urllib.parse.SplitResult,
                  allowed_hosts: Iterable[str]) -> bool:
    """Whether an entry of `allowed_hosts` allows the URL `parts` (of scheme `kind`): `HOST`
    or `HOST:PORT` allow http and https, `http://HOST[:PORT]` / `https://...` that scheme
    only, `s3://BUCKET` (any object-store scheme) that bucket."""
    host = (parts.hostname or "").lower()
    port = parts.port if kind in OBJECT_STORE_SCHEMES else \
        parts.port or {"http": 80, "https": 443}[kind]
    for entry in allowed_hosts:
        entry_kind, sep, rest = str(entry).strip().lower().rstrip("/").partition("://")
        if not sep:
            entry_kind, rest = "", entry_kind
        if kind in OBJECT_STORE_SCHEMES:
            if entry_kind == kind and rest == parts.netloc.lower():
                return True
            continue
        if entry_kind not in ("", kind):
            continue
        try:
            wanted = urllib.parse.urlsplit("//" + rest)
            if (wanted.hostname or "") == host and wanted.port in (None, port):
                return True
        except ValueError:  # a malformed entry allows nothing
            continue
    return False


def check_location(location: str, allowed_hosts: Iterable[str] = (), what: str = "shard",
                   key: str = ALLOWED_HOSTS_KEY) -> str:
    """`location` if cldist may read from it (see the module docstring), else a DataError
    naming it, why, and the fix (`key` is the setting that allows hosts)."""
    if not isinstance(location, str) or not location or "\x00" in location:
        raise DataError(f"{what} location {location!r} is not a path or URL")
    kind = url_scheme(location)
    if kind is None:
        return location
    if kind == "file":
        netloc = urllib.parse.urlsplit(location).netloc if location[5:7] == "//" else ""
        if netloc not in ("", "localhost"):
            raise DataError(f"{what} {location}: a file: URL must name a local file "
                            f"(file:///path), not host {netloc!r}")
        return location
    if kind in HTTP_SCHEMES or kind in OBJECT_STORE_SCHEMES:
        allowed_hosts = [str(h) for h in (allowed_hosts or ())]
        try:
            parts = urllib.parse.urlsplit(location)
            parts.port  # a malformed port raises here
        except ValueError as exc:
            raise DataError(f"{what} {location} is not a valid URL ({exc})") from None
        host = (parts.hostname or "").lower() if kind in HTTP_SCHEMES else parts.netloc
        if not host:
            raise DataError(f"{what} {location} names no host")
        if kind in HTTP_SCHEMES:
            if parts.username is not None or parts.password is not None:
                raise DataError(f"{what} {location}: credentials in a URL are refused; serve "
                                f"the data without them")
            refused = _refused_host(host)
            if refused:
                raise DataError(f"{what} {location}: {host} is {refused}; cldist never "
                                f"reads from it, whatever {key} says")
        if not _host_allowed(kind, parts, allowed_hosts):
            entry = host if kind in HTTP_SCHEMES else f"{kind}://{host}"
            now = f"now {allowed_hosts}" if allowed_hosts else "empty by default"
            raise DataError(f"{what} {location}: {entry} is not an allowed host ({key} is "
                            f"{now}); if you trust it, add it: {key}=[{entry}]")
        return location
    raise DataError(f"{what} {location}: the {kind}: scheme is refused; cldist reads only "
                    f"local paths, file:, http(s):// from {key} and object stores "
                    f"({', '.join(s + '://' for s in OBJECT_STORE_SCHEMES)}) - never pipe: or "
                    f"webdataset's other gopen schemes, which run commands; copy the data "
                    f"somewhere local or serve it over http(s)")


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to http(s) on the same host: an allowed server must not send
    cldist to another one (or to a metadata service)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if new.scheme.lower() not in HTTP_SCHEMES or \
                (new.hostname or "").lower() != (old.hostname or "").lower() or \
                _refused_host((new.hostname or "").lower()):
            raise DataError(f"{req.full_url} redirects (HTTP {code}) to {newurl}, another host; "
                            f"cldist follows redirects only within the host the user allowed: "
                            f"point the manifest at the final location")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_HTTP = urllib.request.build_opener(_SameHostRedirects)


def _open_local(path: str) -> BinaryIO:
    # A FIFO blocks and /dev/zero never ends: only regular files are shards or manifests.
    mode = os.stat(path).st_mode  # FileNotFoundError: a missing file, as before
    if not stat.S_ISREG(mode):
        raise DataError(f"{path} is not a regular file; shards and manifests are files")
    return open(path, "rb")


def open_url(url: str) -> BinaryIO:
    """A binary read stream for `url`, which `check_location` has passed.

    Raises FileNotFoundError when the object does not exist, OSError when it cannot be read,
    DataError for a location cldist never reads (whatever the allow-list) or a scheme nothing
    here can open.
    """
    if is_local(url):
        return _open_local(local_path(url))
    kind = scheme(url)
    if kind in HTTP_SCHEMES:
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        if _refused_host(host):
            check_location(url, [host])  # raises, naming why
        try:
            return _HTTP.open(url, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise FileNotFoundError(url) from None
            raise OSError(f"HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise OSError(str(exc.reason)) from None
    if kind not in OBJECT_STORE_SCHEMES:
        check_location(url)  # raises: never gopen (pipe: and friends run a shell)
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


# ------------------------------------------------------------------ shard access
REBUILD_HINT = ("rebuild the dataset with `cldist data build` or run "
                 "`cldist data verify DIR` to list every damaged shard")
_verified_shards: dict[tuple, str] = {}


@contextlib.contextmanager
def shard_read_errors(url: str, sha256: str | None = None):
    """Any failure to read shard `url` as one DataError naming it and the fix."""
    try:
        yield
    except ChecksumMismatch as exc:
        raise _checksum_error(url, exc.actual, sha256) from None
    except FileNotFoundError:
        raise DataError(f"shard {url} is missing; {REBUILD_HINT}") from None
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"shard {url} cannot be read ({exc}); {REBUILD_HINT}") from None


def _checksum_error(url: str, actual: str, expected: str) -> DataError:
    return DataError(f"shard {url} fails its checksum (sha256 {actual[:16]}..., manifest "
                     f"says {expected[:16]}...): it is corrupt or changed since the build; "
                     f"{REBUILD_HINT}")


def shard_sha256(url: str, chunk_size: int = 1 << 20) -> str:
    """The sha256 of a shard at a local path or URL (DataError if it cannot be read)."""
    digest = hashlib.sha256()
    with shard_read_errors(url):
        with open_url(url) as stream:
            while chunk := stream.read(chunk_size):
                digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> str | None:
    """The shard cache directory from $CLDIST_SHARD_CACHE (None when unset or empty)."""
    return os.environ.get(SHARD_CACHE_ENV) or None


def verify_shard_checksum(url: str, expected_sha256: str) -> None:
    """Check a shard against its manifest sha256, once per process per (path, size, mtime).

    A remote shard is downloaded to check it; with a shard cache ($CLDIST_SHARD_CACHE) the
    download is kept, so a pre-flight check also fills the cache.
    """
    if not is_local(url) and default_cache_dir() is not None:
        open_shard(url, expected_sha256, True, default_cache_dir()).close()
        return
    if is_local(url):
        try:
            stat_result = os.stat(local_path(url))
        except FileNotFoundError:
            raise DataError(f"shard {url} is missing; {REBUILD_HINT}") from None
        cache_key = (url, expected_sha256, stat_result.st_size, stat_result.st_mtime_ns)
    else:
        cache_key = (url, expected_sha256)
    if cache_key in _verified_shards:
        return
    actual = shard_sha256(url)
    if actual != expected_sha256:
        raise _checksum_error(url, actual, expected_sha256)
    _verified_shards[cache_key] = actual


def open_shard(url: str, sha256: str, verify: bool = True,
               cache_dir: str | os.PathLike | None = None) -> BinaryIO:
    """A read stream over the shard at `url`, checked against `sha256` first when `verify`.

    Remote shards are downloaded once: into `cache_dir/<sha256>.tar` when a cache directory is
    given (always checked, since the file is named by its checksum), else into a temporary
    spool when `verify`, else streamed straight from the URL.
    """
    with shard_read_errors(url, sha256):
        if is_local(url):
            if verify:
                verify_shard_checksum(url, sha256)
            return open(local_path(url), "rb")
        if cache_dir is not None:
            cached = str(Path(cache_dir) / f"{sha256}.tar")
            if os.path.isfile(cached):
                try:
                    verify_shard_checksum(cached, sha256)  # hashed once per process
                    return open(cached, "rb")
                except DataError:
                    os.unlink(cached)  # damaged since it was cached: fetch it again
            download_to_file(url, sha256, cached)
            return open(cached, "rb")
        if verify:
            return download_to_spool(url, sha256)
        return open_url(url)
