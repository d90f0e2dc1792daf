"""Folder-tree sources: any ImageFolder tree, ImageNet-R and ImageNet-A.

- `folder`: `ROOT/CLASS/*.png|jpg|...`; `ROOT/train` and `ROOT/test` are the split when both
  exist, a `--split-file` when given, else a seeded 80/20 split per class. Images are stored at
  their common native size (or `--image-size`).
- `imagenet_r` / `imagenet_a`: `ROOT/nXXXXXXXX/*.jpg`, one folder per WordNet id (200 each).
  The split is a `--split-file`, else `ROOT/train.txt` + `ROOT/test.txt` when present, else
  the seeded 80/20 split per class the LoRA papers use. The JPEG files are stored as they are.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from cldist.data.sources.base import (
    DATA_DOC, FOLDER_IMAGE_EXTENSIONS, GRAYSCALE_MODES, DirectoryListing, SourceData, class_dirs,
    file_split, image_files, read_split_lists, split_per_class)
from cldist.errors import DataError

WORDNET_ID = re.compile(r"^n[0-9]{8}$")


def _listed_files(root: Path, assignment: dict[str, str], class_names: list[str],
                  source: str, split_file: Path) -> dict[str, tuple[list[Path], list[int]]]:
    """Files and class ids per split from split lists; the class is a path's first folder."""
    index = {name: i for i, name in enumerate(class_names)}
    listing = DirectoryListing()
    out: dict[str, tuple[list[Path], list[int]]] = {"train": ([], []), "test": ([], [])}
    for relpath, split in assignment.items():
        parts = relpath.split("/")
        if len(parts) < 2 or parts[0] not in index:
            raise DataError(f"{source}: {relpath} (listed in {split_file}) is not inside a "
                            f"class folder of {root}; list paths as CLASS/FILE relative to "
                            f"--root")
        path = root.joinpath(*parts)
        if not listing.exists(path):
            raise DataError(f"{source}: {relpath} (listed in {split_file}) does not exist under "
                            f"{root}")
        files, labels = out[split]
        files.append(path)
        labels.append(index[parts[0]])
    return out


# ----------------------------------------------------------------------- folder
def load_folder_source(root: str | os.PathLike, split_file: str | os.PathLike | None = None
                       ) -> SourceData:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder source: {root} is not a directory; pass --root DIR with "
                        f"DIR/CLASS/*.png (or DIR/train/CLASS and DIR/test/CLASS)")
    identity = {"root": str(root.resolve())}
    if split_file is not None:
        assignment = read_split_lists(Path(split_file))
        class_names = sorted({rel.split("/")[0] for rel in assignment if "/" in rel})
        listed = _listed_files(root, assignment, class_names, "folder source", Path(split_file))
        (train_files, train_labels), (test_files, test_labels) = listed["train"], listed["test"]
        train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
        identity["split_file"] = str(Path(split_file).resolve())
    else:
        presplit = (root / "train").is_dir() and (root / "test").is_dir()
        class_root = root / "train" if presplit else root
        class_names = class_dirs(class_root)
        if not class_names:
            raise DataError(f"folder source: no class directories in {class_root}")
        if presplit and class_dirs(root / "test") != class_names:
            raise DataError(f"folder source: {root / 'test'} must hold the same class "
                            f"directories as {root / 'train'} ({', '.join(class_names)})")

        def collect(base: Path) -> tuple[list[Path], np.ndarray]:
            files, labels = [], []
            for class_id, name in enumerate(class_names):
                found = image_files(base / name)
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
                any_colour |= image.mode not in GRAYSCALE_MODES
        except Exception as exc:
            raise DataError(f"cannot decode image {path}: {exc}") from None
    channels = 3 if any_colour else 1
    mode = "RGB" if channels == 3 else "L"
    native = None
    if len(sizes) == 1:
        width, height = next(iter(sizes))
        native = width if width == height else None

    return SourceData(name="folder", class_names=class_names,
                      train=file_split(train_files, train_labels, mode),
                      test=file_split(test_files, test_labels, mode),
                      native_size=native, channels=channels, identity=identity)


# ------------------------------------------------------------ ImageNet-R / -A
def _wordnet_tree_source(name: str, folder: str, root: str | os.PathLike,
                         split_file: str | os.PathLike | None) -> SourceData:
    root = Path(root)
    if root.is_dir() and not any(WORDNET_ID.match(d) for d in class_dirs(root)) \
            and (root / folder).is_dir():
        root = root / folder  # --root pointed at the folder the archive was extracted into
    if not root.is_dir():
        raise DataError(f"{name}: {root} is not a directory; pass --root pointing at the "
                        f"extracted {folder}/ folder (see {DATA_DOC})")
    class_names = [d for d in class_dirs(root) if WORDNET_ID.match(d)]
    if not class_names:
        raise DataError(f"{name}: no WordNet-id class folders (like n01443537) in {root}; pass "
                        f"--root pointing at the extracted {folder}/ folder (see {DATA_DOC})")
    identity = {"root": str(root.resolve())}
    if split_file is None and (root / "train.txt").is_file() and (root / "test.txt").is_file():
        split_file = root  # the lists shipped beside the class folders
    if split_file is not None:
        split_file = Path(split_file)
        listed = _listed_files(root, read_split_lists(split_file), class_names, name,
                               split_file)
        splits = {s: file_split(files, labels, "RGB") for s, (files, labels) in listed.items()}
        identity["split_file"] = str(split_file.resolve())
    else:
        files, labels = [], []
        for class_id, class_name in enumerate(class_names):
            found = image_files(root / class_name)
            if not found:
                raise DataError(f"{name}: class folder {root / class_name} holds no images")
            files += found
            labels += [class_id] * len(found)
        labels = np.asarray(labels, dtype=np.int64)
        train_idx, test_idx = split_per_class(labels)
        splits = {"train": file_split([files[i] for i in train_idx], labels[train_idx], "RGB"),
                  "test": file_split([files[i] for i in test_idx], labels[test_idx], "RGB")}
    return SourceData(name=name, class_names=class_names, train=splits["train"],
                      test=splits["test"], native_size=None, channels=3, identity=identity,
                      store_originals=True)


def load_imagenet_r_source(root: str | os.PathLike,
                           split_file: str | os.PathLike | None = None) -> SourceData:
    return _wordnet_tree_source("imagenet_r", "imagenet-r", root, split_file)


def load_imagenet_a_source(root: str | os.PathLike,
                           split_file: str | os.PathLike | None = None) -> SourceData:
    return _wordnet_tree_source("imagenet_a", "imagenet-a", root, split_file)

