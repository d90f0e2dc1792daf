"""Benchmark-source fixtures for the data tests: tiny trees fabricated in each source's
published layout (a few 8-12 px images per class, a handful of classes), the datasets built
from them once per package, and the checks every built dataset must pass."""
from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cldist.data import Manifest, TaskReader, build_dataset, verify_dataset
from cldist.data.shards import sha256_file

SEED = 1993
WNIDS = [f"n0144353{i}" for i in range(6)]


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


@pytest.fixture(scope="package")
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


@pytest.fixture(scope="package")
def imagenet_r(trees, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "imagenet_r"
    build_dataset("imagenet_r", out, root=trees / "imagenet-r", n_tasks=3, seed=SEED,
                  shard_max_samples=3)
    return out


@pytest.fixture(scope="package")
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

