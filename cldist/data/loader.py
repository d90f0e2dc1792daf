"""Streaming a task's shards into tensors, safely.

Reading: webdataset's gopen opens a shard (a local path or any URL webdataset reads) and its
tar iterator yields the members. Members are grouped into samples here, strictly: a sample
must be exactly one image (`png`/`jpg`/`jpeg`/`webp`, decoded with PIL restricted to that
format) and one `cls` (ASCII decimal class id). Any other member - `.pyd`, `.pkl`, `.pth`, a
name without an extension - is a `DataError` naming the shard and the key. Nothing is ever
unpickled. A label outside the task's classes, a truncated or corrupt tar, or a sample count
that differs from the manifest is likewise a `DataError` naming the shard.

Checksums: when `verify_checksums` is true, each shard's sha256 is checked against the
manifest once per process (cached by path, size and mtime) before its first read.

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

import hashlib
import io
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from cldist.data.manifest import SPLITS, Manifest
from cldist.errors import DataError

# Member extension -> the only PIL format allowed to decode it.
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
LABEL_EXTENSION = "cls"
DEFAULT_SHUFFLE_BUFFER = 2000
_SPLIT_STREAM = {"train": 1, "test": 2}
_LABEL_RE = re.compile(r"^\s*-?[0-9]+\s*$")

REBUILD_HINT = ("rebuild the dataset with `cldist data build` or run "
                 "`cldist data verify DIR` to list every damaged shard")


@dataclass(frozen=True)
class RawSample:
    """One sample as read from a shard: image bytes not yet decoded."""

    shard: str  # the shard's URL or path, for error messages
    key: str
    image_bytes: bytes
    image_format: str  # the PIL format name that may decode it
    label: int  # original class id


# ------------------------------------------------------------------ checksums
_verified_shards: dict[tuple, str] = {}


def _is_local(url: str) -> bool:
    return url.startswith("file:") or ("://" not in url and not url.startswith("pipe:"))


def _local_path(url: str) -> str:
    return re.sub(r"^file:(//)?", "", url)


def shard_sha256(url: str, chunk_size: int = 1 << 20) -> str:
    """The sha256 of a shard at a local path or URL (DataError if it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with gopen(_local_path(url) if _is_local(url) else url, "rb") as stream:
            while chunk := stream.read(chunk_size):
                digest.update(chunk)
    except FileNotFoundError:
        raise DataError(f"shard {url} is missing; {REBUILD_HINT}") from None
    except Exception as exc:
        raise DataError(f"shard {url} cannot be read ({exc}); {REBUILD_HINT}") from None
    return digest.hexdigest()


def verify_shard_checksum(url: str, expected_sha256: str) -> None:
    """Check a shard against its manifest sha256, once per process per (path, size, mtime)."""
    if _is_local(url):
        try:
            stat = os.stat(_local_path(url))
        except FileNotFoundError:
            raise DataError(f"shard {url} is missing; {REBUILD_HINT}") from None
        cache_key = (url, expected_sha256, stat.st_size, stat.st_mtime_ns)
    else:
        cache_key = (url, expected_sha256)
    if cache_key in _verified_shards:
        return
    actual = shard_sha256(url)
    if actual != expected_sha256:
        raise DataError(f"shard {url} fails its checksum (sha256 {actual[:16]}..., manifest "
                        f"says {expected_sha256[:16]}...): it is corrupt or changed since the "
                        f"build; {REBUILD_HINT}")
    _verified_shards[cache_key] = actual


# -------------------------------------------------------------- shard reading
def _parse_label(shard: str, key: str, data: bytes) -> int:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = None
    if text is None or not _LABEL_RE.match(text):
        raise DataError(f"shard {shard}: sample {key!r} has a 'cls' member that is not an "
                        f"ASCII integer ({data[:20]!r}); {REBUILD_HINT}")
    return int(text)


def _finish_sample(shard: str, key: str, members: dict[str, bytes],
                   allowed_classes: set[int] | None) -> RawSample:
    images = [ext for ext in members if ext in IMAGE_FORMATS]
    if len(images) != 1 or LABEL_EXTENSION not in members:
        raise DataError(f"shard {shard}: sample {key!r} must have exactly one image "
                        f"(png/jpg/jpeg/webp) and one 'cls' member, has "
                        f"{sorted(members) or 'none'}; {REBUILD_HINT}")
    label = _parse_label(shard, key, members[LABEL_EXTENSION])
    if allowed_classes is not None and label not in allowed_classes:
        raise DataError(f"shard {shard}: sample {key!r} has label {label}, which is not one "
                        f"of this task's classes {sorted(allowed_classes)}; {REBUILD_HINT}")
    return RawSample(shard=shard, key=key, image_bytes=members[images[0]],
                     image_format=IMAGE_FORMATS[images[0]], label=label)


def iter_shard(url: str, allowed_classes: Iterable[int] | None = None,
               expected_count: int | None = None) -> Iterator[RawSample]:
    """Yield the samples of one shard, validated but with images still encoded.

    Raises DataError (naming the shard) for unknown members, bad or foreign labels, a
    truncated/corrupt tar, or a sample count other than `expected_count`.
    """
    allowed = set(allowed_classes) if allowed_classes is not None else None
    seen_keys: set[str] = set()
    count = 0
    key, members = None, {}
    try:
        stream = gopen(_local_path(url) if _is_local(url) else url, "rb")
    except FileNotFoundError:
        raise DataError(f"shard {url} is missing; {REBUILD_HINT}") from None
    except Exception as exc:
        raise DataError(f"shard {url} cannot be opened ({exc}); {REBUILD_HINT}") from None
    try:
        for member in tar_file_iterator(stream, handler=reraise_exception):
            name = member["fname"]
            member_key, ext = base_plus_ext(name)
            if member_key is None:
                raise DataError(f"shard {url}: member {name!r} has no extension; cldist reads "
                                f"only images and 'cls' labels; {REBUILD_HINT}")
            ext = ext.lower()
            if ext not in IMAGE_FORMATS and ext != LABEL_EXTENSION:
                # Checked before anything is decoded: pickles and the like are never loaded.
                raise DataError(f"shard {url}: sample {member_key!r} has a member of type "
                                f"'.{ext}' ({name}); cldist reads only png/jpg/jpeg/webp "
                                f"images and 'cls' labels and never unpickles; "
                                f"{REBUILD_HINT}")
            if member_key != key:
                if key is not None:
                    yield _finish_sample(url, key, members, allowed)
                    count += 1
                if member_key in seen_keys:
                    raise DataError(f"shard {url}: key {member_key!r} appears in two places; "
                                    f"{REBUILD_HINT}")
                seen_keys.add(member_key)
                key, members = member_key, {}
            if ext in members:
                raise DataError(f"shard {url}: sample {key!r} has two '.{ext}' members; "
                                f"{REBUILD_HINT}")
            members[ext] = member["data"]
        if key is not None:
            yield _finish_sample(url, key, members, allowed)
            count += 1
    except DataError:
        raise
    except Exception as exc:  # tarfile/gzip/OS errors: the shard is truncated or corrupt
        reason = str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__
        raise DataError(f"shard {url} is truncated or corrupt ({type(exc).__name__}: "
                        f"{reason}); {REBUILD_HINT}") from None
    finally:
        stream.close()
    if expected_count is not None and count != expected_count:
        raise DataError(f"shard {url} holds {count} samples but the manifest says "
                        f"{expected_count}: it is truncated or was replaced; {REBUILD_HINT}")


def decode_image(sample: RawSample) -> Image.Image:
    """Decode a sample's image with the one PIL format its extension names."""
    try:
        image = Image.open(io.BytesIO(sample.image_bytes), formats=[sample.image_format])
        image.load()
    except Exception as exc:
        raise DataError(f"shard {sample.shard}: sample {sample.key!r}: its "
                        f"{sample.image_format} image cannot be decoded ({exc}); "
                        f"{REBUILD_HINT}") from None
    return image


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
                      shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> Iterator[RawSample]:
    """This rank's share of one task's split, as undecoded samples (see the module doc)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_rank(rank, world_size)
    task = manifest.task(task_id)
    shards = task.shards(split)
    allowed = set(task.classes)
    rng = np.random.default_rng([seed, epoch, task_id, _SPLIT_STREAM[split]])
    order = rng.permutation(len(shards)) if shuffle else range(len(shards))

    def all_samples() -> Iterator[RawSample]:
        for index in order:
            shard = shards[int(index)]
            url = manifest.shard_url(shard)
            if verify_checksums:
                verify_shard_checksum(url, shard.sha256)
            yield from iter_shard(url, allowed, expected_count=shard.n_samples)

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
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
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
                                shuffle_buffer=shuffle_buffer)
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
                      verify_checksums: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole task's split in memory: `(images N,C,H,W, stream labels N)`, in shard order."""
    images, labels = [], []
    for sample in iter_task_samples(manifest, task_id, split,
                                    verify_checksums=verify_checksums):
        images.append(transform(decode_image(sample)))
        labels.append(manifest.stream_label(sample.label))
    if not images:
        size = manifest.image_size
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
                 verify_checksums: bool = True, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):
        super().__init__()
        _check_rank(rank, world_size)
        self.manifest, self.task_id, self.split = manifest, task_id, split
        self.transform, self.shuffle, self.seed = transform, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.verify_checksums, self.shuffle_buffer = verify_checksums, shuffle_buffer
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
                shuffle_buffer=self.shuffle_buffer):
            yield self.transform(decode_image(sample)), self.manifest.stream_label(sample.label)


# ---------------------------------------------------------------- transforms
class ImageTransform:
    """PIL image -> float tensor C x H x W in [0, 1], resized, optionally augmented/normalised.

    A class rather than a closure so DataLoader workers can pickle it. Augmentation draws from
    torch's global RNG, so `torch.manual_seed` makes it reproducible.
    """

    def __init__(self, image_size: int, channels: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, train: bool = False,
                 augment: bool = False):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.image_size, self.channels = int(image_size), channels
        self.augment = bool(train and augment)
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
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        if self.augment:
            tensor = self._random_crop_flip(tensor)
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

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, channels={self.channels}, "
                f"augment={self.augment}, normalise={self.mean is not None})")


def make_transform(image_size: int, channels: int = 3, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, train: bool = False,
                   augment: bool = False) -> ImageTransform:
    """The image transform: convert to `channels`, resize to `image_size`, to [0, 1] tensor,
    random crop (padding image_size // 8) + horizontal flip when `train and augment`, then
    normalise with `mean`/`std` when given."""
    return ImageTransform(image_size, channels, mean, std, train, augment)
