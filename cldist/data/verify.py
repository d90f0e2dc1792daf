"""Check a built dataset against its manifest (`cldist data verify DIR`; DIR may be a URL).

Every shard listed in the manifest is checked for presence, sha256, readable tar structure,
allowed members only (images and `cls`), labels inside its task, a decodable image in every
sample, and the sample count. All problems are collected, each naming its shard, so one run
lists everything that needs rebuilding.
"""
from __future__ import annotations

import os

from cldist.data.manifest import SPLITS, Manifest
from cldist.data.remote import REBUILD_HINT, shard_sha256
from cldist.data.shards import decode_image, iter_shard
from cldist.errors import DataError


def verify_dataset(directory: str | os.PathLike, decode_images: bool = True,
                   allowed_hosts: tuple[str, ...] | list[str] = (),
                   max_member_bytes: int | None = None) -> list[str]:
    """Problems found in the dataset at `directory` (a path, or a URL on one of
    `allowed_hosts`); empty when every shard is good.

    A manifest that cannot be loaded raises DataError (there is nothing to check against).
    `decode_images=False` skips full image decoding (faster; structure and labels only).
    `max_member_bytes` caps every tar member (None: the default cap).
    """
    manifest = Manifest.load(directory, allowed_hosts=allowed_hosts,
                             max_member_bytes=max_member_bytes)
    problems: list[str] = []
    for task in manifest.tasks:
        for split in SPLITS:
            for shard in task.shards(split):
                url = manifest.shard_url(shard)
                problems += _shard_problems(url, shard.path, shard.sha256, shard.n_samples,
                                            set(task.classes), decode_images,
                                            manifest.max_member_bytes)
    return problems


def _problem(relpath: str, exc: DataError) -> str:
    # The reader's advice to run `cldist data verify` is moot here.
    return f"{relpath}: {str(exc).removesuffix('; ' + REBUILD_HINT)}"


def _shard_problems(url: str, relpath: str, sha256: str, n_samples: int,
                    classes: set[int], decode_images: bool,
                    max_member_bytes: int | None = None) -> list[str]:
    try:
        actual = shard_sha256(url)
    except DataError as exc:
        return [_problem(relpath, exc)]
    problems = []
    if actual != sha256:
        problems.append(f"{relpath}: sha256 mismatch ({actual} on disk, {sha256} in the "
                        f"manifest)")
    # Read it regardless of the checksum, to say what exactly is wrong inside.
    try:
        for sample in iter_shard(url, classes, expected_count=n_samples,
                                 max_member_bytes=max_member_bytes):
            if decode_images:
                decode_image(sample)
    except DataError as exc:
        problems.append(_problem(relpath, exc))
    return problems
