"""Build an incremental dataset: source -> class order -> tasks -> shards + manifest.

`build_dataset` is what `cldist data build` calls. Everything is seeded: the class order
(`numpy.random.default_rng(seed).permutation`, or the natural or an explicit order), per-class
subsampling and the order of samples inside each task's shards, so the same arguments give
byte-identical shards (same sha256). Samples are shuffled across classes at build time so that
a streaming reader with a modest shuffle buffer still sees mixed batches.

Scenarios: class-incremental (tasks are disjoint groups of classes) or domain-incremental (a
source with domains, e.g. DomainNet: one task per domain, every class in every task).

Storage: images are re-encoded as PNG at a square size (the source's native size, or
`image_size`), or - for photo sources by default, or with `image_size="original"` - each
image file's own bytes are stored unchanged (JPEG/PNG/WebP; anything else becomes PNG), after
checking that it decodes as the format its member extension will name.

Work is planned as one job per shard and run in-process or on a pool of `workers` processes;
the result does not depend on the number of workers.

The output directory is claimed with a `.cldist-build.json` marker holding the build spec
before any shard is written: rebuilding (or resuming an interrupted build of) the same spec
into the same directory is allowed, anything else in a non-empty directory is refused. Every
finished shard is appended to a journal (`.cldist-build-shards.jsonl`); a resumed build keeps
each shard whose checksum still matches its journal (or manifest) entry and whose samples are
the ones planned, and writes only the rest.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

import numpy as np
from PIL import Image

from cldist.atomic_io import write_text_atomic
from cldist.data.manifest import (
    CLASS_IL, DOMAIN_IL, MANIFEST_NAME, SCENARIOS, Manifest, ShardInfo, TaskSpec)
from cldist.data.shards import (
    STORED_IMAGE_FORMATS, encode_png, read_shard_index, sha256_file, shard_relpath, write_shard)
from cldist.data.sources import SPLIT_SEED, SourceData, SplitData, load_source
from cldist.errors import DataError

BUILD_MARKER = ".cldist-build.json"
BUILD_JOURNAL = ".cldist-build-shards.jsonl"
ORDERS = ("seeded", "natural", "explicit")
ORIGINAL = "original"  # image_size value: store each image file's own bytes
# Distinct seed streams for the two splits, so train and test subsampling never correlate.
_SPLIT_STREAM = {"train": 1, "test": 2}
# PIL format of a stored original -> member extension; MPO is a JPEG with extra frames.
_ORIGINAL_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}

# (done shards, all shards, done samples, all samples)
ProgressFn = Callable[[int, int, int, int], None]


@dataclass(frozen=True)
class _Job:
    """One shard to write: which samples of which split, in order."""

    task_id: int
    split: str
    index: int  # shard number within the task's split
    samples: np.ndarray  # int64 indices into the source split

    @property
    def relpath(self) -> str:
        return shard_relpath(self.split, self.task_id, self.index)


def build_dataset(source: str, out: str | os.PathLike, root: str | os.PathLike | None = None,
                  n_tasks: int | None = 5, seed: int = 1993,
                  image_size: int | str | None = None,
                  classes_per_task: Sequence[int] | None = None, order: str = "seeded",
                  max_train_per_class: int | None = None,
                  max_test_per_class: int | None = None,
                  shard_max_samples: int = 1000, *,
                  class_order: Sequence[int | str] | None = None,
                  split_file: str | os.PathLike | None = None,
                  scenario: str = CLASS_IL, domains: Sequence[str] | None = None,
                  workers: int = 1, progress: ProgressFn | None = None) -> Manifest:
    """Write `out/{train,test}/task-TTT-SSSSSS.tar` and `out/manifest.json`; return the manifest.

    source: a key of `cldist.data.sources.SOURCES`; root: where the source's files are.
    n_tasks: split the (ordered) classes into this many equal tasks, unless
        `classes_per_task` lists the task sizes explicitly (then its length is the number of
        tasks and `n_tasks` is ignored; the sizes may sum to fewer than all classes).
        Domain-incremental builds ignore both: one task per domain, all classes in each.
    order: 'seeded' (permutation drawn from `seed`) or 'natural' (class ids ascending);
        `class_order` (class ids or names, a permutation of all classes) makes it 'explicit'.
    image_size: store images resized to this square size; 'original': store each image file
        unchanged; None: the source's default (native size, or original files for photos).
    max_{train,test}_per_class: seeded per-class (per domain, when domain-incremental)
        subsampling caps (None: keep all).
    shard_max_samples: at most this many samples per shard.
    split_file: a given train/test split (folder, imagenet_r, imagenet_a; see docs/DATA.md).
    scenario: 'class' or 'domain' incremental; domains: which domains, in task order
        (default: every domain the source has).
    workers: processes converting shards in parallel (1: in this process).
    progress: called after every shard with (done shards, shards, done samples, samples).
    """
    if class_order is not None:
        if order not in ("seeded", "explicit"):
            raise DataError(f"give either order={order!r} or an explicit class order, not both")
        order = "explicit"
    elif order == "explicit":
        raise DataError("order 'explicit' needs the class order itself (class_order / "
                        "--class-order)")
    _check_args(n_tasks, seed, image_size, classes_per_task, order, max_train_per_class,
                max_test_per_class, shard_max_samples, scenario, workers)
    load_options = {"split_file": split_file, "domains": domains}
    data = load_source(source, root, **load_options)
    if scenario == DOMAIN_IL and not data.domain_names:
        raise DataError(f"source {source!r} has no domains; a domain-incremental build "
                        f"(--scenario domain) needs one that has, e.g. domainnet")
    if scenario == DOMAIN_IL and classes_per_task is not None:
        raise DataError("classes_per_task does not apply to a domain-incremental build: every "
                        "task holds every class")
    ordered = _class_order(data, order, seed, class_order)
    if scenario == DOMAIN_IL:
        task_classes = [list(ordered) for _ in data.domain_names]
    else:
        task_classes = _split_into_tasks(ordered, n_tasks, classes_per_task)
    storage = _storage(data, source, image_size)

    spec = {
        "source": source, **data.identity, "n_tasks": len(task_classes), "seed": seed,
        "order": order, "image_size": storage,
        "classes_per_task": [len(c) for c in task_classes],
        "max_train_per_class": max_train_per_class, "max_test_per_class": max_test_per_class,
        "shard_max_samples": shard_max_samples, "split_seed": SPLIT_SEED,
    }
    # Keys only present when used, so the specs of earlier builds compare equal.
    if order == "explicit":
        spec["class_order"] = list(ordered)
    if scenario != CLASS_IL:
        spec["scenario"] = scenario
    spec = json.loads(json.dumps(spec))  # normalise tuples etc. so comparisons are exact
    out = Path(out)
    known = _claim_output_dir(out, spec)

    jobs = _plan(data, task_classes, scenario, max_train_per_class, max_test_per_class, seed,
                 shard_max_samples)
    results = _run_jobs(jobs, data, storage, out, known, workers, progress,
                        (source, root, load_options))

    tasks = []
    for task_id, classes in enumerate(task_classes):
        shards = {split: [results[job.relpath] for job in jobs
                          if job.task_id == task_id and job.split == split]
                  for split in ("train", "test")}
        domain = data.domain_names[task_id] if scenario == DOMAIN_IL else None
        tasks.append(TaskSpec(task_id=task_id, classes=classes, train=shards["train"],
                              test=shards["test"], domain=domain))

    manifest = Manifest(source=source, n_classes=data.n_classes,
                        class_names=list(data.class_names), class_order=list(ordered),
                        order_seed=seed if order == "seeded" else None,
                        image_size=None if storage == ORIGINAL else storage,
                        channels=data.channels, tasks=tasks, build=spec, scenario=scenario,
                        root=str(out.resolve()))
    manifest.save(out)
    (out / BUILD_MARKER).unlink(missing_ok=True)
    (out / BUILD_JOURNAL).unlink(missing_ok=True)
    # Re-read through the validating loader, so what we return is exactly what readers get.
    return Manifest.load(out)


# ------------------------------------------------------------------ arguments
def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_args(n_tasks, seed, image_size, classes_per_task, order, max_train_per_class,
                max_test_per_class, shard_max_samples, scenario, workers) -> None:
    problems = []
    if scenario not in SCENARIOS:
        problems.append(f"scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    if scenario == CLASS_IL and classes_per_task is None and not _positive(n_tasks):
        problems.append(f"n_tasks must be a positive integer, got {n_tasks!r}")
    if classes_per_task is not None and (not list(classes_per_task)
                                         or not all(_positive(c) for c in classes_per_task)):
        problems.append(f"classes_per_task must be a non-empty list of positive integers, "
                        f"got {classes_per_task!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append(f"seed must be an integer, got {seed!r}")
    if image_size is not None and image_size != ORIGINAL and not _positive(image_size):
        problems.append(f"image_size must be a positive integer, {ORIGINAL!r} or None, got "
                        f"{image_size!r}")
    if order not in ORDERS:
        problems.append(f"order must be one of {', '.join(ORDERS[:2])}, got {order!r}")
    for name, value in (("max_train_per_class", max_train_per_class),
                        ("max_test_per_class", max_test_per_class)):
        if value is not None and not _positive(value):
            problems.append(f"{name} must be a positive integer or None, got {value!r}")
    if not _positive(shard_max_samples):
        problems.append(f"shard_max_samples must be a positive integer, got "
                        f"{shard_max_samples!r}")
    if not _positive(workers):
        problems.append(f"workers must be a positive integer, got {workers!r}")
    if problems:
        raise DataError("cannot build the dataset: " + "; ".join(problems))


def _class_order(data: SourceData, order: str, seed: int,
                 explicit: Sequence[int | str] | None) -> list[int]:
    n_classes = data.n_classes
    if order == "natural":
        return list(range(n_classes))
    if order == "seeded":
        return [int(c) for c in np.random.default_rng(seed).permutation(n_classes)]
    by_name = {name: i for i, name in enumerate(data.class_names)}
    ids = []
    for item in explicit:
        if isinstance(item, str) and item in by_name:
            ids.append(by_name[item])
        elif isinstance(item, str) and item.strip().lstrip("-").isdigit():
            ids.append(int(item))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            ids.append(int(item))
        else:
            raise DataError(f"class order: {item!r} is neither a class id (0..{n_classes - 1}) "
                            f"nor a class name of source {data.name!r}")
    outside = [c for c in ids if not 0 <= c < n_classes]
    repeated = sorted({c for c in ids if ids.count(c) > 1})
    missing = sorted(set(range(n_classes)) - set(ids))
    if outside or repeated or missing:
        details = "; ".join(part for part in (
            f"outside 0..{n_classes - 1}: {outside[:10]}" if outside else "",
            f"repeated: {repeated[:10]}" if repeated else "",
            f"missing: {missing[:10]}{' ...' if len(missing) > 10 else ''}" if missing else "",
        ) if part)
        raise DataError(f"class order must list each of the {n_classes} classes of source "
                        f"{data.name!r} exactly once ({details})")
    return ids


def _split_into_tasks(class_order: list[int], n_tasks: int,
                      classes_per_task: Sequence[int] | None) -> list[list[int]]:
    n_classes = len(class_order)
    if classes_per_task is None:
        if n_classes % n_tasks:
            raise DataError(f"{n_classes} classes cannot be split into {n_tasks} equal tasks; "
                            f"choose a number of tasks that divides {n_classes} or give "
                            f"classes_per_task explicitly")
        sizes = [n_classes // n_tasks] * n_tasks
    else:
        sizes = [int(c) for c in classes_per_task]
        if sum(sizes) > n_classes:
            raise DataError(f"classes_per_task {sizes} asks for {sum(sizes)} classes but the "
                            f"source has {n_classes}")
    tasks, start = [], 0
    for size in sizes:
        tasks.append(class_order[start:start + size])
        start += size
    return tasks


def _storage(data: SourceData, source: str, image_size: int | str | None) -> int | str:
    """The stored side in pixels, or ORIGINAL."""
    if image_size == ORIGINAL or (image_size is None and data.store_originals):
        if data.train.load_file is None or data.test.load_file is None:
            raise DataError(f"source {source!r} does not read image files, so it has no "
                            f"originals to store; pass --image-size PX")
        return ORIGINAL
    stored = image_size or data.native_size
    if stored is None:
        raise DataError(f"the images of source {source!r} differ in size or are not square; "
                        f"pass --image-size PX to store them at PX x PX (or --image-size "
                        f"{ORIGINAL} to keep the files as they are)")
    return stored


# --------------------------------------------------------------- output dir
def _existing_spec(out: Path) -> dict[str, Any] | None:
    """The build spec of whatever cldist dataset (finished or interrupted) is in `out`."""
    if (out / MANIFEST_NAME).is_file():
        return Manifest.load(out).build
    marker = out / BUILD_MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    return None


def _known_shards(out: Path) -> dict[str, dict[str, Any]]:
    """Shards a previous build of the same spec wrote: relpath -> {sha256, n_samples}."""
    known: dict[str, dict[str, Any]] = {}
    if (out / MANIFEST_NAME).is_file():
        for task in Manifest.load(out).tasks:
            for shard in task.train + task.test:
                known[shard.path] = {"sha256": shard.sha256, "n_samples": shard.n_samples}
    journal = out / BUILD_JOURNAL
    if journal.is_file():
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                known[entry["path"]] = {"sha256": entry["sha256"],
                                        "n_samples": entry["n_samples"]}
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the crash that interrupted the build
    return known


def _claim_output_dir(out: Path, spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Claim `out` for `spec`; return the shards an earlier build of the same spec left."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    known: dict[str, dict[str, Any]] = {}
    if out.is_dir() and any(out.iterdir()):
        try:
            existing = _existing_spec(out)
        except DataError as exc:
            raise DataError(f"--out {out} holds a dataset whose manifest is invalid; delete it "
                            f"or choose another --out.\n{exc}") from None
        if existing is None:
            raise DataError(f"--out {out} is not empty and holds no cldist dataset; choose a "
                            f"new or empty directory")
        if existing != spec:
            changed = sorted(k for k in set(existing) | set(spec)
                             if existing.get(k) != spec.get(k))
            details = ", ".join(f"{k}: {existing.get(k)!r} there vs {spec.get(k)!r} now"
                                for k in changed)
            raise DataError(f"--out {out} already holds a different dataset ({details}); "
                            f"choose another --out or delete {out} first")
        known = _known_shards(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / BUILD_MARKER, json.dumps(spec, indent=2) + "\n")
    return known


# ------------------------------------------------------------------ planning
def _plan(data: SourceData, task_classes: list[list[int]], scenario: str,
          max_train: int | None, max_test: int | None, seed: int,
          shard_max_samples: int) -> list[_Job]:
    """Every shard of every task and split, with the source samples it holds, in order."""
    jobs = []
    for task_id, classes in enumerate(task_classes):
        domain = task_id if scenario == DOMAIN_IL else None
        for split, split_data, cap in (("train", data.train, max_train),
                                       ("test", data.test, max_test)):
            indices = _task_indices(data, split, split_data, task_id, classes, cap, seed,
                                    domain)
            for index, start in enumerate(range(0, len(indices), shard_max_samples)):
                jobs.append(_Job(task_id, split, index,
                                 indices[start:start + shard_max_samples]))
    return jobs


def _task_indices(data: SourceData, split: str, split_data: SplitData, task_id: int,
                  classes: list[int], cap: int | None, seed: int,
                  domain: int | None) -> np.ndarray:
    """One task's samples of one split: subsampled per class, then mixed."""
    chosen = []
    for class_id in classes:
        member = split_data.labels == class_id
        if domain is not None:
            member &= split_data.domains == domain
        members = np.flatnonzero(member)
        if len(members) == 0:
            where = f" in domain {data.domain_names[domain]!r}" if domain is not None else ""
            raise DataError(f"source {data.name!r}: class {class_id} "
                            f"({data.class_names[class_id]}) has no {split} images{where}")
        if cap is not None and len(members) > cap:
            # Class-IL keeps its original seed words, so earlier builds stay byte-identical.
            words = [seed, _SPLIT_STREAM[split], class_id]
            rng = np.random.default_rng(words if domain is None else words + [domain])
            members = np.sort(rng.choice(members, size=cap, replace=False))
        chosen.append(members)
    indices = np.concatenate(chosen)
    return indices[np.random.default_rng(
        [seed, _SPLIT_STREAM[split], 1_000_000 + task_id]).permutation(len(indices))]


def _sample_key(split: str, index: int) -> str:
    # The key carries the sample's index in the source split, for traceability.
    return f"{split}-{index:08d}"


# ------------------------------------------------------------------- writing
def _encode(data: SourceData, split: str, index: int, storage: int | str) -> tuple[bytes, str]:
    """(image bytes, member extension) of one sample as it is stored."""
    split_data = data.train if split == "train" else data.test
    if storage == ORIGINAL:
        return _original(data, split, split_data, index)
    image = split_data.load_image(index)
    if image.size != (storage, storage):
        image = image.resize((storage, storage), Image.BILINEAR)
    return encode_png(image), "png"


def _original(data: SourceData, split: str, split_data: SplitData,
              index: int) -> tuple[bytes, str]:
    """The file's own bytes when they decode as JPEG/PNG/WebP (checked exactly as readers
    will decode them), else a PNG re-encoding."""
    raw = split_data.load_file(index)
    what = split_data.name_of(index) if split_data.name_of is not None \
        else f"source {data.name!r} {split} sample {index}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as probe:
                ext = _ORIGINAL_EXTENSIONS.get(probe.format)
            if ext is not None:
                with Image.open(io.BytesIO(raw), formats=[STORED_IMAGE_FORMATS[ext]]) as image:
                    image.load()
                return raw, ext
            image = Image.open(io.BytesIO(raw))
            image.load()
    except Exception as exc:  # PIL raises many types for bad files
        raise DataError(f"cannot decode image {what}: {exc}") from None
    colour = image.mode not in ("1", "L", "LA", "I", "I;16", "F")
    return encode_png(image.convert("RGB" if colour else "L")), "png"


def _write_job(data: SourceData, storage: int | str, out: Path, job: _Job) -> ShardInfo:
    split_data = data.train if job.split == "train" else data.test

    def samples() -> Iterator[tuple[str, bytes, int, str]]:
        for index in job.samples:
            index = int(index)
            payload, ext = _encode(data, job.split, index, storage)
            yield _sample_key(job.split, index), payload, int(split_data.labels[index]), ext

    target = out / job.relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    count = write_shard(target, samples())
    return ShardInfo(path=job.relpath, sha256=sha256_file(target), n_samples=count)


def _reusable(out: Path, job: _Job, data: SourceData, known: dict[str, dict[str, Any]]
              ) -> ShardInfo | None:
    """The shard an earlier build left for `job`, if it verifies and holds the planned
    samples (same keys and labels, in order)."""
    entry = known.get(job.relpath)
    path = out / job.relpath
    if entry is None or entry.get("n_samples") != len(job.samples) or not path.is_file():
        return None
    if sha256_file(path) != entry.get("sha256"):
        return None
    labels = (data.train if job.split == "train" else data.test).labels
    planned = [(_sample_key(job.split, int(i)), int(labels[int(i)])) for i in job.samples]
    if read_shard_index(path) != planned:
        return None
    return ShardInfo(path=job.relpath, sha256=entry["sha256"], n_samples=len(job.samples))


# Set in the parent before a fork pool starts (children inherit it), or by `_init_worker`.
_WORKER: tuple[SourceData, int | str, Path] | None = None


def _init_worker(source_args: tuple, storage: int | str, out: Path) -> None:
    global _WORKER
    source, root, options = source_args
    _WORKER = (load_source(source, root, **options), storage, out)


def _pool_job(job: _Job) -> ShardInfo:
    data, storage, out = _WORKER
    return _write_job(data, storage, out, job)


def _run_jobs(jobs: list[_Job], data: SourceData, storage: int | str, out: Path,
              known: dict[str, dict[str, Any]], workers: int, progress: ProgressFn | None,
              source_args: tuple) -> dict[str, ShardInfo]:
    """Write (or keep) every shard; return relpath -> ShardInfo."""
    results: dict[str, ShardInfo] = {}
    total_samples = sum(len(job.samples) for job in jobs)
    done_samples = 0
    journal = open(out / BUILD_JOURNAL, "a", encoding="utf-8")

    def finished(job: _Job, info: ShardInfo, record: bool = True) -> None:
        nonlocal done_samples
        results[job.relpath] = info
        if record:  # one whole line per shard, flushed: a crash loses at most this line
            journal.write(json.dumps(info.to_dict()) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
        done_samples += info.n_samples
        if progress is not None:
            progress(len(results), len(jobs), done_samples, total_samples)

    try:
        todo = []
        for job in jobs:
            kept = _reusable(out, job, data, known) if known else None
            if kept is not None:
                finished(job, kept, record=False)
            else:
                todo.append(job)
        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                finished(job, _write_job(data, storage, out, job))
        else:
            _run_pool(todo, data, storage, out, workers, finished, source_args)
    finally:
        journal.close()
    return results


def _run_pool(jobs: list[_Job], data: SourceData, storage: int | str, out: Path,
              workers: int, finished: Callable[[_Job, ShardInfo], None],
              source_args: tuple) -> None:
    global _WORKER
    if "fork" in multiprocessing.get_all_start_methods():
        # Children inherit the opened source: nothing is re-read or pickled per worker.
        context, initializer, initargs = multiprocessing.get_context("fork"), None, ()
        _WORKER = (data, storage, out)
    else:
        context = multiprocessing.get_context("spawn")
        initializer, initargs = _init_worker, (source_args, storage, out)
    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context,
                               initializer=initializer, initargs=initargs)
    try:
        pending = {pool.submit(_pool_job, job): job for job in jobs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                job = pending.pop(future)
                finished(job, future.result())  # re-raises a worker's DataError here
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _WORKER = None


# ------------------------------------------------------------------ progress
class LineProgress:
    """Build progress for a text stream: one line rewritten in place on a terminal; on a file
    or pipe, a new line every `every_s` seconds, every 10%, and at the end (never a carriage
    return, so logs stay readable)."""

    def __init__(self, stream: TextIO | None = None, label: str = "data",
                 every_s: float = 30.0):
        self.stream = stream if stream is not None else sys.stderr
        self.label, self.every_s = label, every_s
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.last_time, self.last_decile = self.start, -1

    def __call__(self, done: int, total: int, samples: int, total_samples: int) -> None:
        now = time.monotonic()
        elapsed = now - self.start
        rate = samples / elapsed if elapsed > 0 else 0.0
        eta = (total_samples - samples) / rate if rate > 0 else 0.0
        percent = 100.0 * samples / total_samples if total_samples else 100.0
        line = (f"[{self.label}] {done}/{total} shards  {samples}/{total_samples} samples "
                f"({percent:.0f}%)  {rate:.0f} samples/s  eta {eta:.0f}s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == total else ""))
            self.stream.flush()
            return
        decile = int(percent // 10)
        if done == total or decile > self.last_decile or now - self.last_time >= self.every_s:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_time, self.last_decile = now, decile

