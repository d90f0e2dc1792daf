"""Reading one task's split of a manifest, safely: `TaskReader`.

A `TaskReader` is built once from what every read shares - the manifest, task, split, image
transform, shuffle and its seed, this rank and the world size, checksum verification, the
shuffle buffer and the shard cache - and read through one of its views:
- `samples(epoch)`: this rank's share as undecoded `RawSample`s;
- `batches(batch_size, epoch, drop_last)`: `(images N,C,H,W float, stream labels N long)`;
- `tensors()`: the whole share in memory, in shard order unless shuffled;
- `dataset(epoch)`: a torch IterableDataset of `(image, stream label)` that also splits by
  DataLoader worker (`set_epoch` before each epoch reshuffles).

Reading: `cldist.data.remote.open_shard` opens a shard (a local path, or a URL its manifest's
`allowed_hosts` allow - never a command), checked against its manifest sha256 first when
`verify_checksums` is true (remote shards kept in the shard cache directory `cache_dir`,
default $CLDIST_SHARD_CACHE), and `cldist.data.shards.iter_shard` walks it strictly: a plain
tar of bounded regular members, every sample exactly one image and one `cls` label, anything
else a `DataError` naming the shard and the key. Nothing is ever unpickled.

Splitting across ranks (and DataLoader workers): every rank reads *all* shards of the task,
in the same order and through the same seeded shuffle, and keeps the samples whose position
in that common stream is `rank (mod world_size)`. The stream is identical on every rank, so
ranks never overlap and together see every sample exactly once, whatever the number of
shards. The cost is that each rank reads (but does not decode) the other ranks' samples,
which is cheap next to image decoding. With `drop_last=True` every rank yields the same
number of batches, `(n // world_size) // batch_size` (what synchronous data-parallel training
needs); with `drop_last=False` every sample is yielded once and ranks may differ by a batch.

Shuffling: shard order and a streaming shuffle buffer, both seeded from (seed, epoch, task,
split) only, so a run is reproducible and every rank agrees on the order.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from cldist.data.manifest import SPLITS, Manifest
from cldist.data.remote import default_cache_dir, open_shard
from cldist.data.shards import RawSample, decode_image, iter_shard

DEFAULT_SHUFFLE_BUFFER = 2000
_SPLIT_STREAM = {"train": 1, "test": 2}


def _buffered_shuffle(items: Iterable, buffer_size: int,
                      rng: np.random.Generator) -> Iterator:
    """A deterministic streaming shuffle: same input and rng state give the same order."""
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = int(rng.integers(len(buffer)))
        yield buffer[slot]
        buffer[slot] = item
    for slot in rng.permutation(len(buffer)):
        yield buffer[int(slot)]


@dataclass(frozen=True)
class TaskReader:
    """This rank's share of task `task_id`'s `split` (see the module docstring).

    transform: PIL image -> tensor (`cldist.data.transforms.make_transform`); needed by every
    view that decodes images. cache_dir: where remote shards are kept between reads (default
    $CLDIST_SHARD_CACHE; None and unset: downloaded on every read). Local shards are read in
    place. Labels are stream labels (`manifest.stream_label`).
    """

    manifest: Manifest
    task_id: int
    split: str
    transform: Callable[[Image.Image], torch.Tensor] | None = None
    shuffle: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    verify_checksums: bool = True
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    cache_dir: str | os.PathLike | None = None

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, "
                             f"world_size={self.world_size}")

    # ------------------------------------------------------------------ views
    def samples(self, epoch: int = 0) -> Iterator[RawSample]:
        """This rank's share, undecoded, in the order of `epoch`'s seeded shuffle."""
        task = self.manifest.task(self.task_id)
        shards = task.shards(self.split)
        allowed = set(task.classes)
        rng = np.random.default_rng([self.seed, epoch, self.task_id, _SPLIT_STREAM[self.split]])
        order = rng.permutation(len(shards)) if self.shuffle else range(len(shards))
        cache = self.cache_dir if self.cache_dir is not None else default_cache_dir()
        manifest = self.manifest

        def all_samples() -> Iterator[RawSample]:
            for index in order:
                shard = shards[int(index)]
                url = manifest.shard_url(shard)
                stream = open_shard(url, shard.sha256, self.verify_checksums, cache)
                yield from iter_shard(url, allowed, expected_count=shard.n_samples,
                                      stream=stream, max_member_bytes=manifest.max_member_bytes)

        def generate() -> Iterator[RawSample]:
            stream = all_samples()
            if self.shuffle and self.shuffle_buffer > 1:
                stream = _buffered_shuffle(stream, self.shuffle_buffer, rng)
            for position, sample in enumerate(stream):
                if position % self.world_size == self.rank:
                    yield sample

        return generate()

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches `batches(batch_size, drop_last=drop_last)` yields."""
        task = self.manifest.task(self.task_id)
        n = task.n_train if self.split == "train" else task.n_test
        if drop_last:
            return (n // self.world_size) // batch_size
        return -(-len(range(self.rank, n, self.world_size)) // batch_size)

    def batches(self, batch_size: int, epoch: int = 0, drop_last: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `(images N,C,H,W float, labels N long)`. With `drop_last` every rank yields
        the same number of batches (see the module docstring)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        samples = self.samples(epoch)
        limit = self.num_batches(batch_size, drop_last) if drop_last else None

        def generate() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            images: list[torch.Tensor] = []
            labels: list[int] = []
            produced = 0
            if limit == 0:
                return
            for sample in samples:
                image, label = self._decode(sample)
                images.append(image)
                labels.append(label)
                if len(images) == batch_size:
                    yield torch.stack(images), torch.tensor(labels, dtype=torch.long)
                    images, labels = [], []
                    produced += 1
                    if limit is not None and produced >= limit:
                        return
            if images and not drop_last:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.long)

        return generate()

    def tensors(self, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole share in memory: `(images N,C,H,W, stream labels N)`."""
        decoded = [self._decode(sample) for sample in self.samples(epoch)]
        if not decoded:
            size = self.manifest.image_size or getattr(self.transform, "image_size", 0)
            return (torch.empty(0, self.manifest.channels, size, size),
                    torch.empty(0, dtype=torch.long))
        return (torch.stack([image for image, _ in decoded]),
                torch.tensor([label for _, label in decoded], dtype=torch.long))

    def dataset(self, epoch: int = 0) -> "TaskDataset":
        """A torch IterableDataset of `(image, stream label)` over this share."""
        return TaskDataset(self, epoch)

    def _decode(self, sample: RawSample) -> tuple[torch.Tensor, int]:
        if self.transform is None:
            raise ValueError("this TaskReader has no transform: give one to decode images")
        return self.transform(decode_image(sample)), self.manifest.stream_label(sample.label)


class TaskDataset(torch.utils.data.IterableDataset):
    """A `TaskReader`'s share as a torch IterableDataset of `(image, stream_label)`.

    Splits by DataLoader worker with the same position-mod rule the reader splits ranks by,
    so `DataLoader(reader.dataset(), batch_size=B, num_workers=W)` sees every sample of this
    rank exactly once. Call `set_epoch` before each epoch to reshuffle.
    """

    def __init__(self, reader: TaskReader, epoch: int = 0):
        super().__init__()
        self.reader, self.epoch = reader, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        part = dataclasses.replace(self.reader, rank=self.reader.rank * workers + worker,
                                   world_size=self.reader.world_size * workers)
        for sample in part.samples(self.epoch):
            yield part._decode(sample)
