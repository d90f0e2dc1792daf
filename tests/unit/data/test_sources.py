"""Tests for the benchmark sources of `cldist data build` (issue 5).

Every source is built from a tiny tree fabricated here in its published layout (a few 8-12 px
images per class, a handful of classes), then checked for counts, class order, checksums and
a two-rank split; plus domain-incremental manifests, parallel and resumed builds, damaged
shards, the CIFAR pickle refusal, streaming over http / fsspec with a shard cache, the
papers' image pipelines and the scenario configs.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import cldist.data.build as build_module
from cldist.cli import main
from cldist.data import (
    Manifest, TaskReader, build_dataset, make_transform, verify_dataset)
from cldist.data.manifest import ShardInfo
from cldist.data.shards import sha256_file
from cldist.errors import ConfigError, DataError

SEED = 1993
WNIDS = [f"n0144353{i}" for i in range(6)]
CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "scenario"


# ------------------------------------------------------------------ fabrication
def _image_bytes(rng: np.random.Generator, width: int, height: int, fmt: str = "JPEG",
                 mode: str = "RGB") -> bytes:
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), mode).save(buffer, fmt)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _wordnet_tree(root: Path, per_class: int, seed: int = 0) -> list[str]:
    """ROOT/nXXXXXXXX/*.jpg with varying sizes; returns the relative paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for c, wnid in enumerate(WNIDS):
        for i in range(per_class):
            rel = f"{wnid}/art_{i}.jpg"
            _write(root / rel, _image_bytes(rng, 8 + i, 9 + c % 3))
            paths.append(rel)
    (root / "README.txt").write_text("ImageNet-R: 200 classes\n")  # shipped beside the folders
    return paths


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(1)
    # ImageNet-R: 6 classes x 5 images; one "jpg" is really a GIF (stored re-encoded as PNG).
    _wordnet_tree(base / "imagenet-r", 5)
    _write(base / "imagenet-r" / WNIDS[2] / "art_4.jpg", _image_bytes(rng, 8, 8, "GIF", "L"))
    # ImageNet-A, extracted into imagenet-a/ under the root given; split by a split file.
    paths = _wordnet_tree(base / "a-root" / "imagenet-a", 3, seed=2)
    (base / "a-split.txt").write_text("# relative path, split\n" + "".join(
        f"{p} {'test' if p.endswith('_2.jpg') else 'train'}\n" for p in paths))
    # DomainNet: 3 domains x 4 classes, official list format.
    classes = ["airplane", "bee", "cat", "dog"]
    for domain in ("clipart", "real", "sketch"):
        for split, n in (("train", 3), ("test", 1)):
            lines = []
            for label, name in enumerate(classes):
                for i in range(n):
                    rel = f"{domain}/{name}/{domain}_{label:03d}_{split}{i}.jpg"
                    _write(base / "domainnet" / rel, _image_bytes(rng, 8 + i, 8))
                    lines.append(f"{rel} {label}")
            (base / "domainnet" / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    # CIFAR-100 binary: 4 fine classes named in fine_label_names.txt.
    cifar = base / "cifar-100-binary"
    cifar.mkdir()
    (cifar / "fine_label_names.txt").write_text("apple\naquarium_fish\nbaby\nbear\n")
    for split, n in (("train", 3), ("test", 2)):
        labels = np.repeat(np.arange(4), n)
        records = np.zeros((len(labels), 3074), np.uint8)
        records[:, 0] = 7  # coarse label: ignored
        records[:, 1] = labels
        records[:, 2:] = rng.integers(0, 256, (len(labels), 3072))
        (cifar / f"{split}.bin").write_bytes(records.tobytes())
    # CUB-200-2011: 4 classes x 3 images, ids 1-based, last image of each class is a test one.
    cub = base / "CUB_200_2011"
    names = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
             "004.Groove_billed_Ani"]
    images, labels, split_lines = [], [], []
    for c, name in enumerate(names):
        for i in range(3):
            image_id = len(images) + 1
            rel = f"{name}/{name.split('.')[1]}_{i:04d}.jpg"
            _write(cub / "images" / rel, _image_bytes(rng, 9, 8 + i))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split_lines.append(f"{image_id} {0 if i == 2 else 1}")
    (cub / "images.txt").write_text("\n".join(images) + "\n")
    (cub / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (cub / "train_test_split.txt").write_text("\n".join(split_lines) + "\n")
    (cub / "classes.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    # Fashion-MNIST idx files (28 px, 3 train / 2 test per class).
    fashion = base / "fashion"
    fashion.mkdir()
    for prefix, n in (("train", 3), ("t10k", 2)):
        labels_ = np.repeat(np.arange(10), n)
        for kind, array in (("images-idx3", rng.integers(0, 256, (len(labels_), 28, 28))),
                            ("labels-idx1", labels_)):
            header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            with gzip.open(fashion / f"{prefix}-{kind}-ubyte.gz", "wb") as fh:
                fh.write(header + array.astype(np.uint8).tobytes())
    return base


@pytest.fixture(scope="module")
def imagenet_r(trees, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "imagenet_r"
    build_dataset("imagenet_r", out, root=trees / "imagenet-r", n_tasks=3, seed=SEED,
                  shard_max_samples=3)
    return out


@pytest.fixture(scope="module")
def domain_il(trees, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "domainnet_domains"
    build_dataset("domainnet", out, root=trees / "domainnet", scenario="domain",
                  domains=["real", "clipart", "sketch"], shard_max_samples=5)
    return out


# -------------------------------------------------------------------- checks
def _keys(manifest, task_id, split, epoch=0, **kw) -> list[str]:
    return [s.key for s in TaskReader(manifest, task_id, split, **kw).samples(epoch)]


def _check_dataset(out, n_classes: int, n_tasks: int, seeded: bool = True) -> Manifest:
    """Checksums, class order, and that two ranks split every task without overlap or loss."""
    manifest = Manifest.load(out)
    assert manifest.n_classes == n_classes and manifest.n_tasks == n_tasks
    if seeded:
        assert manifest.order_seed == SEED
        assert manifest.class_order == [int(c) for c in
                                        np.random.default_rng(SEED).permutation(n_classes)]
    assert verify_dataset(out) == []
    for task in manifest.tasks:
        for shard in task.train + task.test:
            assert sha256_file(Path(out) / shard.path) == shard.sha256
        for split, expected in (("train", task.n_train), ("test", task.n_test)):
            common = dict(shuffle=True, seed=3, epoch=1, shuffle_buffer=4)
            rank0 = _keys(manifest, task.task_id, split, rank=0, world_size=2, **common)
            rank1 = _keys(manifest, task.task_id, split, rank=1, world_size=2, **common)
            assert not set(rank0) & set(rank1)
            assert sorted(rank0 + rank1) == sorted(_keys(manifest, task.task_id, split))
            assert len(rank0) + len(rank1) == expected and abs(len(rank0) - len(rank1)) <= 1
    return manifest


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _counts(manifest) -> list[tuple[int, int]]:
    return [(t.n_train, t.n_test) for t in manifest.tasks]


# ------------------------------------------------------------------- sources
def test_imagenet_r_seeded_split_and_original_files(imagenet_r, trees):
    manifest = _check_dataset(imagenet_r, n_classes=6, n_tasks=3)
    assert manifest.source == "imagenet_r" and manifest.class_names == WNIDS
    assert manifest.image_size is None and manifest.channels == 3
    assert manifest.format_version == 2  # image_size null needs format 2
    assert _counts(manifest) == [(8, 2)] * 3  # 5 images per class: 4 train, 1 test
    originals = {hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in (trees / "imagenet-r").rglob("*.jpg")}
    kinds = {}
    for shard in (imagenet_r / "train").glob("*.tar"):
        for name, data in _members(shard):
            ext = name.split(".", 1)[1]
            kinds[ext] = kinds.get(ext, 0) + 1
            if ext == "jpg":  # stored byte for byte
                assert hashlib.sha256(data).hexdigest() in originals
    for shard in (imagenet_r / "test").glob("*.tar"):
        for name, _ in _members(shard):
            ext = name.split(".", 1)[1]
            kinds[ext] = kinds.get(ext, 0) + 1
    # 30 samples; the GIF in disguise was re-encoded as PNG.
    assert kinds == {"jpg": 29, "png": 1, "cls": 30}
    # Images of different sizes, streamed through the papers' test pipeline.
    images, labels = TaskReader(manifest, 1, "test", make_transform(16, 3, resize=18)).tensors()
    assert images.shape == (2, 3, 16, 16)
    assert sorted(labels.tolist()) == manifest.task_stream_labels(1)


def test_imagenet_r_split_lists_beside_the_classes(trees, tmp_path):
    root = tmp_path / "imagenet-r"
    paths = _wordnet_tree(root, 4, seed=3)
    (root / "train.txt").write_text("".join(f"{p}\n" for p in paths if not p.endswith("_3.jpg")
                                            and not p.endswith("_0.jpg")))
    (root / "test.txt").write_text("".join(f"{p} 0\n" for p in paths if p.endswith("_3.jpg")))
    manifest = build_dataset("imagenet_r", tmp_path / "out", root=root, n_tasks=2)
    assert _counts(manifest) == [(6, 3), (6, 3)]  # art_0 is in neither list: left out
    assert manifest.build["split_file"] == str(root.resolve())


def test_imagenet_a_split_file_explicit_order_and_task_sizes(trees, tmp_path):
    order = list(reversed(WNIDS))  # class names work as well as ids
    manifest = build_dataset("imagenet_a", tmp_path / "out", root=trees / "a-root",
                             split_file=trees / "a-split.txt", class_order=order,
                             classes_per_task=[2, 4], seed=SEED)
    assert manifest.class_order == [5, 4, 3, 2, 1, 0] and manifest.order_seed is None
    assert manifest.build["order"] == "explicit"
    assert [t.classes for t in manifest.tasks] == [[5, 4], [3, 2, 1, 0]]
    assert manifest.class_offsets() == [0, 2]
    assert _counts(manifest) == [(4, 2), (8, 4)]
    _check_dataset(tmp_path / "out", n_classes=6, n_tasks=2, seeded=False)
    with pytest.raises(DataError, match=r"missing: \[0\]"):
        build_dataset("imagenet_a", tmp_path / "bad", root=trees / "a-root",
                      split_file=trees / "a-split.txt", class_order=[5, 4, 3, 2, 1])


def test_domainnet_class_incremental_pools_domains(trees, tmp_path):
    manifest = build_dataset("domainnet", tmp_path / "out", root=trees / "domainnet",
                             n_tasks=2, seed=SEED)
    _check_dataset(tmp_path / "out", n_classes=4, n_tasks=2)
    assert manifest.class_names == ["airplane", "bee", "cat", "dog"]
    assert manifest.scenario == "class" and manifest.build["domains"] == [
        "clipart", "real", "sketch"]
    assert _counts(manifest) == [(18, 6), (18, 6)]  # 2 classes x 3 domains x (3 train, 1 test)


def test_domainnet_domain_incremental_manifest(domain_il):
    manifest = _check_dataset(domain_il, n_classes=4, n_tasks=3)
    assert manifest.domain_incremental and manifest.format_version == 2
    assert [t.domain for t in manifest.tasks] == ["real", "clipart", "sketch"]
    assert all(t.classes == manifest.class_order for t in manifest.tasks)
    assert manifest.class_offsets() == [0, 0, 0]  # one shared label space
    assert all(manifest.task_stream_labels(t) == [0, 1, 2, 3] for t in range(3))
    assert _counts(manifest) == [(12, 4)] * 3
    _, labels = TaskReader(manifest, 2, "train", make_transform(8, 3)).tensors()
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # Every sample of a task comes from that task's domain (keys index the pooled split).
    data = build_module.load_source("domainnet", Path(manifest.build["root"]),
                                    domains=manifest.build["domains"])
    for task in manifest.tasks:
        domain = data.domain_names.index(task.domain)
        for key in _keys(manifest, task.task_id, "test"):
            assert data.test.domains[int(key.split("-")[1])] == domain


def test_domainnet_rejects_bad_lists(trees, tmp_path):
    root = Path(shutil.copytree(trees / "domainnet", tmp_path / "dn"))
    with open(root / "real_test.txt", "a") as fh:
        fh.write("real/cat/real_missing.jpg 2\n")
    with pytest.raises(DataError, match="real_missing.jpg.*does not exist"):
        build_dataset("domainnet", tmp_path / "out", root=root, n_tasks=2)
    with pytest.raises(DataError, match="--domains"):
        build_dataset("domainnet", tmp_path / "out2", root=trees / "domainnet",
                      domains=["quickdraw"])
    with pytest.raises(DataError, match="has no domains"):
        build_dataset("digits", tmp_path / "out3", scenario="domain")


def test_cifar100_binary_records_round_trip(trees, tmp_path):
    manifest = build_dataset("cifar100", tmp_path / "out", root=trees, n_tasks=2,
                             order="natural")
    _check_dataset(tmp_path / "out", n_classes=4, n_tasks=2, seeded=False)
    assert manifest.class_names == ["apple", "aquarium_fish", "baby", "bear"]
    assert manifest.image_size == 32 and manifest.channels == 3
    assert _counts(manifest) == [(6, 4), (6, 4)]
    records = np.frombuffer((trees / "cifar-100-binary" / "test.bin").read_bytes(),
                            np.uint8).reshape(-1, 3074)
    wanted = {records[i, 2:].tobytes() for i in range(len(records)) if records[i, 1] in (0, 1)}
    images, _ = TaskReader(manifest, 0, "test", make_transform(32, 3)).tensors()
    stored = {np.rint(img.numpy() * 255).astype(np.uint8).tobytes() for img in images}
    assert stored == wanted  # planes R, G, B survive exactly


def test_cifar100_pickle_distribution_is_refused_unopened(tmp_path):
    sentinel = tmp_path / "unpickled"

    class Payload:  # unpickling this would create `sentinel`
        def __reduce__(self):
            return (os.mkdir, (str(sentinel),))

    python = tmp_path / "cifar-100-python"
    python.mkdir()
    for name in ("train", "test", "meta"):
        (python / name).write_bytes(pickle.dumps(Payload()))
    for root in (tmp_path, python):
        with pytest.raises(DataError) as info:
            build_dataset("cifar100", tmp_path / "out", root=root, n_tasks=2)
        message = str(info.value)
        assert "never unpickles" in message and "cifar-100-binary.tar.gz" in message
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_cifar100_truncated_binary(trees, tmp_path):
    root = Path(shutil.copytree(trees / "cifar-100-binary", tmp_path / "cifar-100-binary"))
    (root / "test.bin").write_bytes((root / "test.bin").read_bytes()[:-10])
    with pytest.raises(DataError, match=r"test\.bin.*whole number of 3074-byte records"):
        build_dataset("cifar100", tmp_path / "out", root=root, n_tasks=2)


def test_cub200_official_split(trees, tmp_path):
    manifest = build_dataset("cub200", tmp_path / "out", root=trees, n_tasks=2, seed=SEED)
    _check_dataset(tmp_path / "out", n_classes=4, n_tasks=2)
    assert manifest.class_names[0] == "Black_footed_Albatross"
    assert _counts(manifest) == [(4, 2), (4, 2)]
    assert manifest.image_size is None


def test_folder_with_split_file_and_original_files(trees, tmp_path):
    root = trees / "a-root" / "imagenet-a"
    manifest = build_dataset("folder", tmp_path / "out", root=root, n_tasks=3,
                             split_file=trees / "a-split.txt", image_size="original")
    _check_dataset(tmp_path / "out", n_classes=6, n_tasks=3)
    assert _counts(manifest) == [(4, 2)] * 3 and manifest.image_size is None
    with pytest.raises(DataError, match="--image-size"):  # mixed sizes need a choice
        build_dataset("folder", tmp_path / "out2", root=root, n_tasks=3)


def test_fmnist_digits_twenty_classes(trees, tmp_path):
    manifest = build_dataset("fmnist_digits", tmp_path / "out", root=trees / "fashion",
                             n_tasks=10, seed=SEED, max_train_per_class=2, max_test_per_class=1)
    _check_dataset(tmp_path / "out", n_classes=20, n_tasks=10)
    assert manifest.class_names[0] == "fashion:T-shirt/top"
    assert manifest.class_names[10:] == [f"digit:{i}" for i in range(10)]
    assert manifest.image_size == 28 and manifest.channels == 1
    assert _counts(manifest) == [(4, 2)] * 10
    images, _ = TaskReader(manifest, 0, "train", make_transform(28, 1)).tensors()
    assert images.shape == (4, 1, 28, 28)


def test_unknown_source_option_and_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not take --split-file"):
        build_dataset("cifar100", tmp_path / "o", root=tmp_path, split_file=tmp_path / "x")
    with pytest.raises(DataError, match="needs --root.*imagenet-r.*docs/DATA.md"):
        build_dataset("imagenet_r", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no WordNet-id class folders"):
        build_dataset("imagenet_r", tmp_path / "o", root=tmp_path / "empty")


# --------------------------------------------------- parallel, resumable builds
def test_parallel_build_is_identical(imagenet_r, trees, tmp_path):
    parallel = build_dataset("imagenet_r", tmp_path / "par", root=trees / "imagenet-r",
                             n_tasks=3, seed=SEED, shard_max_samples=3, workers=2)
    assert parallel.to_dict() == Manifest.load(imagenet_r).to_dict()
    digits = dict(n_tasks=5, max_train_per_class=6, max_test_per_class=2, shard_max_samples=4)
    one = build_dataset("digits", tmp_path / "d1", **digits)
    two = build_dataset("digits", tmp_path / "d2", workers=2, **digits)
    assert one.to_dict() == two.to_dict()


def test_interrupted_build_resumes_keeping_verified_shards(tmp_path, monkeypatch):
    spec = dict(n_tasks=2, max_train_per_class=6, max_test_per_class=3, shard_max_samples=4)
    reference = build_dataset("digits", tmp_path / "ref", **spec)

    class Interrupt(Exception):
        pass

    def stop_after_three(done, total, samples, total_samples):
        if done == 3:
            raise Interrupt
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        build_dataset("digits", out, progress=stop_after_three, **spec)
    assert not (out / "manifest.json").exists() and (out / build_module.BUILD_JOURNAL).exists()
    written = [reference.tasks[0].train[i].path for i in range(3)]
    damaged = out / written[1]
    damaged.write_bytes(damaged.read_bytes()[:-600])  # a shard that no longer verifies

    rewritten = []
    original = build_module._write_job

    def counting(data, storage, out_dir, job):
        rewritten.append(job.relpath)
        return original(data, storage, out_dir, job)
    monkeypatch.setattr(build_module, "_write_job", counting)
    resumed = build_dataset("digits", out, **spec)
    assert resumed.to_dict() == reference.to_dict()
    assert written[0] not in rewritten and written[2] not in rewritten
    assert written[1] in rewritten
    n_shards = sum(len(t.train) + len(t.test) for t in reference.tasks)
    assert len(rewritten) == n_shards - 2
    assert not (out / build_module.BUILD_JOURNAL).exists()
    # A finished dataset rebuilt with the same spec keeps every shard.
    rewritten.clear()
    build_dataset("digits", out, **spec)
    assert rewritten == []


def test_progress_lines_for_a_file(tmp_path):
    log = io.StringIO()
    build_dataset("digits", tmp_path / "out", n_tasks=2, max_train_per_class=4,
                  max_test_per_class=2, shard_max_samples=2,
                  progress=build_module.LineProgress(log, every_s=3600))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 2 <= len(lines) <= 11  # about one per 10%
    # 2 tasks x 5 classes x (4 train + 2 test), 2 samples per shard
    assert lines[-1].startswith("[data] 30/30 shards  60/60 samples (100%)")


def test_cli_build_with_class_order_file_and_workers(trees, tmp_path, capsys):
    order = tmp_path / "order.txt"
    order.write_text("# WordNet ids, first task first\n" + "\n".join(WNIDS[::-1]) + "\n")
    out = tmp_path / "out"
    assert main(["data", "build", "--source", "imagenet_a", "--root", str(trees / "a-root"),
                 "--split-file", str(trees / "a-split.txt"), "--out", str(out),
                 "--class-order", str(order), "--classes-per-task", "3,3",
                 "--workers", "2", "--shard-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "wrote 2 tasks, 12 train / 6 test samples" in captured.out
    assert "[data] 10/10 shards" in captured.err  # per task: 6 train in 3, 3 test in 2
    assert Manifest.load(out).class_order == [5, 4, 3, 2, 1, 0]
    assert main(["data", "verify", str(out), "--no-decode"]) == 0
    code = main(["data", "build", "--source", "domainnet", "--root", str(trees / "domainnet"),
                 "--out", str(tmp_path / "dn"), "--scenario", "domain", "--tasks", "3"])
    assert code == 2 and "one task per domain" in capsys.readouterr().err


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


# ------------------------------------------------------------------ streaming
LOOPBACK = ["127.0.0.1"]  # scenario.allowed_hosts for the test server


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def serve(tmp_path):
    """serve(directory) -> base URL of an http server on 127.0.0.1 for that directory."""
    servers = []

    def start(directory: Path) -> str:
        handler = functools.partial(_Handler, directory=str(directory))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_http_streaming_matches_local_across_ranks(imagenet_r, serve, tmp_path):
    local = Manifest.load(imagenet_r)
    url = serve(imagenet_r)
    remote = Manifest.load(url, allowed_hosts=LOOPBACK)  # the manifest itself comes over http
    assert remote.to_dict() == local.to_dict()
    assert remote.shard_url(remote.tasks[0].train[0]).startswith(url + "/train/")
    for task in range(remote.n_tasks):
        for split in ("train", "test"):
            kw = dict(shuffle=True, seed=11, epoch=0, shuffle_buffer=3)
            rank0 = _keys(remote, task, split, rank=0, world_size=2, **kw)
            rank1 = _keys(remote, task, split, rank=1, world_size=2, **kw)
            assert rank0 == _keys(local, task, split, rank=0, world_size=2, **kw)
            assert not set(rank0) & set(rank1)
            assert sorted(rank0 + rank1) == sorted(_keys(local, task, split))
    assert verify_dataset(url, allowed_hosts=LOOPBACK) == []
    # With a cache directory every shard is fetched once, then read locally.
    cache = tmp_path / "cache"
    _Handler.requests.clear()
    first, _ = TaskReader(remote, 1, "train", make_transform(8, 3), cache_dir=cache).tensors()
    fetched = len(_Handler.requests)
    assert fetched == len(remote.tasks[1].train)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f"{s.sha256}.tar" for s in remote.tasks[1].train)
    second, _ = TaskReader(remote, 1, "train", make_transform(8, 3), cache_dir=cache).tensors()
    assert len(_Handler.requests) == fetched and torch.equal(first, second)


def test_http_bad_and_missing_shards_named(imagenet_r, serve, tmp_path):
    directory = Path(shutil.copytree(imagenet_r, tmp_path / "ds"))
    manifest = Manifest.load(directory)
    bad, gone = manifest.tasks[0].train[0], manifest.tasks[1].test[0]
    raw = bytearray((directory / bad.path).read_bytes())
    raw[600] ^= 0xFF
    (directory / bad.path).write_bytes(bytes(raw))
    (directory / gone.path).unlink()
    url = serve(directory)
    remote = Manifest.load(url, allowed_hosts=LOOPBACK)
    for cache in (None, tmp_path / "cache"):
        with pytest.raises(DataError, match="fails its checksum") as info:
            TaskReader(remote, 0, "train", make_transform(8, 3), cache_dir=cache).tensors()
        assert f"{url}/{bad.path}" in str(info.value)
    assert not list((tmp_path / "cache").glob("*.tar"))  # a bad shard is never cached
    with pytest.raises(DataError, match="is missing") as info:
        TaskReader(remote, 1, "test", make_transform(8, 3)).tensors()
    assert gone.path in str(info.value)
    problems = verify_dataset(url, allowed_hosts=LOOPBACK)
    assert any(p.startswith(bad.path) and "sha256 mismatch" in p for p in problems)
    assert any(p.startswith(gone.path) and "missing" in p for p in problems)


def test_shard_cache_env_is_filled_by_the_preflight_check(imagenet_r, serve, tmp_path,
                                                          monkeypatch):
    from cldist.data.remote import verify_shard_checksum
    from cldist.data.remote import SHARD_CACHE_ENV

    cache = tmp_path / "env-cache"
    monkeypatch.setenv(SHARD_CACHE_ENV, str(cache))
    remote = Manifest.load(serve(imagenet_r), allowed_hosts=LOOPBACK)
    for shard in remote.tasks[2].test:  # what `cldist run`'s pre-flight does
        verify_shard_checksum(remote.shard_url(shard), shard.sha256)
        assert (cache / f"{shard.sha256}.tar").is_file()
    _Handler.requests.clear()
    assert len(_keys(remote, 2, "test")) == remote.tasks[2].n_test
    assert _Handler.requests == []  # read from the cache


def test_fsspec_memory_urls(domain_il):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    manifest = Manifest.load(domain_il)
    for task in manifest.tasks:
        for shard in task.train + task.test:
            fs.pipe(f"/cldist-test/{shard.path}", (domain_il / shard.path).read_bytes())
    remote = Manifest.load(domain_il, root="memory://cldist-test",
                           allowed_hosts=["memory://cldist-test"])
    for task in range(remote.n_tasks):
        assert _keys(remote, task, "train", rank=1, world_size=2) == \
            _keys(manifest, task, "train", rank=1, world_size=2)
    fs.rm("/cldist-test", recursive=True)


# ---------------------------------------------------------------- manifests
def _domain_dict(domain_il) -> dict:
    return json.loads((domain_il / "manifest.json").read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format_version=1), "needs format_version 2"),
    (lambda d: d["tasks"][1].pop("domain"), "tasks[1].domain"),
    (lambda d: d["tasks"][2].update(domain="real"), "also task 0's domain"),
    (lambda d: d["tasks"][0]["classes"].pop(), "must hold every class"),
    (lambda d: d.update(scenario="task"), "scenario: must be one of"),
])
def test_domain_manifest_validation(domain_il, tmp_path, edit, message):
    data = _domain_dict(domain_il)
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        Manifest.load(tmp_path)
    assert message in str(info.value)


def test_class_manifests_stay_format_1(tmp_path):
    manifest = build_dataset("digits", tmp_path / "d", n_tasks=2, max_train_per_class=2,
                             max_test_per_class=1)
    data = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert data["format_version"] == 1 and "scenario" not in data
    assert all("domain" not in t for t in data["tasks"])
    data["tasks"][0]["domain"] = "real"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="only domain-incremental tasks have a domain"):
        Manifest.load(tmp_path)
    assert manifest.class_offsets() == [0, 5]


# ---------------------------------------------------------------- transforms
def test_random_resized_crop_and_flip():
    image = Image.fromarray(np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3) % 251)
    transform = make_transform(16, 3, train=True, augment=True, crop="random_resized")
    torch.manual_seed(0)
    draws = [transform(image) for _ in range(8)]
    assert all(d.shape == (3, 16, 16) for d in draws)
    assert len({d.sum().item() for d in draws}) > 1  # the crop (and flip) vary
    torch.manual_seed(0)
    assert all(torch.equal(d, transform(image)) for d in draws)
    # No zero padding ever shows (unlike the CIFAR-style crop).
    white = Image.new("RGB", (40, 30), (255, 255, 255))
    assert all(bool((transform(white) == 1).all()) for _ in range(5))
    flip_only = make_transform(16, 3, train=True, augment=True, crop="none")
    assert bool((flip_only(white) == 1).all())


def test_resize_then_centre_crop():
    array = np.zeros((20, 40), np.uint8)
    array[:, 20:] = 255  # left half black, right half white
    out = make_transform(16, 1, resize=20)(Image.fromarray(array))
    assert out.shape == (1, 16, 16)
    # Shorter side already 20: the central 16 columns are 8 black then 8 white.
    assert torch.equal(out[0, 0], torch.tensor([0.0] * 8 + [1.0] * 8))
    assert make_transform(16, 1, resize=32)(Image.fromarray(array)).shape == (1, 16, 16)
    with pytest.raises(ValueError, match="at least image_size"):
        make_transform(16, 1, resize=12)
    with pytest.raises(ValueError, match="crop must be one of"):
        make_transform(16, 1, crop="centre")


def test_default_transform_unchanged_by_new_options():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(
        np.uint8))
    torch.manual_seed(5)
    old = make_transform(16, 3, mean=[0.5], std=[0.25], train=True, augment=True)(image)
    torch.manual_seed(5)
    new = make_transform(16, 3, mean=[0.5], std=[0.25], train=True, augment=True,
                         crop="random", resize=None)(image)
    assert torch.equal(old, new)


def test_scenario_keys_reach_the_transforms(imagenet_r):
    from cldist.config.schema import RunConfig
    from cldist.train.task import transforms

    cfg = RunConfig()
    cfg.scenario.image_size, cfg.scenario.normalize = 224, "none"
    cfg.scenario.train_crop, cfg.scenario.test_resize = "random_resized", 256
    train, test = transforms(cfg, Manifest.load(imagenet_r))
    assert (train.augment, train.crop, train.mean) == (True, "random_resized", None)
    assert (test.augment, test.resize, test.image_size) == (False, 256, 224)
    cfg.scenario.train_crop = "zoom"
    with pytest.raises(ConfigError, match="scenario.train_crop=zoom"):
        transforms(cfg, Manifest.load(imagenet_r))


# ------------------------------------------------------------ scenario configs
PAPER_SCENARIOS = {
    "imagenet_r_5t": ("imagenet_r", 5), "imagenet_r_10t": ("imagenet_r", 10),
    "imagenet_r_20t": ("imagenet_r", 20), "imagenet_a_10t": ("imagenet_a", 10),
    "domainnet_5t": ("domainnet", 5), "domainnet_domains": ("domainnet", 6),
    "cifar100_10t": ("cifar100", 10), "cub200_10t": ("cub200", 10),
}
PUBLISHED_CLASSES = {"imagenet_r": 200, "imagenet_a": 200, "domainnet": 345, "cifar100": 100,
                     "cub200": 200}


def test_paper_scenario_configs():
    from dataclasses import fields

    from cldist.config.schema import ScenarioConfig
    from cldist.data.sources import SOURCES

    keys = {f.name for f in fields(ScenarioConfig)}
    for name, (source, n_tasks) in PAPER_SCENARIOS.items():
        config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert set(config) <= keys, name
        assert config["name"] == name and config["source"] == source in SOURCES
        assert config["n_tasks"] == n_tasks and config["class_order_seed"] == SEED
        assert (config["image_size"], config["train_crop"], config["test_resize"]) == \
            (224, "random_resized", 256)
        assert config["normalize"] in ("none", "backbone")
        if name != "domainnet_domains":
            assert PUBLISHED_CLASSES[source] % n_tasks == 0
    assert yaml.safe_load((CONFIGS / "domainnet_domains.yaml").read_text())["manifest"]
    fmnist = yaml.safe_load((CONFIGS / "fmnist_5t.yaml").read_text())
    combined = yaml.safe_load((CONFIGS / "fmnist_digits_10t.yaml").read_text())
    assert combined["source"] == "fmnist_digits" and combined["n_tasks"] == 10
    for key in ("max_test_per_class", "image_size", "augment", "normalize", "class_order_seed"):
        assert combined[key] == fmnist[key]
    # 150 train images per class: about what the digits have, so the 20 classes stay balanced
    assert combined["max_train_per_class"] == 150


def test_paper_scenario_composes():
    from cldist.config.compose import compose

    cfg = compose(["scenario=imagenet_r_10t", "scenario.normalize=backbone"])
    assert (cfg.scenario.train_crop, cfg.scenario.test_resize) == ("random_resized", 256)
    assert cfg.scenario.data_dir.endswith("imagenet_r_10t")
