"""CUB-200-2011 with its official train/test split.

`ROOT` (the extracted `CUB_200_2011/`) holds `images.txt` (`ID RELPATH`), `classes.txt`
(`CLASS_ID NNN.Name`), `image_class_labels.txt` (`ID CLASS_ID`), `train_test_split.txt`
(`ID 1` for train, `ID 0` for test) and `images/RELPATH`. Ids are 1-based; class ids become
0-based. The JPEG files are stored as they are.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from cldist.data.sources.base import (
    DATA_DOC, DirectoryListing, SourceData, file_split, find_dir, read_lines, relpath_problem)
from cldist.errors import DataError

CUB_URL = "https://data.caltech.edu/records/65de6-vp158"
CUB_FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt")


def _id_table(path: Path, value_check, what: str) -> dict[int, str]:
    table: dict[int, str] = {}
    for number, fields in read_lines(path, "CUB list"):
        if len(fields) < 2 or not fields[0].isdigit() or not value_check(fields[1]):
            raise DataError(f"cub200: {path}:{number}: expected `ID {what}`, got "
                            f"{' '.join(fields)!r}")
        key = int(fields[0])
        if key in table:
            raise DataError(f"cub200: {path}:{number}: id {key} is listed twice")
        table[key] = " ".join(fields[1:])
    return table


def load_cub200_source(root: str | os.PathLike) -> SourceData:
    root = find_dir(Path(root), "images.txt", ["CUB_200_2011"])
    missing = [f for f in CUB_FILES if not (root / f).is_file()]
    if missing or not (root / "images").is_dir():
        raise DataError(f"cub200: {root} lacks {', '.join(missing) or 'images/'}; pass --root "
                        f"pointing at the extracted CUB_200_2011/ folder ({CUB_URL}, see "
                        f"{DATA_DOC})")
    images = _id_table(root / "images.txt", lambda v: True, "RELPATH")
    classes = _id_table(root / "classes.txt", lambda v: True, "NAME")
    labels = _id_table(root / "image_class_labels.txt", str.isdigit, "CLASS_ID")
    is_train = _id_table(root / "train_test_split.txt", lambda v: v in ("0", "1"), "0|1")

    class_ids = sorted(classes)
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise DataError(f"cub200: {root / 'classes.txt'} must number its classes 1..N")
    # "001.Black_footed_Albatross" -> "Black_footed_Albatross": the number is the class id.
    class_names = [re.sub(r"^[0-9]+\.", "", classes[c]) for c in class_ids]
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
        if set(table) != set(images):
            odd = sorted(set(table) ^ set(images))[:5]
            raise DataError(f"cub200: {root / name} and images.txt list different image ids "
                            f"(e.g. {odd}); the files come from different releases")
    listing = DirectoryListing()
    files: dict[str, tuple[list[Path], list[int]]] = {"train": ([], []), "test": ([], [])}
    for image_id in sorted(images):
        relpath = images[image_id]
        why = relpath_problem(relpath)
        if why:
            raise DataError(f"cub200: images.txt id {image_id}: {relpath!r} {why}")
        class_id = int(labels[image_id])
        if not 1 <= class_id <= len(class_names):
            raise DataError(f"cub200: image {image_id} has class {class_id}, outside "
                            f"1..{len(class_names)}")
        path = root.joinpath("images", *relpath.split("/"))
        if not listing.exists(path):
            raise DataError(f"cub200: {path} (images.txt id {image_id}) does not exist")
        split_files, split_labels = files["train" if is_train[image_id] == "1" else "test"]
        split_files.append(path)
        split_labels.append(class_id - 1)
    splits = {s: file_split(f, lab, "RGB") for s, (f, lab) in files.items()}
    return SourceData(name="cub200", class_names=class_names, train=splits["train"],
                      test=splits["test"], native_size=None, channels=3,
                      identity={"root": str(root.resolve())}, store_originals=True)
