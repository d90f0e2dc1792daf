"""Dataset sources: where the raw images come from before they are sharded.

Each source yields a `SourceData`: class names, a train and a test split (an original class id
per sample plus a function that loads sample i as a PIL image in the stored mode and size),
the native image size and the number of channels. Images are loaded lazily so large folder
trees never sit in memory at once.

Sources:
- `digits`: scikit-learn's bundled `load_digits` (8x8 grayscale, 10 classes), split 80/20 per
  class with a fixed seed.
- `fashion_mnist`: the real idx files (gzipped or not), parsed with numpy.
- `folder`: an ImageFolder tree (`ROOT/CLASS/*.png|jpg|...`), with `ROOT/train` and
  `ROOT/test` used as the split when both exist, else split 80/20 per class.

The train/test split uses `SPLIT_SEED`, not the class-order seed, so the same images are test
images under every class order.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from cldist.errors import DataError

SPLIT_SEED = 0
TEST_FRACTION = 0.2

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Upstream names (zalandoresearch/fashion-mnist, data/fashion/); the Debian package
# dataset-fashion-mnist installs exactly these, gzipped, under FASHION_MNIST_DEFAULT_ROOT.
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

FOLDER_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".tif", ".tiff"}
_GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}

SOURCES = ("digits", "fashion_mnist", "folder")


@dataclass
class SplitData:
    """One split of a source: the original class id of each sample and how to load it."""

    labels: np.ndarray  # int64, original class id per sample
    load_image: Callable[[int], Image.Image]  # sample index -> PIL image (L or RGB)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class SourceData:
    name: str
    class_names: list[str]
    train: SplitData
    test: SplitData
    native_size: int | None  # side of square native images; None when sizes differ
    channels: int  # 1 or 3: the mode every image is stored in
    # What identifies the raw data beyond its name (e.g. a folder's path), for rebuild checks.
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def load_source(name: str, root: str | os.PathLike | None = None) -> SourceData:
    """Open source `name` (one of SOURCES); `root` is where its files are, if it has any."""
    if name == "digits":
        return load_digits_source()
    if name == "fashion_mnist":
        return load_fashion_mnist_source(root)
    if name == "folder":
        if root is None:
            raise DataError("source 'folder' needs --root DIR: a tree DIR/CLASS/*.png "
                            "(or DIR/train/CLASS/... and DIR/test/CLASS/...)")
        return load_folder_source(root)
    raise DataError(f"unknown data source {name!r}; choose one of: {', '.join(SOURCES)}")


# ---------------------------------------------------------------------- helpers
def split_per_class(labels: np.ndarray, test_fraction: float = TEST_FRACTION,
                    seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: indices (train, test), both sorted.

    Every class with at least 2 samples gets at least one test and one train sample.
    """
    train_idx, test_idx = [], []
    for class_id in np.unique(labels):
        members = np.flatnonzero(labels == class_id)
        if len(members) < 2:
            raise DataError(f"class {int(class_id)} has {len(members)} image(s); a train/test "
                            f"split needs at least 2 per class")
        rng = np.random.default_rng([seed, int(class_id)])
        shuffled = members[rng.permutation(len(members))]
        n_test = min(len(members) - 1, max(1, int(round(test_fraction * len(members)))))
        test_idx.append(shuffled[:n_test])
        train_idx.append(shuffled[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def _array_split(images: np.ndarray, labels: np.ndarray) -> SplitData:
    """A split over an in-memory uint8 array (N,H,W) or (N,H,W,3)."""
    def load(i: int) -> Image.Image:
        return Image.fromarray(images[i])
    return SplitData(labels=labels.astype(np.int64), load_image=load)


# ----------------------------------------------------------------------- digits
def load_digits_source() -> SourceData:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    # Pixel values are 0..16; stretch them to the full 0..255 grayscale range.
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = split_per_class(labels)
    return SourceData(
        name="digits", class_names=[str(i) for i in range(10)],
        train=_array_split(images[train_idx], labels[train_idx]),
        test=_array_split(images[test_idx], labels[test_idx]),
        native_size=8, channels=1)


# ---------------------------------------------------------------- fashion-mnist
_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an idx file (optionally gzipped) with numpy; only unsigned-byte data is used."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read idx file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise DataError(f"{path}: unsupported idx data type 0x{dtype_code:02x} "
                        f"(expected unsigned bytes, 0x08)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header != expected:
        raise DataError(f"{path}: idx header says shape {shape} ({expected} values) but the "
                        f"file holds {len(data) - header}; the file is truncated or corrupt")
    return np.frombuffer(data, dtype=_IDX_DTYPES[dtype_code], offset=header).reshape(shape)


def _find_fashion_file(root: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def load_fashion_mnist_source(root: str | os.PathLike | None = None) -> SourceData:
    root = Path(root if root is not None else FASHION_MNIST_DEFAULT_ROOT)
    found = {part: _find_fashion_file(root, base) for part, base in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[part] for part, path in found.items() if path is None]
    if missing:
        raise DataError(
            f"Fashion-MNIST files not found in {root} (looked for {', '.join(missing)}, "
            f"with or without .gz). Get them with `sudo apt-get install dataset-fashion-mnist` "
            f"(installs them under {FASHION_MNIST_DEFAULT_ROOT}), or download the four idx "
            f"files from the zalandoresearch/fashion-mnist repository (data/fashion/) and pass "
            f"`--root DIR`.")
    splits = {}
    for split in ("train", "test"):
        images = read_idx(found[f"{split}_images"])
        labels = read_idx(found[f"{split}_labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {split} files in {root} do not match: images "
                            f"{images.shape}, labels {labels.shape}")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"Fashion-MNIST {split} labels in {root} go up to "
                            f"{int(labels.max())}; expected 0..9")
        splits[split] = _array_split(images, labels)
        height, width = images.shape[1:]
    return SourceData(name="fashion_mnist", class_names=list(FASHION_MNIST_CLASSES),
                      train=splits["train"], test=splits["test"],
                      native_size=height if height == width else None, channels=1)


# ----------------------------------------------------------------------- folder
def _class_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in FOLDER_IMAGE_EXTENSIONS)


def _open_image(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except Exception as exc:  # PIL raises many types for bad files
        raise DataError(f"cannot decode image {path}: {exc}") from None


def load_folder_source(root: str | os.PathLike) -> SourceData:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder source: {root} is not a directory; pass --root DIR with "
                        f"DIR/CLASS/*.png (or DIR/train/CLASS and DIR/test/CLASS)")
    presplit = (root / "train").is_dir() and (root / "test").is_dir()
    class_root = root / "train" if presplit else root
    class_names = _class_dirs(class_root)
    if not class_names:
        raise DataError(f"folder source: no class directories in {class_root}")
    if presplit and _class_dirs(root / "test") != class_names:
        raise DataError(f"folder source: {root / 'test'} must hold the same class directories "
                        f"as {root / 'train'} ({', '.join(class_names)})")

    def collect(base: Path) -> tuple[list[Path], np.ndarray]:
        files, labels = [], []
        for class_id, name in enumerate(class_names):
            found = _image_files(base / name)
            if not found:
                raise DataError(f"folder source: no images in {base / name} (extensions "
                                f"{', '.join(sorted(FOLDER_IMAGE_EXTENSIONS))})")
            files += found
            labels += [class_id] * len(found)
        return files, np.asarray(labels, dtype=np.int64)

    if presplit:
        train_files, train_labels = collect(root / "train")
        test_files, test_labels = collect(root / "test")
    else:
        files, labels = collect(root)
        train_idx, test_idx = split_per_class(labels)
        train_files, train_labels = [files[i] for i in train_idx], labels[train_idx]
        test_files, test_labels = [files[i] for i in test_idx], labels[test_idx]

    # Read headers only (cheap) to find the stored mode and whether sizes agree.
    sizes, any_colour = set(), False
    for path in train_files + test_files:
        try:
            with Image.open(path) as image:
                sizes.add(image.size)
                any_colour |= image.mode not in _GRAYSCALE_MODES
        except Exception as exc:
            raise DataError(f"cannot decode image {path}: {exc}") from None
    channels = 3 if any_colour else 1
    mode = "RGB" if channels == 3 else "L"
    native = None
    if len(sizes) == 1:
        width, height = next(iter(sizes))
        native = width if width == height else None

    def split(files: list[Path], labels: np.ndarray) -> SplitData:
        def load(i: int) -> Image.Image:
            return _open_image(files[i]).convert(mode)
        return SplitData(labels=labels, load_image=load)

    return SourceData(name="folder", class_names=class_names,
                      train=split(train_files, train_labels),
                      test=split(test_files, test_labels),
                      native_size=native, channels=channels,
                      identity={"root": str(root.resolve())})
