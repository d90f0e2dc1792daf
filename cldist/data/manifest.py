"""The dataset manifest: which classes form which task, and which shards hold them.

A built dataset is a directory `DIR/manifest.json` + `DIR/{train,test}/task-TTT-SSSSSS.tar`.
The manifest is the single source of truth for a scenario: the class order (and the seed that
produced it), the classes of every task, and per shard its path (relative to the dataset
directory), sha256 and sample count. Shards are referenced only through the manifest, so a
dataset can be moved or served from a base URL by changing `Manifest.root`.

Labels: shards store *original* class ids (`cls`). The stream label of a class is its position
in `class_order`.
- Class-incremental (`scenario` "class", the default): tasks take consecutive, disjoint slices
  of `class_order`, so task t's stream labels are
  `class_offsets()[t] .. class_offsets()[t] + len(classes) - 1`.
- Domain-incremental (`scenario` "domain"): every task holds every class of `class_order` (in
  that order) from one domain (`TaskSpec.domain`); the label space is shared, so every task's
  offset is 0 and its stream labels are `0 .. n_classes - 1`.

Versions: format 1 is class-incremental with square stored images. Format 2 adds `scenario`,
per-task `domain`, and `image_size: null` (images stored in their original, varying sizes).
A manifest is written with the oldest version that can express it, so class-incremental
datasets of square images stay readable by older cldist releases; this one reads both.

`Manifest.load` validates everything and raises `DataError` naming the file and the field.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cldist.atomic_io import write_text_atomic
from cldist.data.remote import check_location, read_url, url_scheme
from cldist.errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2  # the newest format this code reads and writes
READABLE_VERSIONS = (1, 2)
SPLITS = ("train", "test")
CLASS_IL, DOMAIN_IL = "class", "domain"
SCENARIOS = (CLASS_IL, DOMAIN_IL)
MAX_MANIFEST_BYTES = 256 << 20  # a remote manifest larger than this is refused

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class ShardInfo:
    """One webdataset tar shard of one task and split."""

    path: str  # relative to the dataset directory, POSIX separators
    sha256: str  # hex digest of the whole tar file
    n_samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "n_samples": self.n_samples}


@dataclass
class TaskSpec:
    """One task of the stream: its classes and the shards that hold their samples."""

    task_id: int
    classes: list[int]  # original class ids, in stream order
    train: list[ShardInfo]
    test: list[ShardInfo]
    domain: str | None = None  # domain-incremental streams: the task's domain

    @property
    def n_train(self) -> int:
        return sum(s.n_samples for s in self.train)

    @property
    def n_test(self) -> int:
        return sum(s.n_samples for s in self.test)

    def shards(self, split: str) -> list[ShardInfo]:
        """The shards of `split` ('train' or 'test')."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.train if split == "train" else self.test

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task_id": self.task_id}
        if self.domain is not None:  # absent from class-IL tasks: format-1 output unchanged
            out["domain"] = self.domain
        out.update({
            "classes": list(self.classes),
            "n_train": self.n_train,
            "n_test": self.n_test,
            "train": [s.to_dict() for s in self.train],
            "test": [s.to_dict() for s in self.test],
        })
        return out


@dataclass
class Manifest:
    """A class-incremental scenario over webdataset shards (see the module docstring)."""

    source: str
    n_classes: int
    class_names: list[str]
    class_order: list[int]  # a permutation of range(n_classes); position = stream label
    order_seed: int | None  # None when the order is natural or given explicitly
    # side of the (square) stored images in pixels; None: original files of varying size
    image_size: int | None
    channels: int  # 1 (grayscale) or 3 (RGB): what readers convert images to
    tasks: list[TaskSpec]
    format_version: int = FORMAT_VERSION  # as read; `to_dict` writes `required_version()`
    # The arguments that produced the dataset, so a rebuild of the same spec is recognised.
    build: dict[str, Any] = field(default_factory=dict)
    scenario: str = CLASS_IL  # "class" or "domain" incremental (see the module docstring)
    # Where shard paths are relative to: a local directory or a base URL. Not serialised.
    root: str = field(default="", compare=False, repr=False)
    # How its shards may be read (not serialised; the reader's settings, not the data's):
    # the hosts a URL root may name (`cldist.data.remote.check_location`), and the largest tar
    # member a reader accepts (None: `cldist.data.shards.MAX_MEMBER_BYTES`).
    allowed_hosts: tuple[str, ...] = field(default=(), compare=False, repr=False)
    max_member_bytes: int | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ queries
    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def domain_incremental(self) -> bool:
        return self.scenario == DOMAIN_IL

    def required_version(self) -> int:
        """The oldest format that can express this manifest (what `to_dict` writes)."""
        if self.scenario != CLASS_IL or self.image_size is None \
                or any(t.domain is not None for t in self.tasks):
            return 2
        return 1

    def task(self, task_id: int) -> TaskSpec:
        if not 0 <= task_id < len(self.tasks):
            raise DataError(f"task {task_id} does not exist: the manifest has tasks "
                            f"0..{len(self.tasks) - 1}")
        return self.tasks[task_id]

    def shard_url(self, shard: ShardInfo) -> str:
        """Where to read `shard` from: `root` joined with its relative path (which the manifest
        keeps inside the root), checked against `allowed_hosts` when the root is a URL."""
        if _is_url(self.root):
            return check_location(self.root.rstrip("/") + "/" + shard.path, self.allowed_hosts)
        return os.path.join(self.root or ".", *shard.path.split("/"))

    def stream_label(self, orig_class: int) -> int:
        """The stream label of an original class id (its position in `class_order`)."""
        try:
            return self._stream_labels()[orig_class]
        except KeyError:
            raise DataError(f"class {orig_class} is not in the manifest's class order") from None

    def class_offsets(self) -> list[int]:
        """The first stream label of every task (all 0 when domain-incremental)."""
        if self.domain_incremental:
            return [0] * len(self.tasks)
        offsets, total = [], 0
        for task in self.tasks:
            offsets.append(total)
            total += len(task.classes)
        return offsets

    def task_stream_labels(self, task_id: int) -> list[int]:
        """The (contiguous) stream labels of task `task_id`; in a domain-incremental stream
        every task has all of them."""
        start = self.class_offsets()[task_id]
        return list(range(start, start + len(self.task(task_id).classes)))

    def _stream_labels(self) -> dict[int, int]:
        # Cached lazily; the dataclass is not frozen but class_order never changes after load.
        cache = self.__dict__.get("_stream_label_cache")
        if cache is None or len(cache) != len(self.class_order):
            cache = {c: i for i, c in enumerate(self.class_order)}
            self.__dict__["_stream_label_cache"] = cache
        return cache

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {
            "format_version": self.required_version(),
            "source": self.source,
            "n_classes": self.n_classes,
            "class_names": list(self.class_names),
            "class_order": list(self.class_order),
            "order_seed": self.order_seed,
            "image_size": self.image_size,
            "channels": self.channels,
            "n_tasks": self.n_tasks,
            "tasks": [t.to_dict() for t in self.tasks],
            "build": dict(self.build),
        }
        if self.scenario != CLASS_IL:  # absent means class-IL: format-1 output unchanged
            out["scenario"] = self.scenario
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `directory/manifest.json` atomically (tmp file + fsync + rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / MANIFEST_NAME
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        write_text_atomic(target, text)
        return target

    @classmethod
    def from_dict(cls, data: Any, root: str = "", origin: str = "<manifest>",
                  allowed_hosts: tuple[str, ...] = (),
                  max_member_bytes: int | None = None) -> "Manifest":
        """Build a manifest from its JSON form, validating every field."""
        manifest = _parse_manifest(data, root=root, origin=origin)
        return _with_access(manifest, allowed_hosts, max_member_bytes)

    @classmethod
    def load(cls, path: str | os.PathLike, root: str | None = None,
             allowed_hosts: tuple[str, ...] | list[str] = (),
             max_member_bytes: int | None = None) -> "Manifest":
        """Read and validate a manifest.

        `path` is a manifest.json or the dataset directory holding one, locally or at a URL
        that `cldist.data.remote.check_location` passes with `allowed_hosts` (http(s) from
        those hosts, listed object-store buckets). Shard paths are taken relative to the
        manifest's directory (or URL) unless `root` (a directory or base URL, checked the same
        way) is given. `max_member_bytes` caps every tar member its readers accept.
        """
        allowed_hosts = tuple(str(h) for h in allowed_hosts or ())
        if root is not None:
            check_location(root, allowed_hosts, what="shard root")
        if _is_url(str(path)):
            check_location(str(path), allowed_hosts, what="dataset manifest")
            return _with_access(_load_remote(str(path), root), allowed_hosts, max_member_bytes)
        path = Path(path)
        file = path / MANIFEST_NAME if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"no dataset manifest at {file}: build one with "
                            f"`cldist data build --source NAME --out DIR`")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"manifest {file} is not readable JSON ({exc}); rebuild the "
                            f"dataset with `cldist data build`") from None
        base = root if root is not None else str(file.resolve().parent)
        manifest = _parse_manifest(data, root=base, origin=str(file))
        return _with_access(manifest, allowed_hosts, max_member_bytes)


# ---------------------------------------------------------------------- helpers
def _is_url(root: str) -> bool:
    return url_scheme(root) is not None


def _with_access(manifest: Manifest, allowed_hosts, max_member_bytes) -> Manifest:
    manifest.allowed_hosts = tuple(str(h) for h in allowed_hosts or ())
    manifest.max_member_bytes = max_member_bytes
    return manifest


def _load_remote(url: str, root: str | None) -> Manifest:
    file = url if url.endswith(".json") else url.rstrip("/") + "/" + MANIFEST_NAME
    raw = read_url(file, limit=MAX_MANIFEST_BYTES, what="dataset manifest")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"manifest {file} is not readable JSON ({exc}); rebuild the "
                        f"dataset with `cldist data build`") from None
    base = root if root is not None else file.rsplit("/", 1)[0]
    return _parse_manifest(data, root=base, origin=file)


def shard_path_problem(path: Any) -> str | None:
    """Why `path` is not a safe shard path inside the dataset directory (None when it is)."""
    if not isinstance(path, str) or not path:
        return "must be a non-empty string"
    if "\\" in path or "\x00" in path:
        return f"{path!r} contains a backslash or NUL"
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path) or "://" in path:
        return f"{path!r} is absolute; shard paths are relative to the dataset directory"
    parts = path.split("/")
    if ".." in parts:
        return f"{path!r} escapes the dataset directory"
    if posixpath.normpath(path) != path:
        return f"{path!r} is not a normalised relative path"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_manifest(data: Any, root: str, origin: str) -> Manifest:
    """A Manifest from its JSON form, or one DataError listing every problem found."""
    problems: list[str] = []
    if not isinstance(data, dict):
        problems.append("top level: must be a JSON object")
        raise _invalid(origin, problems)
    version = data.get("format_version")
    if version not in READABLE_VERSIONS or not _is_int(version):
        problems.append(f"format_version: unknown format_version {version!r} (this cldist "
                        f"reads {', '.join(map(str, READABLE_VERSIONS))}); upgrade cldist or "
                        f"rebuild the dataset")
        raise _invalid(origin, problems)
    head = _parse_header(data, version, problems)
    parser = _TaskParser(head, problems)
    tasks = [task for t, raw in enumerate(head["tasks"] or [])
             if (task := parser.task(t, raw)) is not None]
    # Class-IL tasks must take consecutive slices of class_order, so stream labels are
    # contiguous.
    class_order = head["class_order"]
    if head["scenario"] == CLASS_IL and class_order is not None and not problems:
        streamed = [c for task in tasks for c in task.classes]
        if streamed != class_order[:len(streamed)]:
            problems.append("tasks: the tasks' classes, concatenated, must equal the start of "
                            "class_order")
    if problems:
        raise _invalid(origin, problems)
    return Manifest(source=head["source"], n_classes=head["n_classes"],
                    class_names=list(head["class_names"]), class_order=list(class_order),
                    order_seed=head["order_seed"], image_size=head["image_size"],
                    channels=head["channels"], tasks=tasks, format_version=version,
                    build=dict(head["build"]), scenario=head["scenario"], root=root)


def _invalid(origin: str, problems: list[str]) -> DataError:
    listed = "\n".join(f"  - {p}" for p in problems)
    return DataError(f"invalid manifest {origin} ({len(problems)} problem(s)):\n{listed}\n"
                     f"Rebuild the dataset with `cldist data build`.")


def _parse_header(data: dict, version: int, problems: list[str]) -> dict[str, Any]:
    """The manifest's fields other than the tasks' contents (None where invalid; each
    problem appended to `problems`)."""
    scenario = data.get("scenario", CLASS_IL)
    if scenario not in SCENARIOS:
        problems.append(f"scenario: must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
        scenario = CLASS_IL
    elif scenario != CLASS_IL and version < 2:
        problems.append(f"scenario: {scenario!r} needs format_version 2")

    def need(name: str, check, what: str):
        if name not in data:
            problems.append(f"{name}: missing")
            return None
        value = data[name]
        if not check(value):
            problems.append(f"{name}: must be {what}, got {value!r}")
            return None
        return value

    head: dict[str, Any] = {"scenario": scenario}
    head["source"] = need("source", lambda v: isinstance(v, str) and v, "a non-empty string")
    n_classes = head["n_classes"] = need("n_classes", lambda v: _is_int(v) and v > 0,
                                         "a positive integer")
    class_names = head["class_names"] = need(
        "class_names", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "a list of strings")
    class_order = head["class_order"] = need(
        "class_order", lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
        "a list of integers")
    order_seed = head["order_seed"] = data.get("order_seed")
    if order_seed is not None and not _is_int(order_seed):
        problems.append(f"order_seed: must be an integer or null, got {order_seed!r}")
    if version >= 2 and data.get("image_size", 0) is None:
        head["image_size"] = None  # original files of varying size
    else:
        head["image_size"] = need("image_size", lambda v: _is_int(v) and v > 0,
                                  "a positive integer" + (" or null" if version >= 2 else ""))
    head["channels"] = need("channels", lambda v: v in (1, 3) and _is_int(v), "1 or 3")
    build = data.get("build", {})
    if not isinstance(build, dict):
        problems.append(f"build: must be an object, got {build!r}")
        build = {}
    head["build"] = build
    head["tasks"] = need("tasks", lambda v: isinstance(v, list) and v, "a non-empty list")

    if n_classes is not None and class_names is not None and len(class_names) != n_classes:
        problems.append(f"class_names: has {len(class_names)} names for n_classes={n_classes}")
    if n_classes is not None and class_order is not None \
            and sorted(class_order) != list(range(n_classes)):
        problems.append(f"class_order: must be a permutation of 0..{n_classes - 1}")
    return head


class _TaskParser:
    """Parses the manifest's tasks one by one, checking each against the header and the
    tasks before it (classes, domains and shard paths seen); problems go to `problems`."""

    def __init__(self, head: dict[str, Any], problems: list[str]):
        self.scenario, self.n_classes = head["scenario"], head["n_classes"]
        self.class_order = head["class_order"]
        self.problems = problems
        self.seen_class: dict[int, int] = {}
        self.seen_domains: dict[str, int] = {}
        self.seen_paths: set[str] = set()

    def task(self, t: int, raw: Any) -> TaskSpec | None:
        where = f"tasks[{t}]"
        if not isinstance(raw, dict):
            self.problems.append(f"{where}: must be an object")
            return None
        if raw.get("task_id") != t or not _is_int(raw.get("task_id")):
            self.problems.append(f"{where}.task_id: must be {t}, got {raw.get('task_id')!r}")
        domain = self._domain(t, where, raw.get("domain"))
        classes = self._classes(t, where, raw.get("classes"))
        splits = {split: self._shards(f"{where}.{split}", raw.get(split)) for split in SPLITS}
        task = TaskSpec(task_id=t, classes=list(classes), train=splits["train"],
                        test=splits["test"], domain=domain if isinstance(domain, str) else None)
        # n_train/n_test are written for people reading the file; they must agree. (Only
        # summed when every count so far is valid.)
        for name, split in (("n_train", "train"), ("n_test", "test")):
            if name in raw and not self.problems:
                total = sum(s.n_samples for s in task.shards(split))
                if raw[name] != total:
                    self.problems.append(f"{where}.{name}: says {raw[name]!r} but its shards "
                                         f"hold {total}")
        return task

    def _domain(self, t: int, where: str, domain: Any) -> Any:
        if self.scenario == DOMAIN_IL:
            if not isinstance(domain, str) or not domain:
                self.problems.append(f"{where}.domain: a domain-incremental task needs a "
                                     f"domain name")
            elif domain in self.seen_domains:
                self.problems.append(f"{where}.domain: {domain!r} is also task "
                                     f"{self.seen_domains[domain]}'s domain")
            else:
                self.seen_domains[domain] = t
        elif domain is not None:
            self.problems.append(f"{where}.domain: only domain-incremental tasks have a domain")
        return domain

    def _classes(self, t: int, where: str, classes: Any) -> list[int]:
        problems = self.problems
        if not isinstance(classes, list) or not all(_is_int(c) for c in classes):
            problems.append(f"{where}.classes: must be a list of integers")
            classes = []
        elif not classes:
            problems.append(f"{where}.classes: empty task (no classes)")
        if self.scenario == DOMAIN_IL and self.class_order is not None \
                and classes != self.class_order:
            problems.append(f"{where}.classes: a domain-incremental task must hold every class, "
                            f"in class_order's order")
        for c in classes:
            if self.n_classes is not None and not 0 <= c < self.n_classes:
                problems.append(f"{where}.classes: class {c} is outside "
                                f"0..{self.n_classes - 1}")
            elif self.scenario == DOMAIN_IL:
                continue  # classes repeat across tasks by design (checked against class_order)
            elif c in self.seen_class:
                other = self.seen_class[c]
                problems.append(f"{where}.classes: class {c} is also in "
                                + ("this task twice" if other == t else f"task {other}"))
            else:
                self.seen_class[c] = t
        return classes

    def _shards(self, where: str, shards_raw: Any) -> list[ShardInfo]:
        problems = self.problems
        if not isinstance(shards_raw, list) or not shards_raw:
            problems.append(f"{where}: must be a non-empty list of shards")
            return []
        shards = []
        for s, sraw in enumerate(shards_raw):
            swhere = f"{where}[{s}]"
            if not isinstance(sraw, dict):
                problems.append(f"{swhere}: must be an object")
                continue
            path, sha, count = sraw.get("path"), sraw.get("sha256"), sraw.get("n_samples")
            why = shard_path_problem(path)
            if why:
                problems.append(f"{swhere}.path: {why}")
            elif path in self.seen_paths:
                problems.append(f"{swhere}.path: {path!r} is listed twice")
            else:
                self.seen_paths.add(path)
            if not isinstance(sha, str) or not _SHA256_RE.match(sha):
                problems.append(f"{swhere}.sha256: must be 64 lowercase hex digits")
            if not _is_int(count) or count <= 0:
                problems.append(f"{swhere}.n_samples: must be a positive integer, "
                                f"got {count!r}")
            shards.append(ShardInfo(path=path, sha256=sha, n_samples=count))
        return shards
