"""Data: webdataset shards for class- and domain-incremental streams.

- `build_dataset` turns a source (see `SOURCES`: digits, fashion_mnist, fmnist_digits, folder,
  imagenet_r, imagenet_a, domainnet, cifar100, cub200) into shards + manifest.
- `Manifest` describes a built dataset: class order, tasks, shards and their checksums.
- `TaskReader` reads a task safely (images and integer labels only, never pickle) from local
  paths or URLs, split across ranks without overlap or loss, as batches, in-memory tensors or
  a torch dataset.
- `make_transform` builds the image transform (torchvision.transforms.v2).
- `verify_dataset` checks every shard against the manifest.
"""
from cldist.data.build import build_dataset
from cldist.data.loader import TaskReader
from cldist.data.manifest import Manifest, ShardInfo, TaskSpec
from cldist.data.sources import SOURCES
from cldist.data.transforms import make_transform
from cldist.data.verify import verify_dataset

__all__ = [
    "Manifest", "ShardInfo", "TaskSpec", "SOURCES", "TaskReader", "build_dataset",
    "make_transform", "verify_dataset",
]
