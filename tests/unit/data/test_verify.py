"""cldist.data.verify_dataset directly: a good dataset has no problems; every damaged shard is
listed (all of them, in one pass, each naming its shard); `decode_images=False` checks
structure and labels without decoding; a missing manifest is an error, not a problem."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cldist.data import Manifest, build_dataset, verify_dataset
from cldist.data.remote import REBUILD_HINT
from cldist.data.shards import sha256_file
from cldist.errors import DataError
from tests.conftest import write_tar


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "ds"
    build_dataset("digits", out, n_tasks=2, seed=1993, max_train_per_class=6,
                  max_test_per_class=3, shard_max_samples=4)
    return out


@pytest.fixture
def copy(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "ds"))


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, "PNG")
    return buffer.getvalue()


def _reseal(directory: Path, task: int, members: list[tuple[str, bytes]]) -> str:
    """Replace task `task`'s first train shard by `members`, manifest kept consistent."""
    manifest = Manifest.load(directory)
    shard = manifest.tasks[task].train[0]
    write_tar(directory / shard.path, members)
    shard.sha256 = sha256_file(directory / shard.path)
    shard.n_samples = len({name.split(".")[0] for name, _ in members})
    manifest.save(directory)
    return shard.path


def test_a_good_dataset_has_no_problems(built):
    assert verify_dataset(built) == []
    assert verify_dataset(built, decode_images=False) == []


def test_every_damaged_shard_is_listed_by_name_in_one_pass(copy):
    manifest = Manifest.load(copy)
    flipped, gone, fine = manifest.tasks[0].train[0], manifest.tasks[1].test[0], \
        manifest.tasks[1].train[0]
    data = bytearray((copy / flipped.path).read_bytes())
    data[600] ^= 0xFF
    (copy / flipped.path).write_bytes(bytes(data))
    (copy / gone.path).unlink()
    problems = verify_dataset(copy)
    assert any(p.startswith(f"{flipped.path}: sha256 mismatch") for p in problems)
    assert [p for p in problems if p.startswith(gone.path)] and \
        "missing" in next(p for p in problems if p.startswith(gone.path))
    assert not any(p.startswith(fine.path) for p in problems)
    assert not any(REBUILD_HINT in p for p in problems)  # verify is the advice: not repeated


def test_decode_images_false_checks_structure_and_labels_only(copy):
    cls = Manifest.load(copy).tasks[0].classes[0]
    relpath = _reseal(copy, 0, [("a.png", b"not a png at all"), ("a.cls", str(cls).encode()),
                                ("b.png", _png()), ("b.cls", str(cls).encode())])
    problems = verify_dataset(copy)
    assert len(problems) == 1 and problems[0].startswith(relpath)
    assert "'a'" in problems[0]
    assert verify_dataset(copy, decode_images=False) == []
    foreign = Manifest.load(copy).tasks[1].classes[0]
    relpath = _reseal(copy, 0, [("b.png", _png()), ("b.cls", str(foreign).encode())])
    problems = verify_dataset(copy, decode_images=False)
    assert len(problems) == 1 and problems[0].startswith(relpath)
    assert f"has label {foreign}" in problems[0]


def test_a_dataset_without_a_manifest_is_an_error(tmp_path):
    with pytest.raises(DataError):
        verify_dataset(tmp_path)
