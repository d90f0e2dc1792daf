"""DomainNet with its official per-domain train/test lists.

`ROOT` holds the domain folders (`DOMAIN/CLASS/*.jpg`) and, per domain, `DOMAIN_train.txt` and
`DOMAIN_test.txt` with lines `DOMAIN/CLASS/FILE.jpg LABEL`. Every domain found with both lists
is used (or those `--domains` names, in that order); the classes and their ids come from the
lists, so the class count is whatever the data holds (345 in the published release). Samples
of all domains are pooled into one source and each keeps its domain id, so a build can split
by class (class-incremental) or by domain (domain-incremental). The JPEG files are stored as
they are.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from cldist.data.sources.base import (
    DATA_DOC, DirectoryListing, SourceData, file_split, read_lines, relpath_problem)
from cldist.errors import DataError

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_URL = "http://ai.bu.edu/M3SDA/"


def _available_domains(root: Path) -> list[str]:
    """Domains with both lists: the published six in their usual order, then any others."""
    found = {p.name[:-len("_train.txt")] for p in root.glob("*_train.txt")}
    found = {d for d in found if d and (root / f"{d}_test.txt").is_file()}
    return [d for d in DOMAINNET_DOMAINS if d in found] + sorted(found - set(DOMAINNET_DOMAINS))


def load_domainnet_source(root: str | os.PathLike,
                          domains: Sequence[str] | None = None) -> SourceData:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"domainnet: {root} is not a directory; pass --root pointing at the "
                        f"folder holding the domain folders and DOMAIN_train.txt / "
                        f"DOMAIN_test.txt lists (see {DATA_DOC})")
    available = _available_domains(root)
    if not available:
        raise DataError(f"domainnet: no DOMAIN_train.txt + DOMAIN_test.txt lists in {root}; "
                        f"download them with the images ({DOMAINNET_URL}, see {DATA_DOC})")
    if domains is None:
        domains = available
    else:
        domains = list(domains)
        unknown = [d for d in domains if d not in available]
        if unknown or len(set(domains)) != len(domains) or not domains:
            raise DataError(f"domainnet: --domains {','.join(domains)}: each must be one of "
                            f"the domains with lists in {root} ({', '.join(available)}), once")

    names: dict[int, str] = {}
    listing = DirectoryListing()
    per_split: dict[str, tuple[list[Path], list[int], list[int]]] = {
        "train": ([], [], []), "test": ([], [], [])}
    for domain_id, domain in enumerate(domains):
        for split in ("train", "test"):
            list_path = root / f"{domain}_{split}.txt"
            files, labels, domain_ids = per_split[split]
            for number, fields in read_lines(list_path, "DomainNet list"):
                origin = f"{list_path}:{number}"
                if len(fields) != 2 or not fields[1].isdigit():
                    raise DataError(f"domainnet: {origin}: expected `DOMAIN/CLASS/FILE LABEL`, "
                                    f"got {' '.join(fields)!r}")
                relpath, label = fields[0], int(fields[1])
                parts = relpath.split("/")
                why = relpath_problem(relpath)
                if why or len(parts) != 3 or parts[0] != domain:
                    raise DataError(f"domainnet: {origin}: {relpath!r} is not a "
                                    f"{domain}/CLASS/FILE path")
                if names.setdefault(label, parts[1]) != parts[1]:
                    raise DataError(f"domainnet: {origin}: label {label} is class "
                                    f"{names[label]!r} elsewhere but {parts[1]!r} here")
                path = root.joinpath(*parts)
                if not listing.exists(path):
                    raise DataError(f"domainnet: {path} (listed in {origin}) does not exist")
                files.append(path)
                labels.append(label)
                domain_ids.append(domain_id)

    n_classes = max(names) + 1 if names else 0
    missing = [c for c in range(n_classes) if c not in names]
    if missing or n_classes == 0:
        raise DataError(f"domainnet: the lists in {root} use labels up to {n_classes - 1} but "
                        f"never label(s) {missing[:10]}; labels must be 0..N-1 (the domains "
                        f"{', '.join(domains)} must cover every class)")
    by_name = {}
    for label, name in names.items():
        if by_name.setdefault(name, label) != label:
            raise DataError(f"domainnet: class {name!r} has labels {by_name[name]} and {label} "
                            f"in the lists in {root}")
    splits = {s: file_split(f, lab, "RGB", dom) for s, (f, lab, dom) in per_split.items()}
    for split, data in splits.items():
        if not len(data):
            raise DataError(f"domainnet: the {split} lists in {root} are empty")
    return SourceData(name="domainnet", class_names=[names[c] for c in range(n_classes)],
                      train=splits["train"], test=splits["test"], native_size=None,
                      channels=3, identity={"root": str(root.resolve()), "domains": domains},
                      store_originals=True, domain_names=list(domains))

