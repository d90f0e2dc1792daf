"""cldist.data on the digits shards: building, manifests, checksums and damaged shards, rank
splitting, transforms, the folder and Fashion-MNIST sources, manifest validation."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_tar
import torch
from PIL import Image

from cldist.data import (
    Manifest,
    TaskReader,
    build_dataset,
    make_transform,
    verify_dataset,
)
from cldist.data.shards import sha256_file
from cldist.data.sources import FASHION_MNIST_DEFAULT_ROOT, read_idx
from cldist.errors import DataError

SMALL_DIGITS = dict(n_tasks=5, seed=1993, max_train_per_class=12, max_test_per_class=4,
                    shard_max_samples=5)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    """A small digits dataset: 5 tasks x 2 classes, 24 train / 8 test samples per task."""
    out = tmp_path_factory.mktemp("digits") / "ds"
    build_dataset("digits", out, **SMALL_DIGITS)
    return out


@pytest.fixture
def digits_copy(digits_dir, tmp_path) -> Path:
    """A private copy of the digits dataset that a test may damage."""
    return Path(shutil.copytree(digits_dir, tmp_path / "ds"))


def _replace_first_train_shard(directory: Path, members: list[tuple[str, bytes]]) -> str:
    """Overwrite task 0's first train shard with `members`, keeping the manifest consistent
    (sha256 and count), so only the content itself can be refused. Returns its path."""
    manifest = Manifest.load(directory)
    shard = manifest.tasks[0].train[0]
    path = directory / shard.path
    write_tar(path, members)
    shard.sha256 = sha256_file(path)
    shard.n_samples = len({name.split(".")[0] for name, _ in members})
    manifest.save(directory)
    return shard.path


def _png(value: int = 128, size: int = 8, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value,) * 3).save(buffer, "PNG")
    return buffer.getvalue()


def _all_keys(manifest, task_id, split, epoch=0, **kw) -> list[str]:
    return [s.key for s in TaskReader(manifest, task_id, split, **kw).samples(epoch)]


# ------------------------------------------------------------------- round trip
def test_round_trip_counts_and_stream_labels(digits_dir):
    manifest = Manifest.load(digits_dir)
    assert manifest.n_tasks == 5 and manifest.source == "digits"
    assert manifest.image_size == 8 and manifest.channels == 1
    assert manifest.order_seed == 1993
    assert sorted(manifest.class_order) == list(range(10))
    assert manifest.class_offsets() == [0, 2, 4, 6, 8]
    transform = make_transform(8, channels=3)
    for task in manifest.tasks:
        assert task.n_train == 24 and task.n_test == 8
        assert len(task.train) == 5  # 24 samples, at most 5 per shard
        assert [manifest.stream_label(c) for c in task.classes] == \
            manifest.task_stream_labels(task.task_id)
        for split, expected in (("train", task.n_train), ("test", task.n_test)):
            images, labels = TaskReader(manifest, task.task_id, split, transform).tensors()
            assert images.shape == (expected, 3, 8, 8) and images.dtype == torch.float32
            assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
            assert labels.dtype == torch.long
            assert set(labels.tolist()) == set(manifest.task_stream_labels(task.task_id))
            # 12 train / 4 test per class
            assert torch.bincount(labels).max().item() == expected // 2
    keys = _all_keys(manifest, 2, "train")
    assert len(keys) == len(set(keys)) == 24


def test_task_batches_yields_every_sample_once(digits_dir):
    manifest = Manifest.load(digits_dir)
    transform = make_transform(16, channels=1)
    reader = TaskReader(manifest, 1, "train", transform)
    batches = list(reader.batches(7))
    assert [len(labels) for _, labels in batches] == [7, 7, 7, 3]
    assert batches[0][0].shape == (7, 1, 16, 16)
    assert reader.num_batches(7) == 4
    dropped = list(reader.batches(7, drop_last=True))
    assert len(dropped) == 3 == reader.num_batches(7, drop_last=True)


def test_shuffle_depends_on_seed_and_epoch_only(digits_dir):
    manifest = Manifest.load(digits_dir)
    natural = _all_keys(manifest, 0, "train")
    first = _all_keys(manifest, 0, "train", shuffle=True, seed=5, epoch=0, shuffle_buffer=8)
    again = _all_keys(manifest, 0, "train", shuffle=True, seed=5, epoch=0, shuffle_buffer=8)
    other = _all_keys(manifest, 0, "train", shuffle=True, seed=5, epoch=1, shuffle_buffer=8)
    assert first == again
    assert first != other and first != natural
    assert sorted(first) == sorted(other) == sorted(natural)


def test_manifest_round_trips_through_json(digits_dir, tmp_path):
    manifest = Manifest.load(digits_dir)
    copy = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())), root=manifest.root)
    assert copy == manifest
    assert manifest.shard_url(manifest.tasks[0].train[0]) == \
        os.path.join(manifest.root, "train", "task-000-000000.tar")
    with pytest.raises(DataError, match=r"scenario.allowed_hosts=\[example.org\]"):
        Manifest.load(digits_dir, root="https://example.org/ds/")  # no host allowed by default
    remote = Manifest.load(digits_dir, root="https://example.org/ds/",
                           allowed_hosts=["example.org"])
    assert remote.shard_url(remote.tasks[0].test[0]) == \
        "https://example.org/ds/test/task-000-000000.tar"
    with pytest.raises(DataError, match="not in the manifest's class order"):
        manifest.stream_label(10)


# ------------------------------------------------------------ determinism/outdir
def test_rebuild_is_byte_identical(digits_dir, tmp_path):
    rebuilt = build_dataset("digits", tmp_path / "again", **SMALL_DIGITS)
    original = Manifest.load(digits_dir)
    assert rebuilt.to_dict() == original.to_dict()
    for task in original.tasks:
        for shard in task.train + task.test:
            assert sha256_file(digits_dir / shard.path) == shard.sha256
    # Rebuilding the same spec into the same directory is allowed and changes nothing.
    same = build_dataset("digits", tmp_path / "again", **SMALL_DIGITS)
    assert same.to_dict() == original.to_dict()


def test_refuses_to_overwrite_a_different_dataset(digits_copy, tmp_path):
    with pytest.raises(DataError, match="already holds a different dataset.*seed"):
        build_dataset("digits", digits_copy, **{**SMALL_DIGITS, "seed": 7})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and holds no cldist dataset"):
        build_dataset("digits", foreign, **SMALL_DIGITS)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_natural_order_and_explicit_task_sizes(tmp_path):
    manifest = build_dataset("digits", tmp_path / "ds", order="natural",
                             classes_per_task=[4, 3], max_train_per_class=2,
                             max_test_per_class=1)
    assert manifest.order_seed is None
    assert [t.classes for t in manifest.tasks] == [[0, 1, 2, 3], [4, 5, 6]]
    assert manifest.class_offsets() == [0, 4]
    with pytest.raises(DataError, match="cannot be split into 3 equal tasks"):
        build_dataset("digits", tmp_path / "bad", n_tasks=3)


# -------------------------------------------------------------- damaged shards
def test_checksum_failure_names_the_shard(digits_copy):
    manifest = Manifest.load(digits_copy)
    shard = manifest.tasks[0].train[1]
    path = digits_copy / shard.path
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first member's PNG bytes
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="fails its checksum") as info:
        TaskReader(manifest, 0, "train", make_transform(8, 1)).tensors()
    assert shard.path in str(info.value) and "cldist data verify" in str(info.value)
    problems = verify_dataset(digits_copy)
    assert len(problems) >= 1 and all(p.startswith(shard.path) for p in problems)
    assert "sha256 mismatch" in problems[0]


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_truncated_shard_names_the_shard(digits_copy, cut):
    manifest = Manifest.load(digits_copy)
    shard = manifest.tasks[1].test[0]
    path = digits_copy / shard.path
    data = path.read_bytes()
    # Members are 512-byte headers plus data padded to 512; a sample (png + cls) ends at a
    # multiple of 512, so cutting at 2 samples' worth drops whole samples silently in tar.
    with tarfile.open(path) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    keep = offsets[4] if cut == "member_boundary" else offsets[4] - 100
    path.write_bytes(data[:keep])
    for verify in (True, False):
        with pytest.raises(DataError) as info:
            list(TaskReader(manifest, 1, "test", make_transform(8, 1),
                            verify_checksums=verify).batches(4))
        assert shard.path in str(info.value)
    assert verify_dataset(digits_copy)


def test_missing_shard_reported(digits_copy):
    manifest = Manifest.load(digits_copy)
    shard = manifest.tasks[4].train[2]
    (digits_copy / shard.path).unlink()
    with pytest.raises(DataError, match="is missing"):
        TaskReader(manifest, 4, "train", make_transform(8, 1)).tensors()
    problems = verify_dataset(digits_copy)
    assert len(problems) == 1 and problems[0].startswith(shard.path)


def test_label_outside_the_task_is_refused(digits_copy):
    manifest = Manifest.load(digits_copy)
    own, foreign = manifest.tasks[0].classes[0], manifest.tasks[3].classes[0]
    relpath = _replace_first_train_shard(digits_copy, [
        ("good.png", _png()), ("good.cls", str(own).encode()),
        ("bad.png", _png()), ("bad.cls", str(foreign).encode()),
    ])
    manifest = Manifest.load(digits_copy)
    with pytest.raises(DataError, match=f"label {foreign}") as info:
        list(TaskReader(manifest, 0, "train", make_transform(8, 1)).batches(8))
    assert relpath in str(info.value) and "'bad'" in str(info.value)


def test_non_integer_label_and_undecodable_image(digits_copy):
    manifest = Manifest.load(digits_copy)
    own = manifest.tasks[0].classes[0]
    _replace_first_train_shard(digits_copy, [("x.png", _png()), ("x.cls", b"four")])
    with pytest.raises(DataError, match="not an ASCII integer"):
        TaskReader(Manifest.load(digits_copy), 0, "train", make_transform(8, 1)).tensors()
    _replace_first_train_shard(digits_copy, [("y.png", b"not a png"),
                                             ("y.cls", str(own).encode())])
    with pytest.raises(DataError, match="cannot be decoded"):
        TaskReader(Manifest.load(digits_copy), 0, "train", make_transform(8, 1)).tensors()


# ------------------------------------------------------------------ ranks
def test_two_ranks_see_disjoint_samples_covering_the_task(digits_dir):
    manifest = Manifest.load(digits_dir)
    common = dict(shuffle=True, seed=3, epoch=2, shuffle_buffer=10)
    rank0 = _all_keys(manifest, 2, "train", rank=0, world_size=2, **common)
    rank1 = _all_keys(manifest, 2, "train", rank=1, world_size=2, **common)
    assert not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted(_all_keys(manifest, 2, "train"))
    # 3 ranks over 24 samples: batch counts agree under drop_last and nothing repeats.
    transform = make_transform(8, 1)
    counts = [len(list(TaskReader(manifest, 2, "train", transform, rank=r, world_size=3,
                                  **{k: common[k] for k in ("shuffle", "seed")}
                                  ).batches(3, drop_last=True)))
              for r in range(3)]
    assert counts == [2, 2, 2]


def test_task_stream_splits_across_dataloader_workers(digits_dir):
    manifest = Manifest.load(digits_dir)
    reader = TaskReader(manifest, 3, "test", make_transform(8, 1), rank=1, world_size=2)
    loader = torch.utils.data.DataLoader(reader.dataset(), batch_size=4, num_workers=2)
    labels = torch.cat([y for _, y in loader])
    expected = [manifest.stream_label(s.label) for s in reader.samples()]
    assert sorted(labels.tolist()) == sorted(expected) and len(expected) == 4


# ---------------------------------------------------------------- transforms
def test_transform_shapes_normalisation_and_augmentation():
    gray = Image.new("L", (8, 8), 255)
    plain = make_transform(16, channels=3)(gray)
    assert plain.shape == (3, 16, 16) and torch.allclose(plain, torch.ones_like(plain))
    normed = make_transform(16, channels=3, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])(gray)
    assert torch.allclose(normed, torch.full_like(normed, 2.0))
    torch.manual_seed(0)
    augment = make_transform(16, channels=1, train=True, augment=True)
    draws = [augment(gray) for _ in range(20)]
    assert all(d.shape == (1, 16, 16) for d in draws)
    assert any(float(d.min()) == 0.0 for d in draws)  # zero padding shows after some crops
    torch.manual_seed(0)
    assert all(torch.equal(d, augment(gray)) for d in draws)  # torch's seed reproduces it
    assert torch.equal(make_transform(16, 1, train=False, augment=True)(gray),
                       make_transform(16, 1)(gray))  # augmentation only when training
    with pytest.raises(ValueError):
        make_transform(16, channels=2)


# -------------------------------------------------------------------- folder
def _make_tree(base: Path, classes: dict[str, tuple[int, str]], size: int = 6) -> None:
    for name, (count, mode) in classes.items():
        (base / name).mkdir(parents=True)
        for i in range(count):
            value = 40 * i if mode == "L" else (40 * i, 10, 200)
            Image.new(mode, (size, size), value).save(base / name / f"img{i}.png")


def test_folder_source_with_split_by_class(tmp_path):
    _make_tree(tmp_path / "tree", {"cat": (5, "RGB"), "ant": (5, "L"), "bee": (4, "RGB"),
                                   "dog": (5, "RGB")})
    (tmp_path / "tree" / "ant" / "readme.txt").write_text("not an image")
    manifest = build_dataset("folder", tmp_path / "out", root=tmp_path / "tree", n_tasks=2,
                             order="natural")
    assert manifest.class_names == ["ant", "bee", "cat", "dog"]
    assert manifest.channels == 3 and manifest.image_size == 6
    assert [(t.n_train, t.n_test) for t in manifest.tasks] == [(7, 2), (8, 2)]
    images, labels = TaskReader(manifest, 0, "train", make_transform(6, 3)).tensors()
    assert images.shape == (7, 3, 6, 6) and sorted(set(labels.tolist())) == [0, 1]
    assert verify_dataset(tmp_path / "out") == []


def test_folder_source_with_train_test_dirs_and_mixed_sizes(tmp_path):
    _make_tree(tmp_path / "tree" / "train", {"a": (3, "L"), "b": (3, "L")})
    _make_tree(tmp_path / "tree" / "test", {"a": (1, "L"), "b": (2, "L")}, size=9)
    with pytest.raises(DataError, match="--image-size"):
        build_dataset("folder", tmp_path / "out", root=tmp_path / "tree", n_tasks=1)
    manifest = build_dataset("folder", tmp_path / "out", root=tmp_path / "tree", n_tasks=1,
                             image_size=4)
    assert manifest.channels == 1 and manifest.image_size == 4
    assert (manifest.tasks[0].n_train, manifest.tasks[0].n_test) == (6, 3)
    images, _ = TaskReader(manifest, 0, "test", make_transform(4, 1)).tensors()
    assert images.shape == (3, 1, 4, 4)


# ------------------------------------------------------------- fashion-mnist
def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def test_fashion_mnist_missing_root_says_how_to_get_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        build_dataset("fashion_mnist", tmp_path / "out", root=missing)
    message = str(info.value)
    assert str(missing) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "zalandoresearch/fashion-mnist" in message and "--root" in message
    assert not (tmp_path / "out").exists()


def test_fashion_mnist_from_fabricated_idx_files(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("t10k", 2)):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 256, size=(len(labels), 4, 4))
        # Images gzipped, labels plain: both forms must be read.
        _write_idx(root / f"{split}-images-idx3-ubyte", images, gz=True)
        _write_idx(root / f"{split}-labels-idx1-ubyte", labels, gz=False)
        if split == "t10k":
            test_images, test_labels = images, labels
    manifest = build_dataset("fashion_mnist", tmp_path / "out", root=root, n_tasks=2)
    assert manifest.class_names[0] == "T-shirt/top" and manifest.class_names[9] == "Ankle boot"
    assert manifest.image_size == 4 and manifest.channels == 1
    assert [(t.n_train, t.n_test) for t in manifest.tasks] == [(15, 10), (15, 10)]
    images, labels = TaskReader(manifest, 1, "test", make_transform(4, 1)).tensors()
    # Pixels survive the PNG round trip exactly.
    stored = {tuple(np.rint(img.numpy() * 255).astype(int).ravel()) for img in images}
    wanted = {tuple(test_images[i].ravel()) for i in range(len(test_labels))
              if test_labels[i] in manifest.tasks[1].classes}
    assert stored == wanted
    assert set(labels.tolist()) == set(range(5, 10))


def test_idx_parser_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "bad")
    (tmp_path / "notidx").write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(tmp_path / "notidx")


@pytest.mark.skipif(not Path(FASHION_MNIST_DEFAULT_ROOT).is_dir(),
                    reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_files_parse(tmp_path):
    manifest = build_dataset("fashion_mnist", tmp_path / "out", max_train_per_class=2,
                             max_test_per_class=1)
    assert manifest.image_size == 28 and manifest.n_classes == 10
    assert sum(t.n_train for t in manifest.tasks) == 20


# ------------------------------------------------------------ manifest checks
def _manifest_dict(digits_dir) -> dict:
    return json.loads((digits_dir / "manifest.json").read_text())


def _load_edited(tmp_path, data) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    Manifest.load(tmp_path)


def test_manifest_rejects_class_in_two_tasks(digits_dir, tmp_path):
    data = _manifest_dict(digits_dir)
    data["tasks"][1]["classes"][0] = data["tasks"][0]["classes"][0]
    with pytest.raises(DataError) as info:
        _load_edited(tmp_path, data)
    message = str(info.value)
    assert str(tmp_path / "manifest.json") in message
    assert "tasks[1].classes" in message and "also in task 0" in message


@pytest.mark.parametrize("bad_path", ["../x.tar", "train/../../x.tar", "/etc/passwd",
                                      "C:/x.tar", "https://evil/x.tar"])
def test_manifest_rejects_paths_escaping_the_directory(digits_dir, tmp_path, bad_path):
    data = _manifest_dict(digits_dir)
    data["tasks"][0]["test"][0]["path"] = bad_path
    with pytest.raises(DataError, match=r"tasks\[0\]\.test\[0\]\.path") as info:
        _load_edited(tmp_path, data)
    assert str(tmp_path / "manifest.json") in str(info.value)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(format_version=3), "format_version"),  # newer than this cldist
    (lambda d: d["tasks"][2].update(classes=[]), "tasks[2].classes"),
    (lambda d: d["tasks"][0]["train"][0].update(sha256="abc"), "tasks[0].train[0].sha256"),
    (lambda d: d["tasks"][0]["train"][0].update(n_samples=0), "tasks[0].train[0].n_samples"),
    (lambda d: d["tasks"][1]["test"][0].update(n_samples="7"), "tasks[1].test[0].n_samples"),
    (lambda d: d["tasks"][1].update(n_test=99), "tasks[1].n_test"),
    (lambda d: d["tasks"][3].update(task_id=1), "tasks[3].task_id"),
    (lambda d: d.update(tasks=d["tasks"][::-1]), "tasks[0].task_id"),
    (lambda d: d.update(class_order=[0] * 10), "class_order"),
    (lambda d: d.pop("image_size"), "image_size"),
])
def test_manifest_rejects_bad_fields(digits_dir, tmp_path, edit, field):
    data = _manifest_dict(digits_dir)
    edit(data)
    with pytest.raises(DataError) as info:
        _load_edited(tmp_path, data)
    assert field in str(info.value)


def test_manifest_missing_or_not_json(tmp_path):
    with pytest.raises(DataError, match="no dataset manifest"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(DataError, match="not readable JSON"):
        Manifest.load(tmp_path)
