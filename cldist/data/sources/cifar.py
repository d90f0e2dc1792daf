"""CIFAR-100 from its binary distribution (`cifar-100-binary/`).

`train.bin` and `test.bin` are sequences of 3074-byte records: 1 coarse-label byte, 1
fine-label byte, then 32x32 pixels as three 1024-byte planes (R, G, B), rows first.
`fine_label_names.txt` lists the 100 fine class names in label order. The python distribution
(`cifar-100-python/`) is a set of pickles and is refused: cldist never unpickles.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from cldist.data.sources.base import DATA_DOC, SourceData, SplitData, find_dir, read_lines
from cldist.errors import DataError

CIFAR100_BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
CIFAR_SIDE = 32
_RECORD_BYTES = 2 + 3 * CIFAR_SIDE * CIFAR_SIDE
_PICKLE_FILES = ("meta", "train", "test")


def _refuse_pickles(root: Path) -> None:
    """Name the python (pickle) distribution when that is what `root` holds."""
    for candidate in (root, root / "cifar-100-python"):
        if candidate.is_dir() and all((candidate / f).is_file() for f in _PICKLE_FILES):
            raise DataError(
                f"cifar100: {candidate} is CIFAR-100's python distribution, a set of pickles, "
                f"which cldist never unpickles (loading a pickle can run arbitrary code). "
                f"Download the binary version instead ({CIFAR100_BINARY_URL}), extract it and "
                f"pass --root .../cifar-100-binary (see {DATA_DOC})")


def _read_records(path: Path) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cifar100: cannot read {path}: {exc}") from None
    if data.size == 0 or data.size % _RECORD_BYTES:
        raise DataError(f"cifar100: {path} holds {data.size} bytes, not a whole number of "
                        f"{_RECORD_BYTES}-byte records; the file is truncated or not CIFAR-100 "
                        f"binary - download it again ({CIFAR100_BINARY_URL})")
    return data.reshape(-1, _RECORD_BYTES)


def load_cifar100_source(root: str | os.PathLike) -> SourceData:
    root = Path(root)
    base = find_dir(root, "train.bin", ["cifar-100-binary"])
    if not (base / "train.bin").is_file():
        _refuse_pickles(root)
        raise DataError(f"cifar100: no train.bin in {root} (or {root / 'cifar-100-binary'}); "
                        f"download the binary version ({CIFAR100_BINARY_URL}), extract it and "
                        f"pass --root .../cifar-100-binary (see {DATA_DOC})")
    missing = [f for f in ("test.bin", "fine_label_names.txt") if not (base / f).is_file()]
    if missing:
        raise DataError(f"cifar100: {base} lacks {', '.join(missing)}; extract the whole "
                        f"binary archive ({CIFAR100_BINARY_URL})")
    names = [" ".join(fields) for _, fields in read_lines(base / "fine_label_names.txt",
                                                          "class-name list")]
    splits = {}
    for split in ("train", "test"):
        records = _read_records(base / f"{split}.bin")
        labels = records[:, 1].astype(np.int64)
        if int(labels.max()) >= len(names):
            raise DataError(f"cifar100: {base / f'{split}.bin'} has fine label "
                            f"{int(labels.max())} but fine_label_names.txt names only "
                            f"{len(names)} classes")
        # Planes (3, 32, 32) -> HWC; a view, made contiguous per image when it is loaded.
        pixels = records[:, 2:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)

        def load(i: int, pixels: np.ndarray = pixels) -> Image.Image:
            return Image.fromarray(np.ascontiguousarray(pixels[i]))
        splits[split] = SplitData(labels=labels, load_image=load)
    return SourceData(name="cifar100", class_names=names, train=splits["train"],
                      test=splits["test"], native_size=CIFAR_SIDE, channels=3,
                      identity={"root": str(base.resolve())})
