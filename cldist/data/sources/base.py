"""What every source produces, and the helpers sources share.

A source yields a `SourceData`: class names, a train and a test split (an original class id per
sample plus a function that loads sample i as a PIL image in the stored mode), the native image
size and the number of channels. Images are loaded lazily so large trees never sit in memory at
once. Sources whose samples are image files also expose the files' bytes (`SplitData.load_file`)
so a build can store them unchanged instead of re-encoding them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from cldist.errors import DataError

# The train/test split of sources without an official one uses SPLIT_SEED, not the class-order
# seed, so the same images are test images under every class order.
SPLIT_SEED = 0
TEST_FRACTION = 0.2

FOLDER_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".tif", ".tiff"}
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
DATA_DOC = "docs/DATA.md"


@dataclass
class SplitData:
    """One split of a source: the original class id of each sample and how to load it."""

    labels: np.ndarray  # int64, original class id per sample
    load_image: Callable[[int], Image.Image]  # sample index -> PIL image (L or RGB)
    # sample index -> the image file's bytes, for sources whose samples are files
    load_file: Callable[[int], bytes] | None = None
    # int64 domain id per sample (index into SourceData.domain_names), for domain-IL sources
    domains: np.ndarray | None = None
    name_of: Callable[[int], str] | None = None  # sample index -> its file, for messages

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
    # True: without --image-size the build stores every file's own bytes (photos of varying
    # size, where re-encoding would lose quality and a fixed square size would distort them).
    store_originals: bool = False
    domain_names: list[str] | None = None  # the domains `SplitData.domains` indexes

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


# ---------------------------------------------------------------------- splits
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


def array_split(images: np.ndarray, labels: np.ndarray) -> SplitData:
    """A split over an in-memory uint8 array (N,H,W) or (N,H,W,3)."""
    def load(i: int) -> Image.Image:
        return Image.fromarray(images[i])
    return SplitData(labels=labels.astype(np.int64), load_image=load)


# ----------------------------------------------------------------------- files
def class_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in FOLDER_IMAGE_EXTENSIONS)


def open_image(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except Exception as exc:  # PIL raises many types for bad files
        raise DataError(f"cannot decode image {path}: {exc}") from None


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image file {path}: {exc}") from None


def file_split(files: list[Path], labels: Iterable[int], mode: str,
               domains: Iterable[int] | None = None) -> SplitData:
    """A split over image files: `load_image` decodes and converts to `mode`, `load_file`
    returns the bytes as stored."""
    def load(i: int) -> Image.Image:
        return open_image(files[i]).convert(mode)

    def raw(i: int) -> bytes:
        return read_file(files[i])

    return SplitData(labels=np.asarray(list(labels), dtype=np.int64), load_image=load,
                     load_file=raw,
                     domains=None if domains is None else np.asarray(list(domains), np.int64),
                     name_of=lambda i: str(files[i]))


class DirectoryListing:
    """Which files exist, one `listdir` per directory, so checking that hundreds of thousands of
    listed files exist costs a few thousand system calls instead of one stat each."""

    def __init__(self) -> None:
        self._entries: dict[Path, set[str]] = {}

    def exists(self, path: Path) -> bool:
        parent = path.parent
        if parent not in self._entries:
            try:
                self._entries[parent] = set(os.listdir(parent))
            except OSError:
                self._entries[parent] = set()
        return path.name in self._entries[parent]


def relpath_problem(path: str) -> str | None:
    """Why `path` is not a plain relative path inside a dataset root (None when it is)."""
    if not path or path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path):
        return "is not a relative path"
    if "\\" in path or "\x00" in path:
        return "contains a backslash or NUL"
    if ".." in path.split("/"):
        return "escapes the dataset root"
    return None


def read_lines(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of every line that is neither empty nor a
    `#` comment."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from None
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("#"):
            continue
        fields = line.split()
        if fields:
            out.append((number, fields))
    return out


def read_split_lists(split_file: Path) -> dict[str, str]:
    """A user-given train/test split: relative path -> 'train' or 'test', in listed order.

    `split_file` is either a file of lines `RELPATH train|test`, or a directory holding
    `train.txt` and `test.txt`, each a list of lines `RELPATH [anything else]` (e.g. a label).
    """
    split_file = Path(split_file)
    assignment: dict[str, str] = {}
    where: dict[str, str] = {}

    def add(relpath: str, split: str, origin: str) -> None:
        why = relpath_problem(relpath)
        if why:
            raise DataError(f"{origin}: path {relpath!r} {why}; list paths relative to --root")
        if relpath in assignment:
            raise DataError(f"{origin}: {relpath} is already listed ({where[relpath]}); every "
                            f"image may appear once, in train or in test")
        assignment[relpath] = split
        where[relpath] = origin

    if split_file.is_dir():
        lists = [split_file / "train.txt", split_file / "test.txt"]
        if not all(p.is_file() for p in lists):
            raise DataError(f"split lists: {split_file} must hold train.txt and test.txt (one "
                            f"relative image path per line)")
        for path, split in zip(lists, ("train", "test")):
            for number, fields in read_lines(path, "split list"):
                add(fields[0], split, f"{path}:{number}")
    elif split_file.is_file():
        for number, fields in read_lines(split_file, "split file"):
            origin = f"{split_file}:{number}"
            if len(fields) != 2 or fields[1] not in ("train", "test"):
                raise DataError(f"{origin}: expected `RELPATH train` or `RELPATH test`, got "
                                f"{' '.join(fields)!r}")
            add(fields[0], fields[1], origin)
    else:
        raise DataError(f"--split-file {split_file} does not exist; give a file of `RELPATH "
                        f"train|test` lines or a directory holding train.txt and test.txt")
    if "train" not in assignment.values() or "test" not in assignment.values():
        raise DataError(f"split lists {split_file}: need at least one train and one test image")
    return assignment


def find_dir(root: Path, marker: str, subdirs: Iterable[str]) -> Path:
    """`root` itself when it holds `marker`, else the first of `root/subdir` that does."""
    for candidate in [root, *(root / s for s in subdirs)]:
        if (candidate / marker).exists():
            return candidate
    return root
