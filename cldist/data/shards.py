"""Webdataset shards: deterministic writing, strict reading.

A shard is a plain (uncompressed, USTAR) tar in webdataset layout: every sample is the
members `KEY.png` (PNG bytes; or `KEY.jpg` / `KEY.webp` when an original file is stored as it
is) and `KEY.cls` (the original class id as ASCII decimal). Every
tar header field that could vary between machines or runs - mtime, uid/gid, user/group names,
mode - is fixed, and PNGs are encoded with fixed settings, so the same input gives
byte-identical shards and therefore the same sha256 (given the same Python, Pillow and zlib,
which the project's pinned constraints fix).

Shards are written to a temporary name and renamed into place, so a crashed build never
leaves a half-written shard under its final name.

Reading (`iter_plain_tar`) accepts exactly what is written here: an uncompressed tar of
regular members (no compression, sparse files, links, devices, directories or pax/GNU
extension headers), each at most `max_member_bytes` as its header says - checked before a
byte of the member is read, so a tiny hostile file cannot make a reader allocate gigabytes.

Samples (`iter_shard`) are grouped from the members strictly: a sample must be exactly one
image (`png`/`jpg`/`jpeg`/`webp`, decoded by `decode_image` with PIL restricted to that format,
decompression bombs refused) and one `cls` (ASCII decimal class id, at most MAX_LABEL_BYTES).
Any other member - `.pyd`, `.pkl`, `.pth`, a name without an extension, a link, device,
directory or sparse file - is a `DataError` naming the shard and the key. Nothing is ever
unpickled. A label outside the task's classes, a truncated or corrupt tar, or a sample count
that differs from the manifest is likewise a `DataError` naming the shard.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext

from cldist.data.remote import REBUILD_HINT, open_url, shard_read_errors
from cldist.errors import DataError

# Fixed header fields: the archive depends on the samples alone.
_TAR_MTIME = 0
_TAR_MODE = 0o444
_PNG_COMPRESS_LEVEL = 6
# Member extension the builder writes -> the PIL format readers decode it with.
STORED_IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
# Member extension a reader accepts -> the only PIL format allowed to decode it.
IMAGE_FORMATS = {**STORED_IMAGE_FORMATS, "jpeg": "JPEG"}
LABEL_EXTENSION = "cls"
# The largest member a reader accepts (override: scenario.max_member_bytes): far above any real
# image (a 4000 x 3000 PNG is ~ 20 MiB), far below what would exhaust a worker's memory.
MAX_MEMBER_BYTES = 64 << 20
MAX_LABEL_BYTES = 20  # a `cls` member: an ASCII class id, a few digits
_BLOCK = tarfile.BLOCKSIZE
_LABEL_RE = re.compile(r"^\s*-?[0-9]+\s*$")
_COMPRESSED = {b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz", b"BZh": "bzip2",
               b"\x28\xb5\x2f\xfd": "zstd", b"\x5d\x00\x00": "lzma"}
_MEMBER_KINDS = {
    tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link",
    tarfile.DIRTYPE: "directory", tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO",
    tarfile.CONTTYPE: "contiguous file", tarfile.GNUTYPE_SPARSE: "GNU sparse file",
    tarfile.XHDTYPE: "pax extended header", tarfile.XGLTYPE: "pax global header",
    tarfile.SOLARIS_XHDTYPE: "pax extended header", tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link name"}


def shard_relpath(split: str, task_id: int, index: int) -> str:
    """The shard's path relative to the dataset directory: `split/task-TTT-SSSSSS.tar`."""
    return f"{split}/task-{task_id:03d}-{index:06d}.tar"


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of `image` (uint8 HxW or HxWx3 array, or an L/RGB PIL image)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if image.mode not in ("L", "RGB"):
        raise ValueError(f"encode_png expects an L or RGB image, got mode {image.mode}")
    buffer = io.BytesIO()
    # No optimize pass and no metadata: the bytes depend on the pixels only.
    image.save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _TAR_MTIME
    info.mode = _TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_shard(path: str | os.PathLike, samples: Iterable[tuple]) -> int:
    """Write samples to the tar at `path`; return the count.

    A sample is `(key, png_bytes, class_id)` or `(key, image_bytes, class_id, ext)` with `ext`
    one of STORED_IMAGE_FORMATS. Keys must be unique and contain no '.' or '/' (webdataset
    splits member names at the first dot of the base name).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for sample in samples:
                    key, image, class_id = sample[:3]
                    ext = sample[3] if len(sample) > 3 else "png"
                    if not key or "." in key or "/" in key:
                        raise ValueError(f"invalid sample key {key!r}")
                    if ext not in STORED_IMAGE_FORMATS:
                        raise ValueError(f"invalid image extension {ext!r}")
                    label = str(int(class_id)).encode("ascii")
                    tar.addfile(_tarinfo(f"{key}.{ext}", len(image)), io.BytesIO(image))
                    tar.addfile(_tarinfo(f"{key}.cls", len(label)), io.BytesIO(label))
                    count += 1
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return count


class ShardFormatError(ValueError):
    """A shard that is not a plain tar of bounded regular members; the message says what it
    is instead (readers prefix the shard's name)."""


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def iter_plain_tar(stream: BinaryIO, max_member_bytes: int | None = None
                   ) -> Iterator[tuple[tarfile.TarInfo, Callable[[], bytes]]]:
    """`(header, read)` for every member of the uncompressed tar `stream`, in order.

    Each header is checked - a regular file, at most `max_member_bytes` (None:
    MAX_MEMBER_BYTES) - before anything else of it is read; `read()` returns the member's
    bytes, and a member the caller does not read is skipped. Raises ShardFormatError for
    anything else: compression, another member type, an oversized or truncated member, a
    corrupt header. Python's tarfile is used only to parse each 512-byte header: its reader
    would decompress, expand sparse files and read pax/GNU headers whole before any check.
    """
    limit = MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
    offset = 0
    while True:
        header = _read_exact(stream, _BLOCK)
        if not header:
            raise ShardFormatError("is an empty file" if offset == 0 else
                                   f"ends at byte {offset} without the end-of-archive "
                                   f"marker: truncated")
        if offset == 0:
            for magic, kind in _COMPRESSED.items():
                if header.startswith(magic):
                    raise ShardFormatError(f"is {kind}-compressed; cldist reads only plain "
                                           f"uncompressed tar shards, as `cldist data build` "
                                           f"writes them")
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.EOFHeaderError:
            return  # the end-of-archive marker
        except tarfile.HeaderError as exc:
            raise ShardFormatError(f"is not a plain tar, or is truncated or corrupt (header "
                                   f"at byte {offset}: {exc})") from None
        offset += _BLOCK
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            kind = _MEMBER_KINDS.get(info.type, f"member of tar type {info.type!r}")
            raise ShardFormatError(f"holds member {info.name!r}, a {kind}; cldist reads only "
                                   f"regular image and 'cls' members of a plain tar")
        if not 0 <= info.size <= limit:
            raise ShardFormatError(f"holds member {info.name!r} of {info.size} bytes (its "
                                   f"header says), more than the {limit}-byte limit "
                                   f"(scenario.max_member_bytes); refused unread")
        padded = -(-info.size // _BLOCK) * _BLOCK
        consumed = False

        def read(info=info) -> bytes:
            nonlocal consumed
            consumed = True
            data = _read_exact(stream, info.size)
            if len(data) < info.size:
                raise ShardFormatError(f"has member {info.name!r} cut short at byte "
                                       f"{offset + len(data)}: truncated")
            return data

        yield info, read
        if consumed:
            _read_exact(stream, padded - info.size)
        else:
            skipped = len(_read_exact(stream, padded))
            if skipped < info.size:
                raise ShardFormatError(f"has member {info.name!r} cut short: truncated")
        offset += padded


def read_shard_index(path: str | os.PathLike) -> list[tuple[str, int]] | None:
    """`(key, class_id)` of every sample in a shard this module wrote, in order; None when the
    file is not such a shard (unreadable, truncated, foreign members). Images are not read."""
    index: list[tuple[str, int]] = []
    try:
        with open(path, "rb") as stream:
            for info, read in iter_plain_tar(stream):
                key, _, ext = info.name.partition(".")
                if ext == "cls":
                    if info.size > MAX_LABEL_BYTES:
                        return None
                    index.append((key, int(read().decode("ascii"))))
                elif ext not in STORED_IMAGE_FORMATS:
                    return None
    except (OSError, ShardFormatError, ValueError, UnicodeDecodeError):
        return None
    return index


# -------------------------------------------------------------- shard reading
@dataclass(frozen=True)
class RawSample:
    """One sample as read from a shard: image bytes not yet decoded."""

    shard: str  # the shard's URL or path, for error messages
    key: str
    image_bytes: bytes
    image_format: str  # the PIL format name that may decode it
    label: int  # original class id


def _parse_label(shard: str, key: str, data: bytes) -> int:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = None
    if text is None or not _LABEL_RE.match(text):
        raise DataError(f"shard {shard}: sample {key!r} has a 'cls' member that is not an "
                        f"ASCII integer ({data[:20]!r}); {REBUILD_HINT}")
    return int(text)


def _finish_sample(shard: str, key: str, members: dict[str, bytes],
                   allowed_classes: set[int] | None) -> RawSample:
    images = [ext for ext in members if ext in IMAGE_FORMATS]
    if len(images) != 1 or LABEL_EXTENSION not in members:
        raise DataError(f"shard {shard}: sample {key!r} must have exactly one image "
                        f"(png/jpg/jpeg/webp) and one 'cls' member, has "
                        f"{sorted(members) or 'none'}; {REBUILD_HINT}")
    label = _parse_label(shard, key, members[LABEL_EXTENSION])
    if allowed_classes is not None and label not in allowed_classes:
        raise DataError(f"shard {shard}: sample {key!r} has label {label}, which is not one "
                        f"of this task's classes {sorted(allowed_classes)}; {REBUILD_HINT}")
    return RawSample(shard=shard, key=key, image_bytes=members[images[0]],
                     image_format=IMAGE_FORMATS[images[0]], label=label)


def iter_shard(url: str, allowed_classes: Iterable[int] | None = None,
               expected_count: int | None = None,
               stream: BinaryIO | None = None,
               max_member_bytes: int | None = None) -> Iterator[RawSample]:
    """Yield the samples of one shard, validated but with images still encoded.

    `stream` is the shard already opened (see `open_shard`; it is closed here), else `url` is
    opened without a checksum check. Raises DataError (naming the shard) for unknown members,
    members over `max_member_bytes` (None: the default cap) or of another tar type, bad or
    foreign labels, a truncated/corrupt/compressed tar, or a sample count other than
    `expected_count`.
    """
    allowed = set(allowed_classes) if allowed_classes is not None else None
    seen_keys: set[str] = set()
    count = 0
    key, members = None, {}
    if stream is None:
        with shard_read_errors(url):
            stream = open_url(url)
    try:
        for info, read in iter_plain_tar(stream, max_member_bytes):
            name = info.name
            member_key, ext = base_plus_ext(name)
            if member_key is None:
                raise DataError(f"shard {url}: member {name!r} has no extension; cldist "
                                f"reads only images and 'cls' labels; {REBUILD_HINT}")
            ext = ext.lower()
            if ext not in IMAGE_FORMATS and ext != LABEL_EXTENSION:
                # Checked before the member is even read: pickles are never loaded.
                raise DataError(f"shard {url}: sample {member_key!r} has a member of type "
                                f"'.{ext}' ({name}); cldist reads only png/jpg/jpeg/webp "
                                f"images and 'cls' labels and never unpickles; "
                                f"{REBUILD_HINT}")
            if member_key != key:
                if key is not None:
                    yield _finish_sample(url, key, members, allowed)
                    count += 1
                if member_key in seen_keys:
                    raise DataError(f"shard {url}: key {member_key!r} appears in two "
                                    f"places; {REBUILD_HINT}")
                seen_keys.add(member_key)
                key, members = member_key, {}
            if ext in members:
                raise DataError(f"shard {url}: sample {key!r} has two '.{ext}' members; "
                                f"{REBUILD_HINT}")
            if ext == LABEL_EXTENSION and info.size > MAX_LABEL_BYTES:
                raise DataError(f"shard {url}: sample {key!r} has a label too long: its "
                                f"'cls' member is {info.size} bytes, where a class id "
                                f"takes at most {MAX_LABEL_BYTES}; {REBUILD_HINT}")
            members[ext] = read()
        if key is not None:
            yield _finish_sample(url, key, members, allowed)
            count += 1
    except DataError:
        raise
    except ShardFormatError as exc:
        raise DataError(f"shard {url} {exc}; {REBUILD_HINT}") from None
    except Exception as exc:  # tarfile/gzip/OS errors: the shard is truncated or corrupt
        reason = str(exc.args[0]) if exc.args else type(exc).__name__
        raise DataError(f"shard {url} is truncated or corrupt ({type(exc).__name__}: "
                        f"{reason}); {REBUILD_HINT}") from None
    finally:
        stream.close()
    if expected_count is not None and count != expected_count:
        raise DataError(f"shard {url} holds {count} samples but the manifest says "
                        f"{expected_count}: it is truncated or was replaced; {REBUILD_HINT}")


def decode_image(sample: RawSample) -> Image.Image:
    """Decode a sample's image with the one PIL format its extension names; images past
    PIL's decompression-bomb limit are refused, not just warned about."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(sample.image_bytes), formats=[sample.image_format])
            image.load()
    except Exception as exc:
        raise DataError(f"shard {sample.shard}: sample {sample.key!r}: its "
                        f"{sample.image_format} image cannot be decoded ({exc}); "
                        f"{REBUILD_HINT}") from None
    return image
