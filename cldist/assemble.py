"""Model assembly: the one place a RunConfig becomes objects - the method, its model on the
configured backbone (with the run's reference weights) and the image transforms.

The trainer (cldist.train.task), the evaluator (cldist.eval.scoring), the stream driver and
the CLI all build them here, so a task is trained and scored on the same model and the same
transforms. It sits above config/, data/, models/ and methods/ and below train/ and eval/.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config.schema import RunConfig
from .data import make_transform
from .data.manifest import Manifest
from .errors import ConfigError
from .methods.base import ContinualMethod, get_method_class
from .models.backbone import BackboneSpec, build_backbone, default_normalization
from .models.continual import ContinualClassifier
from .models.inject import split_fused_qkv
from .rundir import RunDir


def make_method(cfg: RunConfig) -> ContinualMethod:
    return get_method_class(cfg.method.name).from_run(cfg)


def backbone_spec(cfg: RunConfig) -> BackboneSpec:
    b = cfg.backbone
    return BackboneSpec(name=b.name, pretrained=b.pretrained, checkpoint=b.checkpoint,
                        img_size=b.img_size, patch_size=b.patch_size)


def build_model(cfg: RunConfig, method: ContinualMethod, manifest: Manifest,
                run_dir: str | Path) -> ContinualClassifier:
    """The method's model on the configured backbone, with the run's reference weights."""
    torch.manual_seed(cfg.seed)  # backbone init (random-init backbones) is part of the seed
    backbone = build_backbone(backbone_spec(cfg))
    if cfg.backbone.family == "vit":
        split_fused_qkv(backbone)
    classes = [len(t.classes) for t in manifest.tasks]
    model = method.build(backbone, int(backbone.num_features), classes)
    model.head_init = cfg.method.head_init
    RunDir(run_dir).load_reference_into(method, model)
    return model


def transforms(cfg: RunConfig, manifest: Manifest):
    """(train, test) image transforms: resize, optional augmentation (`scenario.train_crop`),
    evaluation resize + centre crop (`scenario.test_resize`), normalisation."""
    sc = cfg.scenario
    if sc.normalize == "backbone":
        mean, std = default_normalization(backbone_spec(cfg))
    else:
        mean = std = None
    size = sc.image_size
    try:
        train = make_transform(size, 3, mean, std, train=True, augment=sc.augment,
                               crop=sc.train_crop, resize=sc.test_resize)
        test = make_transform(size, 3, mean, std, train=False, augment=False,
                              crop=sc.train_crop, resize=sc.test_resize)
    except ValueError as e:  # a bad train_crop / test_resize: name the keys
        raise ConfigError([f"scenario.train_crop={sc.train_crop} / scenario.test_resize="
                           f"{sc.test_resize}: {e}"]) from None
    return train, test
