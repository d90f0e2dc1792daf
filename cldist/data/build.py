"""Build a class-incremental dataset: source -> class order -> tasks -> shards + manifest.

`build_dataset` is what `cldist data build` calls. Everything is seeded: the class order
(`numpy.random.default_rng(seed).permutation`), per-class subsampling and the order of samples
inside each task's shards, so the same arguments give byte-identical shards (same sha256).
Samples are shuffled across classes at build time so that a streaming reader with a modest
shuffle buffer still sees mixed batches.

The output directory is claimed with a `.cldist-build.json` marker holding the build spec
before any shard is written: rebuilding (or resuming an interrupted build of) the same spec
into the same directory is allowed, anything else in a non-empty directory is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from cldist.atomic import write_text_atomic
from cldist.data.manifest import MANIFEST_NAME, Manifest, TaskSpec
from cldist.data.shards import encode_png, write_task_shards
from cldist.data.sources import SPLIT_SEED, SourceData, SplitData, load_source
from cldist.errors import DataError

BUILD_MARKER = ".cldist-build.json"
ORDERS = ("seeded", "natural")
# Distinct seed streams for the two splits, so train and test subsampling never correlate.
_SPLIT_STREAM = {"train": 1, "test": 2}


def build_dataset(source: str, out: str | os.PathLike, root: str | os.PathLike | None = None,
                  n_tasks: int = 5, seed: int = 1993, image_size: int | None = None,
                  classes_per_task: Sequence[int] | None = None, order: str = "seeded",
                  max_train_per_class: int | None = None,
                  max_test_per_class: int | None = None,
                  shard_max_samples: int = 1000) -> Manifest:
    """Write `out/{train,test}/task-TTT-SSSSSS.tar` and `out/manifest.json`; return the manifest.

    source: 'digits', 'fashion_mnist' or 'folder'; root: where the source's files are.
    n_tasks: split the (ordered) classes into this many equal tasks, unless
        `classes_per_task` lists the task sizes explicitly (then its length is the number of
        tasks and `n_tasks` is ignored; the sizes may sum to fewer than all classes).
    order: 'seeded' (permutation drawn from `seed`) or 'natural' (class ids ascending).
    image_size: store images resized to this square size; None keeps the native size.
    max_{train,test}_per_class: seeded per-class subsampling caps (None: keep all).
    shard_max_samples: at most this many samples per shard.
    """
    _check_args(n_tasks, seed, image_size, classes_per_task, order, max_train_per_class,
                max_test_per_class, shard_max_samples)
    data = load_source(source, root)
    class_order = _class_order(data.n_classes, order, seed)
    task_classes = _split_into_tasks(class_order, n_tasks, classes_per_task)
    stored_size = image_size or data.native_size
    if stored_size is None:
        raise DataError(f"the images of source {source!r} differ in size or are not square; "
                        f"pass --image-size PX to store them at PX x PX")

    spec = {
        "source": source, **data.identity, "n_tasks": len(task_classes), "seed": seed,
        "order": order, "image_size": stored_size,
        "classes_per_task": [len(c) for c in task_classes],
        "max_train_per_class": max_train_per_class, "max_test_per_class": max_test_per_class,
        "shard_max_samples": shard_max_samples, "split_seed": SPLIT_SEED,
    }
    spec = json.loads(json.dumps(spec))  # normalise tuples etc. so comparisons are exact
    out = Path(out)
    _claim_output_dir(out, spec)

    tasks = []
    for task_id, classes in enumerate(task_classes):
        shards = {}
        for split, split_data, cap in (("train", data.train, max_train_per_class),
                                       ("test", data.test, max_test_per_class)):
            samples = _task_samples(data, split, split_data, task_id, classes, cap, seed,
                                    stored_size)
            shards[split] = write_task_shards(out, split, task_id, samples, shard_max_samples)
        tasks.append(TaskSpec(task_id=task_id, classes=classes, train=shards["train"],
                              test=shards["test"]))

    manifest = Manifest(source=source, n_classes=data.n_classes,
                        class_names=list(data.class_names), class_order=class_order,
                        order_seed=seed if order == "seeded" else None,
                        image_size=stored_size, channels=data.channels, tasks=tasks,
                        build=spec, root=str(out.resolve()))
    manifest.save(out)
    (out / BUILD_MARKER).unlink(missing_ok=True)
    # Re-read through the validating loader, so what we return is exactly what readers get.
    return Manifest.load(out)


# ------------------------------------------------------------------ arguments
def _check_args(n_tasks, seed, image_size, classes_per_task, order, max_train_per_class,
                max_test_per_class, shard_max_samples) -> None:
    def positive(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    problems = []
    if classes_per_task is None and not positive(n_tasks):
        problems.append(f"n_tasks must be a positive integer, got {n_tasks!r}")
    if classes_per_task is not None and (not list(classes_per_task)
                                         or not all(positive(c) for c in classes_per_task)):
        problems.append(f"classes_per_task must be a non-empty list of positive integers, "
                        f"got {classes_per_task!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append(f"seed must be an integer, got {seed!r}")
    if image_size is not None and not positive(image_size):
        problems.append(f"image_size must be a positive integer or None, got {image_size!r}")
    if order not in ORDERS:
        problems.append(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    for name, value in (("max_train_per_class", max_train_per_class),
                        ("max_test_per_class", max_test_per_class)):
        if value is not None and not positive(value):
            problems.append(f"{name} must be a positive integer or None, got {value!r}")
    if not positive(shard_max_samples):
        problems.append(f"shard_max_samples must be a positive integer, got "
                        f"{shard_max_samples!r}")
    if problems:
        raise DataError("cannot build the dataset: " + "; ".join(problems))


def _class_order(n_classes: int, order: str, seed: int) -> list[int]:
    if order == "natural":
        return list(range(n_classes))
    return [int(c) for c in np.random.default_rng(seed).permutation(n_classes)]


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


def _claim_output_dir(out: Path, spec: dict[str, Any]) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
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
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / BUILD_MARKER, json.dumps(spec, indent=2) + "\n")


# ------------------------------------------------------------------ samples
def _task_samples(data: SourceData, split: str, split_data: SplitData, task_id: int,
                  classes: list[int], cap: int | None, seed: int,
                  stored_size: int) -> Iterator[tuple[str, bytes, int]]:
    """`(key, png, class_id)` for one task's split: subsampled, mixed, resized."""
    chosen = []
    for class_id in classes:
        members = np.flatnonzero(split_data.labels == class_id)
        if len(members) == 0:
            raise DataError(f"source {data.name!r}: class {class_id} "
                            f"({data.class_names[class_id]}) has no {split} images")
        if cap is not None and len(members) > cap:
            rng = np.random.default_rng([seed, _SPLIT_STREAM[split], class_id])
            members = np.sort(rng.choice(members, size=cap, replace=False))
        chosen.append(members)
    indices = np.concatenate(chosen)
    indices = indices[np.random.default_rng(
        [seed, _SPLIT_STREAM[split], 1_000_000 + task_id]).permutation(len(indices))]
    for index in indices:
        index = int(index)
        image = split_data.load_image(index)
        if image.size != (stored_size, stored_size):
            image = image.resize((stored_size, stored_size), Image.BILINEAR)
        # The key carries the sample's index in the source split, for traceability.
        yield f"{split}-{index:08d}", encode_png(image), int(split_data.labels[index])
