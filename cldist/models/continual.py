"""The continual classifier: a backbone with named LoRA branches and one head per task.

`forward(x)` runs the backbone with the currently active adapters and returns the
concatenated logits of the active heads, in task order. A method decides what is active:
PEARL activates one task's adapter and head at a time (sub-networks); SD-LoRA, InfLoRA and the
baselines activate every seen task's branch and head at once (one model, growing head).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .inject import lora_layers, task_norm_layers
from .lora import cpu_draw, set_active_adapters


def task_key(task_id: int) -> str:
    """The adapter/head name of a task: `t000`, `t001`, ..."""
    return f"t{task_id:03d}"


class ContinualClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.heads = nn.ModuleDict()
        self.active_heads: tuple[str, ...] = ()
        self.head_init = "default"  # or "zero" (`method.head_init`)

    # -- structure -------------------------------------------------------------------------
    def add_head(self, key: str, n_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
        head = nn.Linear(self.feature_dim, n_classes)
        self.init_head(head, generator)
        self.heads[key] = head.to(next(self.backbone.parameters()).device)
        return head

    def init_head(self, head: nn.Linear, generator: torch.Generator | None = None) -> None:
        """(Re-)initialise `head` the way `head_init` says: every head a method trains starts
        from here, including a head a method re-initialises before its last phase (PEARL)."""
        if self.head_init == "zero":
            # the gradient of a cross-entropy over this head's own classes sums to zero across
            # them, so SGD never moves the head's mean row (nor Adam, for 2 classes, whose
            # gradients are exact opposites): it stays 0, and so does the head's mean logit -
            # every task's logits on one common level in Class-IL
            with torch.no_grad():
                head.weight.zero_()
                head.bias.zero_()
        else:
            reset_linear(head, generator)  # drawn on the CPU generator, then moved beside the model

    def lora_layers(self):
        return lora_layers(self.backbone)

    def task_norm_layers(self):
        return task_norm_layers(self.backbone)

    def activate(self, adapters: Sequence[str], heads: Sequence[str]) -> None:
        set_active_adapters(self.backbone, adapters)
        missing = [h for h in heads if h not in self.heads]
        if missing:
            raise KeyError(f"no head {missing}; heads are {list(self.heads)}")
        self.active_heads = tuple(heads)

    # -- compute ---------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return torch.cat([self.heads[h](f) for h in self.active_heads], dim=-1)


def reset_linear(layer: nn.Linear, generator: torch.Generator | None = None) -> None:
    """nn.Linear's default initialisation, drawn from `generator` for reproducibility."""
    import math
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            if p is not None:
                p.copy_(cpu_draw(p.shape, p.dtype,
                                 lambda t: t.uniform_(-bound, bound, generator=generator), p.device))


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)

