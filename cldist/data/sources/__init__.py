"""Dataset sources: where the raw images come from before they are sharded.

`SOURCES` maps a source name (what `cldist data build --source` takes) to a `Source`: the
loader, whether it needs `--root`, what the root must hold, and which options it accepts.
`load_source` opens one and returns a `SourceData` (see `base.py`). docs/DATA.md says where
each published dataset comes from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from cldist.data.sources.base import (
    DATA_DOC, FOLDER_IMAGE_EXTENSIONS, SPLIT_SEED, TEST_FRACTION, SourceData, SplitData,
    split_per_class)
from cldist.data.sources.cifar import CIFAR100_BINARY_URL, load_cifar100_source
from cldist.data.sources.cub import load_cub200_source
from cldist.data.sources.domainnet import DOMAINNET_DOMAINS, load_domainnet_source
from cldist.data.sources.folder import (
    load_folder_source, load_imagenet_a_source, load_imagenet_r_source)
from cldist.data.sources.small import (
    FASHION_MNIST_CLASSES, FASHION_MNIST_DEFAULT_ROOT, FASHION_MNIST_FILES, load_digits_source,
    load_fashion_mnist_source, load_fmnist_digits_source, read_idx)
from cldist.errors import DataError


@dataclass(frozen=True)
class Source:
    """A registered source: `load(root, **options)` -> SourceData."""

    summary: str  # one line for --help and error messages
    load: Callable[..., SourceData]
    needs_root: bool = True
    layout: str = ""  # what --root must hold, for the error when it is missing
    options: tuple[str, ...] = ()  # keyword options `load` accepts: split_file, domains


SOURCES: dict[str, Source] = {
    "digits": Source(
        "scikit-learn's bundled 8x8 digits, 10 classes, seeded 80/20 split (no download)",
        lambda root: load_digits_source(), needs_root=False),
    "fashion_mnist": Source(
        "Fashion-MNIST idx files, 10 classes, official split (default root: Debian's "
        "dataset-fashion-mnist)", load_fashion_mnist_source, needs_root=False),
    "fmnist_digits": Source(
        "Fashion-MNIST + scikit-learn digits as one 20-class grayscale source at 28 px",
        load_fmnist_digits_source, needs_root=False),
    "folder": Source(
        "any ImageFolder tree; split from ROOT/train + ROOT/test, --split-file, or seeded 80/20",
        load_folder_source,
        layout="a tree DIR/CLASS/*.png (or DIR/train/CLASS/... and DIR/test/CLASS/...)",
        options=("split_file",)),
    "imagenet_r": Source(
        "ImageNet-R, 200 WordNet-id folders; seeded 80/20 split or given lists",
        load_imagenet_r_source, layout="the extracted imagenet-r/ folder (DIR/n01443537/*.jpg)",
        options=("split_file",)),
    "imagenet_a": Source(
        "ImageNet-A, 200 WordNet-id folders; seeded 80/20 split or given lists",
        load_imagenet_a_source, layout="the extracted imagenet-a/ folder (DIR/n01498041/*.jpg)",
        options=("split_file",)),
    "domainnet": Source(
        "DomainNet, domain folders + official DOMAIN_{train,test}.txt lists; class- or "
        "domain-incremental", load_domainnet_source,
        layout="the domain folders (DIR/clipart/CLASS/*.jpg, ...) and DIR/clipart_train.txt, "
               "DIR/clipart_test.txt, ...", options=("domains",)),
    "cifar100": Source(
        "CIFAR-100 binary distribution (train.bin, test.bin, fine_label_names.txt)",
        load_cifar100_source, layout="the extracted cifar-100-binary/ folder"),
    "cub200": Source(
        "CUB-200-2011 with its official split (images.txt, train_test_split.txt, ...)",
        load_cub200_source, layout="the extracted CUB_200_2011/ folder"),
}


def load_source(name: str, root: str | os.PathLike | None = None, *,
                split_file: str | os.PathLike | None = None,
                domains: Sequence[str] | None = None) -> SourceData:
    """Open source `name` (a key of SOURCES); `root` is where its files are, if it has any.

    split_file: a user-given train/test split (sources that accept it); domains: which
    DomainNet domains to read, in order (default: all found).
    """
    source = SOURCES.get(name)
    if source is None:
        raise DataError(f"unknown data source {name!r}; choose one of: {', '.join(SOURCES)}")
    given = {"split_file": split_file, "domains": domains}
    unsupported = [k for k, v in given.items() if v is not None and k not in source.options]
    if unsupported:
        flags = ", ".join("--" + k.replace("_", "-") for k in unsupported)
        raise DataError(f"source {name!r} does not take {flags}")
    if source.needs_root and root is None:
        raise DataError(f"source {name!r} needs --root DIR (`cldist run`: scenario.root=DIR, or "
                        f"scenario.manifest=PATH of an already built dataset): "
                        f"{source.layout} (see {DATA_DOC})")
    options = {k: v for k, v in given.items() if k in source.options}
    if options.get("split_file") is not None:
        options["split_file"] = Path(options["split_file"])
    return source.load(root, **options)


__all__ = [
    "SOURCES", "Source", "SourceData", "SplitData", "load_source", "split_per_class", "read_idx",
    "SPLIT_SEED", "TEST_FRACTION", "FOLDER_IMAGE_EXTENSIONS", "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_ROOT", "FASHION_MNIST_FILES", "CIFAR100_BINARY_URL",
    "DOMAINNET_DOMAINS", "load_digits_source", "load_fashion_mnist_source",
    "load_fmnist_digits_source", "load_folder_source", "load_imagenet_r_source",
    "load_imagenet_a_source", "load_domainnet_source", "load_cifar100_source",
    "load_cub200_source",
]
