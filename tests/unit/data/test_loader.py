"""Reading damaged shards (cldist.data.loader's TaskReader): undecodable images, pickle
members, links and foreign labels are refused by shard and key, and nothing is unpickled."""
from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest

from cldist.data import Manifest, TaskReader, make_transform, verify_dataset
from cldist.data.manifest import ShardInfo
from cldist.data.shards import sha256_file
from cldist.errors import DataError
from tests.unit.data.conftest import _members


# ------------------------------------------------------------ damaged shards
def _reseal(directory: Path, relpath: str, members: list[tuple[str, bytes]],
            links: tuple[str, ...] = ()) -> None:
    """Rewrite a shard with `members` (plus symlink members `links`) and make the manifest
    agree with it, so only the content itself can be refused."""
    path = directory / relpath
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    manifest = Manifest.load(directory)
    for task in manifest.tasks:
        for split in ("train", "test"):
            for i, shard in enumerate(task.shards(split)):
                if shard.path == relpath:
                    task.shards(split)[i] = ShardInfo(relpath, sha256_file(path), len(
                        {name.split(".")[0] for name, _ in members} | {n.split(".")[0]
                                                                        for n in links}))
    manifest.save(directory)


@pytest.fixture
def damaged(imagenet_r, tmp_path):
    directory = Path(shutil.copytree(imagenet_r, tmp_path / "ds"))
    relpath = Manifest.load(directory).tasks[0].train[0].path
    return directory, relpath, _members(directory / relpath)


def test_undecodable_jpeg_names_shard_and_key(damaged):
    directory, relpath, members = damaged
    image = next(i for i, (name, _) in enumerate(members) if not name.endswith(".cls"))
    name = members[image][0]
    members[image] = (name, b"\xff\xd8\xff\xe0" + b"not a jpeg" * 10)
    _reseal(directory, relpath, members)
    with pytest.raises(DataError, match="cannot be decoded") as info:
        TaskReader(Manifest.load(directory), 0, "train", make_transform(8, 3)).tensors()
    assert relpath in str(info.value) and repr(name.split(".")[0]) in str(info.value)
    assert any(relpath in p and "cannot be decoded" in p for p in verify_dataset(directory))


@pytest.mark.parametrize("ext", ["pth", "pkl", "pyd"])
def test_pickle_members_refused_unread(damaged, tmp_path, ext):
    """A pickle member (any of the extensions webdataset would unpickle) is refused by the
    reader and by `verify_dataset`, naming the shard and the key, and is never unpickled.
    (The same refusal through the command line: tests/system/test_hostile_inputs.py.)"""
    directory, relpath, members = damaged
    sentinel = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(sentinel),))

    key = members[0][0].split(".")[0]
    _reseal(directory, relpath, members[:2] + [(f"{key}.{ext}", pickle.dumps(Payload()))]
            + members[2:])
    with pytest.raises(DataError, match=rf"'\.{ext}'.*never unpickles") as info:
        TaskReader(Manifest.load(directory), 0, "train", make_transform(8, 3)).tensors()
    assert relpath in str(info.value) and repr(key) in str(info.value)
    assert not sentinel.exists()
    assert any(relpath in p and f".{ext}" in p for p in verify_dataset(directory))


def test_link_member_and_foreign_label_refused(damaged):
    directory, relpath, members = damaged
    _reseal(directory, relpath, members, links=("evil.jpg",))
    with pytest.raises(DataError, match="'evil.jpg', a symbolic link") as info:
        TaskReader(Manifest.load(directory), 0, "train", make_transform(8, 3)).tensors()
    assert relpath in str(info.value)
    manifest = Manifest.load(directory)
    foreign = manifest.tasks[2].classes[0]
    label = next(i for i, (name, _) in enumerate(members) if name.endswith(".cls"))
    members[label] = (members[label][0], str(foreign).encode())
    _reseal(directory, relpath, members)
    with pytest.raises(DataError, match=f"has label {foreign}, which is not one of this task"):
        TaskReader(Manifest.load(directory), 0, "train", make_transform(8, 3)).tensors()

