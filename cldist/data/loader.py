"""Streaming a task's shards into tensors, safely.

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

import math
import os
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from cldist.data.manifest import SPLITS, Manifest
from cldist.data.remote import default_cache_dir, open_shard
from cldist.data.shards import RawSample, decode_image, iter_shard

DEFAULT_SHUFFLE_BUFFER = 2000
_SPLIT_STREAM = {"train": 1, "test": 2}


# ------------------------------------------------------------ task streaming
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


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                         f"world_size={world_size}")


def iter_task_samples(manifest: Manifest, task_id: int, split: str, *, shuffle: bool = False,
                      seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                      verify_checksums: bool = True,
                      shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                      cache_dir: str | os.PathLike | None = None) -> Iterator[RawSample]:
    """This rank's share of one task's split, as undecoded samples (see the module doc).

    cache_dir: where remote shards are kept between reads (default $CLDIST_SHARD_CACHE; None
    and unset: downloaded on every read). Local shards are read in place.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_rank(rank, world_size)
    task = manifest.task(task_id)
    shards = task.shards(split)
    allowed = set(task.classes)
    rng = np.random.default_rng([seed, epoch, task_id, _SPLIT_STREAM[split]])
    order = rng.permutation(len(shards)) if shuffle else range(len(shards))
    cache = cache_dir if cache_dir is not None else default_cache_dir()

    def all_samples() -> Iterator[RawSample]:
        for index in order:
            shard = shards[int(index)]
            url = manifest.shard_url(shard)
            stream = open_shard(url, shard.sha256, verify_checksums, cache)
            yield from iter_shard(url, allowed, expected_count=shard.n_samples, stream=stream,
                                  max_member_bytes=manifest.max_member_bytes)

    def generate() -> Iterator[RawSample]:
        stream = all_samples()
        if shuffle and shuffle_buffer > 1:
            stream = _buffered_shuffle(stream, shuffle_buffer, rng)
        for position, sample in enumerate(stream):
            if position % world_size == rank:
                yield sample

    return generate()


def rank_sample_count(n_samples: int, rank: int, world_size: int) -> int:
    """How many of `n_samples` stream positions fall to `rank`."""
    _check_rank(rank, world_size)
    return len(range(rank, n_samples, world_size))


def num_batches(manifest: Manifest, task_id: int, split: str, batch_size: int, rank: int = 0,
                world_size: int = 1, drop_last: bool = False) -> int:
    """How many batches `task_batches` yields with these arguments."""
    n = manifest.task(task_id).n_train if split == "train" else manifest.task(task_id).n_test
    if drop_last:
        return (n // world_size) // batch_size
    return -(-rank_sample_count(n, rank, world_size) // batch_size)


def task_batches(manifest: Manifest, task_id: int, split: str, batch_size: int,
                 transform: Callable[[Image.Image], torch.Tensor], shuffle: bool = False,
                 seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, verify_checksums: bool = True,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 cache_dir: str | os.PathLike | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches `(images N,C,H,W float, labels N long)` of this rank's share of a task.

    Labels are stream labels (`manifest.stream_label`). See the module docstring for how
    ranks split the data and what `drop_last` guarantees.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    samples = iter_task_samples(manifest, task_id, split, shuffle=shuffle, seed=seed,
                                epoch=epoch, rank=rank, world_size=world_size,
                                verify_checksums=verify_checksums,
                                shuffle_buffer=shuffle_buffer, cache_dir=cache_dir)
    limit = num_batches(manifest, task_id, split, batch_size, rank, world_size, drop_last) \
        if drop_last else None

    def generate() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images: list[torch.Tensor] = []
        labels: list[int] = []
        produced = 0
        if limit == 0:
            return
        for sample in samples:
            images.append(transform(decode_image(sample)))
            labels.append(manifest.stream_label(sample.label))
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.long)
                images, labels = [], []
                produced += 1
                if limit is not None and produced >= limit:
                    return
        if images and not drop_last:
            yield torch.stack(images), torch.tensor(labels, dtype=torch.long)

    return generate()


def load_task_tensors(manifest: Manifest, task_id: int, split: str,
                      transform: Callable[[Image.Image], torch.Tensor],
                      verify_checksums: bool = True,
                      cache_dir: str | os.PathLike | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole task's split in memory: `(images N,C,H,W, stream labels N)`, in shard order."""
    images, labels = [], []
    for sample in iter_task_samples(manifest, task_id, split,
                                    verify_checksums=verify_checksums, cache_dir=cache_dir):
        images.append(transform(decode_image(sample)))
        labels.append(manifest.stream_label(sample.label))
    if not images:
        size = manifest.image_size or getattr(transform, "image_size", 0)
        return torch.empty(0, manifest.channels, size, size), torch.empty(0, dtype=torch.long)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


class TaskStream(torch.utils.data.IterableDataset):
    """One task's split as a torch IterableDataset of `(image, stream_label)`.

    Splits by rank and by DataLoader worker with the same position-mod rule as
    `task_batches`, so `DataLoader(TaskStream(...), batch_size=B, num_workers=W)` sees every
    sample of this rank exactly once. Call `set_epoch` before each epoch to reshuffle.
    """

    def __init__(self, manifest: Manifest, task_id: int, split: str,
                 transform: Callable[[Image.Image], torch.Tensor], shuffle: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 verify_checksums: bool = True, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 cache_dir: str | os.PathLike | None = None):
        super().__init__()
        _check_rank(rank, world_size)
        self.manifest, self.task_id, self.split = manifest, task_id, split
        self.transform, self.shuffle, self.seed = transform, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.verify_checksums, self.shuffle_buffer = verify_checksums, shuffle_buffer
        self.cache_dir = cache_dir
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        for sample in iter_task_samples(
                self.manifest, self.task_id, self.split, shuffle=self.shuffle,
                seed=self.seed, epoch=self.epoch, rank=self.rank * workers + worker,
                world_size=self.world_size * workers, verify_checksums=self.verify_checksums,
                shuffle_buffer=self.shuffle_buffer, cache_dir=self.cache_dir):
            yield self.transform(decode_image(sample)), self.manifest.stream_label(sample.label)


# ---------------------------------------------------------------- transforms
TRAIN_CROPS = ("random", "random_resized", "none")


class ImageTransform:
    """PIL image -> float tensor C x H x W in [0, 1], resized, optionally augmented/normalised.

    Training augmentation (`train and augment`), by `crop`:
    - "random": resize to image_size square, zero-pad by image_size // 8, random crop back,
      horizontal flip (CIFAR-style; the default);
    - "random_resized": a random crop of 8-100% of the original image's area with aspect
      ratio in [3/4, 4/3], resized to image_size square, horizontal flip (the ImageNet-style
      pipeline the LoRA papers train ViTs with);
    - "none": resize to image_size square, horizontal flip only.
    Otherwise (evaluation, or no augmentation): resize to image_size square; or, with
    `resize`, resize the shorter side to `resize` keeping the aspect ratio and take the
    central image_size square (the papers' Resize(256) + CenterCrop(224)).

    A class rather than a closure so DataLoader workers can pickle it. Augmentation draws from
    torch's global RNG, so `torch.manual_seed` makes it reproducible.
    """

    def __init__(self, image_size: int, channels: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, train: bool = False,
                 augment: bool = False, crop: str = "random", resize: int | None = None,
                 scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if crop not in TRAIN_CROPS:
            raise ValueError(f"crop must be one of {', '.join(TRAIN_CROPS)}, got {crop!r}")
        if resize is not None and int(resize) < int(image_size):
            raise ValueError(f"resize ({resize}) must be at least image_size ({image_size}): "
                             f"the centre crop is taken from the resized image")
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                             f"got scale={scale}, ratio={ratio}")
        self.image_size, self.channels = int(image_size), channels
        self.augment = bool(train and augment)
        self.crop = crop
        self.resize = int(resize) if resize is not None else None
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), \
            (float(ratio[0]), float(ratio[1]))
        self.padding = max(1, self.image_size // 8)  # 4 px at 32 px, as in CIFAR training
        self.mean = self.std = None
        if mean is not None:
            self.mean = self._per_channel(mean, "mean")
            self.std = self._per_channel(std, "std")
            if bool((self.std <= 0).any()):
                raise ValueError(f"std must be positive, got {list(std)}")

    def _per_channel(self, values: Sequence[float], name: str) -> torch.Tensor:
        values = [float(v) for v in values]
        if len(values) == 1:
            values = values * self.channels
        if len(values) != self.channels:
            raise ValueError(f"{name} needs 1 or {self.channels} values, got {len(values)}")
        return torch.tensor(values).view(-1, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB" if self.channels == 3 else "L")
        size = (self.image_size, self.image_size)
        if self.augment and self.crop == "random_resized":
            left, top, width, height = self._random_resized_box(*image.size)
            image = image.resize(size, Image.BILINEAR,
                                 box=(left, top, left + width, top + height))
        elif not self.augment and self.resize is not None:
            image = self._resize_centre_crop(image)
        elif image.size != size:
            image = image.resize(size, Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        if self.augment:
            if self.crop == "random":
                tensor = self._random_crop_flip(tensor)
            else:
                tensor = self._flip(tensor)
        if self.mean is not None:
            tensor = (tensor - self.mean) / self.std
        return tensor

    def _random_crop_flip(self, tensor: torch.Tensor) -> torch.Tensor:
        pad, size = self.padding, self.image_size
        padded = torch.nn.functional.pad(tensor, (pad, pad, pad, pad))
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        tensor = padded[:, top:top + size, left:left + size]
        if bool(torch.rand(()) < 0.5):
            tensor = tensor.flip(-1)
        return tensor.contiguous()

    @staticmethod
    def _flip(tensor: torch.Tensor) -> torch.Tensor:
        if bool(torch.rand(()) < 0.5):
            tensor = tensor.flip(-1).contiguous()
        return tensor

    def _random_resized_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, width, height) of a random crop with area fraction in `scale` and
        aspect ratio (log-uniform) in `ratio`; after 10 misses, the central crop whose aspect
        ratio is the nearest one allowed."""
        area = width * height
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * float(torch.empty(()).uniform_(*self.scale))
            aspect = math.exp(float(torch.empty(()).uniform_(log_low, log_high)))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, ()))
                left = int(torch.randint(0, width - w + 1, ()))
                return left, top, w, h
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, max(1, min(height, int(round(width / self.ratio[0]))))
        elif aspect > self.ratio[1]:
            w, h = max(1, min(width, int(round(height * self.ratio[1])))), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def _resize_centre_crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short = self.resize
        if width <= height:
            new = (short, max(short, int(short * height / width)))
        else:
            new = (max(short, int(short * width / height)), short)
        if new != image.size:
            image = image.resize(new, Image.BILINEAR)
        left = int(round((new[0] - self.image_size) / 2.0))
        top = int(round((new[1] - self.image_size) / 2.0))
        return image.crop((left, top, left + self.image_size, top + self.image_size))

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, channels={self.channels}, "
                f"augment={self.augment}, crop={self.crop!r}, resize={self.resize}, "
                f"normalise={self.mean is not None})")


def make_transform(image_size: int, channels: int = 3, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, train: bool = False,
                   augment: bool = False, crop: str = "random",
                   resize: int | None = None) -> ImageTransform:
    """The image transform (see ImageTransform): convert to `channels`, resize (or resize the
    shorter side to `resize` and centre-crop, when not augmenting), to a [0, 1] tensor, the
    `crop` augmentation + horizontal flip when `train and augment`, then normalise with
    `mean`/`std` when given. The defaults are the CIFAR-style pipeline of earlier releases."""
    return ImageTransform(image_size, channels, mean, std, train, augment, crop, resize)
