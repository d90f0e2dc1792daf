"""Small bundled or packaged datasets: digits, Fashion-MNIST and the two combined.

- `digits`: scikit-learn's bundled `load_digits` (8x8 grayscale, 10 classes), split 80/20 per
  class with a fixed seed.
- `fashion_mnist`: the real idx files (gzipped or not), parsed with numpy.
- `fmnist_digits`: both as one 20-class grayscale source at Fashion-MNIST's 28 px.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cldist.data.sources.base import SourceData, SplitData, array_split, split_per_class
from cldist.errors import DataError

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
        train=array_split(images[train_idx], labels[train_idx]),
        test=array_split(images[test_idx], labels[test_idx]),
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
        splits[split] = array_split(images, labels)
        height, width = images.shape[1:]
    return SourceData(name="fashion_mnist", class_names=list(FASHION_MNIST_CLASSES),
                      train=splits["train"], test=splits["test"],
                      native_size=height if height == width else None, channels=1)


# ---------------------------------------------------------------- fmnist+digits
def load_fmnist_digits_source(root: str | os.PathLike | None = None) -> SourceData:
    """Fashion-MNIST's 10 classes then digits' 10, as one 20-class source.

    Names are prefixed (`fashion:Bag`, `digit:3`) so they stay distinct; digits are upscaled
    (bilinear) from 8 px to Fashion-MNIST's 28 px so every image has the same size.
    """
    fashion = load_fashion_mnist_source(root)
    digits = load_digits_source()
    size = fashion.native_size
    if size is None:
        raise DataError("fmnist_digits: the Fashion-MNIST images are not square")
    offset = fashion.n_classes

    def combine(first: SplitData, second: SplitData) -> SplitData:
        n_first = len(first)

        def load(i: int) -> Image.Image:
            if i < n_first:
                return first.load_image(i)
            return second.load_image(i - n_first).resize((size, size), Image.BILINEAR)
        return SplitData(labels=np.concatenate([first.labels, second.labels + offset]),
                         load_image=load)

    return SourceData(
        name="fmnist_digits",
        class_names=[f"fashion:{n}" for n in fashion.class_names]
        + [f"digit:{n}" for n in digits.class_names],
        train=combine(fashion.train, digits.train), test=combine(fashion.test, digits.test),
        native_size=size, channels=1)
