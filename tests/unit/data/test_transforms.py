"""The image pipelines (cldist.data.transforms): random-resized crop and flip, resize then
centre crop, the default unchanged, and the scenario keys that choose them."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from cldist.data import Manifest, make_transform
from cldist.errors import ConfigError


# ---------------------------------------------------------------- transforms
def test_random_resized_crop_and_flip():
    image = Image.fromarray(np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3) % 251)
    transform = make_transform(16, 3, train=True, augment=True, crop="random_resized")
    torch.manual_seed(0)
    draws = [transform(image) for _ in range(8)]
    assert all(d.shape == (3, 16, 16) for d in draws)
    assert len({d.sum().item() for d in draws}) > 1  # the crop (and flip) vary
    torch.manual_seed(0)
    assert all(torch.equal(d, transform(image)) for d in draws)
    # No zero padding ever shows (unlike the CIFAR-style crop).
    white = Image.new("RGB", (40, 30), (255, 255, 255))
    assert all(bool((transform(white) == 1).all()) for _ in range(5))
    flip_only = make_transform(16, 3, train=True, augment=True, crop="none")
    assert bool((flip_only(white) == 1).all())


def test_resize_then_centre_crop():
    array = np.zeros((20, 40), np.uint8)
    array[:, 20:] = 255  # left half black, right half white
    out = make_transform(16, 1, resize=20)(Image.fromarray(array))
    assert out.shape == (1, 16, 16)
    # Shorter side already 20: the central 16 columns are 8 black then 8 white.
    assert torch.equal(out[0, 0], torch.tensor([0.0] * 8 + [1.0] * 8))
    assert make_transform(16, 1, resize=32)(Image.fromarray(array)).shape == (1, 16, 16)
    with pytest.raises(ValueError, match="at least image_size"):
        make_transform(16, 1, resize=12)
    with pytest.raises(ValueError, match="crop must be one of"):
        make_transform(16, 1, crop="centre")


def test_default_transform_unchanged_by_new_options():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(
        np.uint8))
    torch.manual_seed(5)
    old = make_transform(16, 3, mean=[0.5], std=[0.25], train=True, augment=True)(image)
    torch.manual_seed(5)
    new = make_transform(16, 3, mean=[0.5], std=[0.25], train=True, augment=True,
                         crop="random", resize=None)(image)
    assert torch.equal(old, new)


def test_scenario_keys_reach_the_transforms(imagenet_r):
    from cldist.config.schema import RunConfig
    from cldist.assemble import transforms

    cfg = RunConfig()
    cfg.scenario.image_size, cfg.scenario.normalize = 224, "none"
    cfg.scenario.train_crop, cfg.scenario.test_resize = "random_resized", 256
    train, test = transforms(cfg, Manifest.load(imagenet_r))
    assert (train.augment, train.crop, train.mean) == (True, "random_resized", None)
    assert (test.augment, test.resize, test.image_size) == (False, 256, 224)
    cfg.scenario.train_crop = "zoom"
    with pytest.raises(ConfigError, match="scenario.train_crop=zoom"):
        transforms(cfg, Manifest.load(imagenet_r))

