"""Synthetic image classes for long streams: as many classes as a 100-task stream needs.

The real small datasets that ship with packages have 10 classes each; a 100-task stream of 2
classes needs 200. `write_synthetic_tree` writes an ImageFolder tree
(`ROOT/{train,test}/cNNN/*.png`) that the `folder` source converts like any other:

    x = clip(template_c + noise, 0, 255),   template_c ~ a smooth seeded random image per class

Classes are separable but not trivially (the noise is as strong as the template's contrast).
They are for timing and scaling (docs/BENCHMARKS.md): at the benchmarks' budgets - a random
`test_vit`, a few optimiser steps per task - a continual learner stays near chance on them;
joint training on all classes, with more steps, does learn them.

    python -m cldist.data.synthetic /tmp/synth200 --classes 200     # then:
    cldist data build --source folder --root /tmp/synth200 --out /tmp/s100 --tasks 100
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image


def class_template(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random grayscale pattern: low-frequency noise upsampled to size x size."""
    coarse = rng.uniform(0, 255, size=(4, 4)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)


def write_synthetic_tree(root: str | os.PathLike, n_classes: int, train_per_class: int = 8,
                         test_per_class: int = 4, size: int = 16, noise: float = 40.0,
                         seed: int = 0) -> Path:
    """Write `root/{train,test}/cNNN/III.png`; the same arguments give the same bytes."""
    root = Path(root)
    for c in range(n_classes):
        rng = np.random.default_rng([seed, c])
        template = class_template(rng, size)
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            class_dir = root / split / f"c{c:03d}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = np.clip(template + rng.normal(0, noise, size=template.shape), 0, 255)
                Image.fromarray(image.astype(np.uint8)).save(class_dir / f"{i:03d}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--train-per-class", type=int, default=8)
    parser.add_argument("--test-per-class", type=int, default=4)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    write_synthetic_tree(a.root, a.classes, a.train_per_class, a.test_per_class, a.size,
                         seed=a.seed)
    print(a.root)


if __name__ == "__main__":
    main()
