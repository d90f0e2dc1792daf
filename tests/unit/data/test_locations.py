"""Where shards may be read from, and how big their members may be.

`check_location` is the one gate for manifests, shard roots and shard URLs: local paths,
file: URLs, http(s) from `scenario.allowed_hosts` and listed object-store buckets; never a
command scheme (`pipe:` and webdataset's other gopen schemes), never a metadata address, no
redirect to another host. `iter_plain_tar` refuses a hostile shard from its headers, before
reading (or allocating) what they claim.
"""
from __future__ import annotations

import gzip
import lzma
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest

from cldist.data.shards import iter_shard
from cldist.data.manifest import Manifest
from cldist.data.remote import check_location, open_url
from cldist.data.verify import verify_dataset
from cldist.errors import DataError

from tests.conftest import serve_directory

GIB = 1 << 30


# ------------------------------------------------------------------ locations
@pytest.mark.parametrize("location, hosts, message", [
    ("pipe:id > /tmp/PWNED; cat D", (), "the pipe: scheme is refused"),
    ("PIPE:id", (), "the pipe: scheme is refused"),
    ("gs://bucket/ds", (), "gs://bucket is not an allowed host"),
    ("hf://datasets/x/y", (), "the hf: scheme is refused"),
    ("ais://bucket/x", (), "the ais: scheme is refused"),
    ("ftp://host/x", ["host"], "the ftp: scheme is refused"),
    ("http://evil.example/ds", (), "scenario.allowed_hosts=[evil.example]"),
    ("http://evil.example/ds", ["good.example"], "evil.example is not an allowed host"),
    ("http://good.example:8080/ds", ["good.example:8000"], "not an allowed host"),
    ("http://good.example/ds", ["https://good.example"], "not an allowed host"),
    ("http://good.example@evil.example/ds", ["good.example"], "credentials"),
    ("http://169.254.169.254/latest/meta-data", ["169.254.169.254"], "link-local"),
    ("http://[fe80::1]/x", ["[fe80::1]"], "link-local"),
    ("http://metadata.google.internal/x", ["metadata.google.internal"], "metadata"),
    ("file://fileserver/share", (), "not host 'fileserver'"),
    ("s3://other-bucket/x", ["s3://bucket"], "s3://other-bucket is not an allowed host"),
])
def test_refused_locations(location, hosts, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_location(location, hosts)


@pytest.mark.parametrize("location, hosts", [
    ("/data/ds/train/task-000-000000.tar", ()),
    ("relative/ds", ()),
    ("file:///data/ds", ()),
    ("file:/data/ds", ()),
    ("http://good.example/ds", ["good.example"]),
    ("https://GOOD.example:8443/ds", ["good.example"]),
    ("http://good.example:8000/ds", ["good.example:8000"]),
    ("https://good.example/ds", ["https://good.example"]),
    ("http://good.example/ds", ["good.example:80"]),
    ("s3://bucket/ds", ["s3://bucket"]),
])
def test_allowed_locations(location, hosts):
    assert check_location(location, hosts) == location


def test_no_shell_even_past_the_gate(tmp_path):
    # open_url is reached only with checked URLs, but refuses command schemes regardless
    marker = tmp_path / "PWNED"
    with pytest.raises(DataError, match="pipe: scheme is refused"):
        open_url(f"pipe:touch {marker}")
    assert not marker.exists()
    with pytest.raises(DataError, match="link-local"):
        open_url("http://169.254.169.254/latest/meta-data")


def test_devices_are_not_shards():
    with pytest.raises(DataError, match="not a regular file"):
        open_url("/dev/zero")  # would hash forever


def test_allowed_loopback_host_works_and_redirects_stay_on_it(digits_dir):
    server, url = serve_directory(digits_dir)
    same, same_url = serve_directory(digits_dir, redirect_to=url)  # 127.0.0.1 -> 127.0.0.1
    off, off_url = serve_directory(digits_dir, redirect_to=url.replace("127.0.0.1", "localhost"))
    try:
        with pytest.raises(DataError, match=r"scenario.allowed_hosts=\[127.0.0.1\]"):
            Manifest.load(url)
        remote = Manifest.load(url, allowed_hosts=["127.0.0.1"])
        assert remote.to_dict() == Manifest.load(digits_dir).to_dict()
        assert verify_dataset(url, decode_images=False, allowed_hosts=["127.0.0.1"]) == []
        assert Manifest.load(same_url, allowed_hosts=["127.0.0.1"]).n_tasks == remote.n_tasks
        with pytest.raises(DataError, match="redirects .* another host"):
            Manifest.load(off_url, allowed_hosts=["127.0.0.1"])
    finally:
        for s in (server, same, off):
            s.shutdown()
            s.server_close()


# ------------------------------------------------------------------ sizes
def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.GNU_FORMAT)


def _sparse_tar(expanded: int) -> bytes:
    """A GNU sparse `a.png` of `expanded` bytes of holes, and its label: 2.5 KB on disk."""
    header = bytearray(_header("a.png", 0, tarfile.GNUTYPE_SPARSE))
    header[483:495] = tarfile.itn(expanded, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + _header("a.cls", 1) + b"0".ljust(512, b"\0") + b"\0" * 1024


def _xz_bomb() -> bytes:
    """An xz tar whose 'a.cls' is 8 MiB of zeros (the same trick scales to 1 GiB in 165 KB): 1.6 KB.
    Refused by its first bytes, whatever it expands to."""
    return lzma.compress(_header("a.cls", 8 << 20) + bytes(8 << 20) + b"\0" * 1024, preset=0)


def _peak_bytes(path: Path) -> tuple[int, str]:
    """Peak Python allocation while reading shard `path`, and the refusal (or 'ok')."""
    tracemalloc.start()
    try:
        list(iter_shard(str(path)))
        outcome = "ok"
    except DataError as exc:
        outcome = str(exc)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, outcome


@pytest.mark.parametrize("name, raw, message", [
    ("header-claims-1GiB", _header("a.png", GIB) + b"\0" * 1024,
     "'a.png' of 1073741824 bytes (its header says), more than the 67108864-byte limit"),
    ("sparse-1GiB", _sparse_tar(GIB), "'a.png', a GNU sparse file"),
    ("gzip", gzip.compress(_header("a.cls", 1) + b"0".ljust(512, b"\0") + b"\0" * 1024),
     "is gzip-compressed; cldist reads only plain uncompressed tar"),
    ("xz-8MiB-label", _xz_bomb(), "is xz-compressed"),
    ("label-5000-digits", _header("a.png", 0) + _header("a.cls", 5000) + b"7" * 5000
     + b"\0" * (512 * 10 - 5000) + b"\0" * 1024, "label too long: its 'cls' member is 5000"),
    ("symlink", _header("a.png", 0, tarfile.SYMTYPE) + b"\0" * 1024, "a symbolic link"),
    ("pax-header", _header("././@PaxHeader", GIB, tarfile.XHDTYPE) + b"\0" * 1024,
     "a pax extended header"),
])
def test_hostile_shard_refused_from_its_headers(name, raw, message, digits_dir, tmp_path):
    clean = Path(digits_dir) / Manifest.load(digits_dir).tasks[0].train[0].path
    clean_peak, outcome = _peak_bytes(clean)
    assert outcome == "ok"
    hostile = tmp_path / "hostile.tar"
    hostile.write_bytes(raw)
    start = time.perf_counter()
    peak, outcome = _peak_bytes(hostile)
    assert message in outcome, outcome
    assert str(hostile) in outcome
    assert time.perf_counter() - start < 2
    assert peak < 2 * clean_peak, (peak, clean_peak)


def test_member_cap_is_configurable(digits_dir):
    manifest = Manifest.load(digits_dir, max_member_bytes=100)
    shard = manifest.tasks[0].train[0]
    with pytest.raises(DataError, match="more than the 100-byte limit"):
        list(iter_shard(manifest.shard_url(shard), max_member_bytes=manifest.max_member_bytes))
    problems = verify_dataset(digits_dir, decode_images=False, max_member_bytes=100)
    assert problems and all("100-byte limit" in p for p in problems)
    assert verify_dataset(digits_dir, decode_images=False) == []
