"""Image transforms: PIL image -> float tensor C x H x W, built from torchvision.transforms.v2.

Training augmentation (`train and augment`), by `crop`:
- "random": Resize to image_size square, RandomCrop back to it from a zero padding of
  image_size // 8, RandomHorizontalFlip (CIFAR-style; the default);
- "random_resized": RandomResizedCrop(image_size, scale, ratio) - a crop of 8-100% of the
  original image's area with aspect ratio in [3/4, 4/3] by default, resized to image_size
  square - and RandomHorizontalFlip (the ImageNet-style pipeline the LoRA papers train ViTs
  with);
- "none": Resize to image_size square, RandomHorizontalFlip only.
Otherwise (evaluation, or no augmentation): Resize to image_size square; or, with `resize`,
Resize(resize) of the shorter side keeping the aspect ratio and CenterCrop(image_size) (the
papers' Resize(256) + CenterCrop(224)). Then [0, 1] scaling and, with `mean`/`std`, Normalize.

Geometry runs on the PIL image (bilinear, as PIL resizes), so the pixels are PIL's; the uint8
image becomes float by division by 255. Augmentation draws from torch's global RNG, as
torchvision's transforms do, so `torch.manual_seed` makes it reproducible.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

TRAIN_CROPS = ("random", "random_resized", "none")


class ImageTransform:
    """The image transform of `make_transform` (see the module docstring).

    A class rather than a closure so DataLoader workers can pickle it.
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
            if any(s <= 0 for s in self.std):
                raise ValueError(f"std must be positive, got {list(std)}")
        self.geometry = v2.Compose(self._geometry())
        self.normalize = v2.Normalize(self.mean, self.std) if self.mean is not None else None

    def _per_channel(self, values: Sequence[float], name: str) -> list[float]:
        values = [float(v) for v in values]
        if len(values) == 1:
            values = values * self.channels
        if len(values) != self.channels:
            raise ValueError(f"{name} needs 1 or {self.channels} values, got {len(values)}")
        return values

    def _geometry(self) -> list:
        size = self.image_size
        square = v2.Resize((size, size))
        if not self.augment:
            if self.resize is not None:
                return [v2.Resize(self.resize), v2.CenterCrop(size)]
            return [square]
        flip = v2.RandomHorizontalFlip()
        if self.crop == "random_resized":
            return [v2.RandomResizedCrop(size, scale=self.scale, ratio=self.ratio), flip]
        if self.crop == "random":
            return [square, v2.RandomCrop(size, padding=self.padding), flip]
        return [square, flip]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = self.geometry(image.convert("RGB" if self.channels == 3 else "L"))
        tensor = v2.functional.pil_to_tensor(image).float().div_(255.0)
        return self.normalize(tensor) if self.normalize is not None else tensor

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, channels={self.channels}, "
                f"augment={self.augment}, crop={self.crop!r}, resize={self.resize}, "
                f"normalise={self.mean is not None})")


def make_transform(image_size: int, channels: int = 3, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, train: bool = False,
                   augment: bool = False, crop: str = "random",
                   resize: int | None = None) -> ImageTransform:
    """The image transform (see the module docstring): convert to `channels`, resize (or
    resize the shorter side to `resize` and centre-crop, when not augmenting), the `crop`
    augmentation + horizontal flip when `train and augment`, to a [0, 1] tensor, then
    normalise with `mean`/`std` when given. The defaults are the CIFAR-style pipeline of
    earlier releases."""
    return ImageTransform(image_size, channels, mean, std, train, augment, crop, resize)
