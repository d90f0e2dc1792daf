"""Data: webdataset shards for class- and domain-incremental streams.

- `build_dataset` turns a source (see `SOURCES`: digits, fashion_mnist, fmnist_digits, folder,
  imagenet_r, imagenet_a, domainnet, cifar100, cub200) into shards + manifest.
- `Manifest` describes a built dataset: class order, tasks, shards and their checksums.
- `task_batches` / `load_task_tensors` / `TaskStream` read a task safely (images and integer
  labels only, never pickle) from local paths or URLs, split across ranks without overlap or
  loss.
- `verify_dataset` checks every shard against the manifest.
"""
from cldist.data.build import build_dataset
from cldist.data.loader import (
    TaskStream,
    iter_task_samples,
    load_task_tensors,
    make_transform,
    num_batches,
    task_batches,
)
from cldist.data.manifest import Manifest, ShardInfo, TaskSpec
from cldist.data.sources import SOURCES
from cldist.data.verify import verify_dataset

__all__ = [
    "Manifest", "ShardInfo", "TaskSpec", "SOURCES", "build_dataset", "make_transform",
    "task_batches", "load_task_tensors", "iter_task_samples", "num_batches", "TaskStream",
    "verify_dataset",
]
