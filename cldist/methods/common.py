"""Pieces the adapter methods share: their options, building an adapter model, heads' state,
BN handling."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..config.schema import MethodOptions, must_be

from ..models.continual import ContinualClassifier, freeze
from ..models.inject import inject_lora, match_modules


@dataclass
class LoRAOptions(MethodOptions):
    """The keys of the methods that put a LoRA of one rank on their targets (sdlora*, inflora,
    codyra, seq_lora)."""
    rank: int = 10  # adapter rank (CoDyRA: the starting rank before pruning)
    blocks: Optional[int] = None  # only targets in blocks 0..blocks-1 (InfLoRA-b5: 5)

    def problems(self) -> list[str]:
        p = super().problems()
        p += must_be("method.rank", self.rank, self.rank >= 1, "must be >= 1")
        p += must_be("method.blocks", self.blocks, self.blocks is None or self.blocks >= 1,
                     "must be >= 1 (or null for every block)")
        return p


VARIANTS = ("paper", "official")


def variant_problems(variant: str) -> list[str]:
    """`variant: paper | official` (where the authors' code departs from the paper)."""
    return must_be("method.variant", variant, variant in VARIANTS, "choose paper or official")


def head_state(model: ContinualClassifier, key: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.heads[key].state_dict().items()}


def load_head(model: ContinualClassifier, key: str, state: dict[str, torch.Tensor]) -> None:
    if key not in model.heads:
        model.add_head(key, state["weight"].shape[0])  # created beside the model
    model.heads[key].load_state_dict(state)


def _keep_eval(module: nn.Module, args) -> None:
    module.training = False


def freeze_batchnorm_stats(model: nn.Module) -> int:
    """Make every BatchNorm use (and never update) its running statistics, in train mode too.

    The adapter methods keep the backbone outside their adapters frozen; on a CNN that includes
    the BatchNorm statistics, which train-mode forwards would otherwise drift towards each new
    task (changing old tasks' features and making a task's saved state insufficient to rebuild
    the model). Returns how many norms were frozen."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not getattr(m, "_stats_frozen", False):  # one hook, however often it is called
                m.register_forward_pre_hook(_keep_eval)
                m._stats_frozen = True
            count += 1
    return count


def block_index(name: str) -> int | None:
    """The block a module belongs to: the first integer component of its name."""
    for part in name.split("."):
        if re.fullmatch(r"\d+", part):
            return int(part)
    return None


def restrict_to_blocks(model: nn.Module, patterns: Sequence[str], blocks: int | None) -> list[str]:
    """`patterns`, or - with `blocks` set - the matching module names in blocks 0..blocks-1
    (InfLoRA-b5 style); the block of a module is the first integer in its name."""
    if not blocks:
        return list(patterns)
    names = [n for n in match_modules(model, patterns)
             if block_index(n) is not None and block_index(n) < int(blocks)]
    if not names:
        raise ValueError(f"method.blocks={blocks}: no target of {list(patterns)} lies in the first "
                         f"{blocks} blocks")
    return names


def adapter_model(backbone: nn.Module, feature_dim: int, patterns: Sequence[str],
                  blocks: int | None) -> ContinualClassifier:
    """A frozen classifier with LoRA on `patterns` (within the first `blocks` blocks) and
    frozen BatchNorm statistics - the starting point of every adapter method."""
    model = ContinualClassifier(backbone, feature_dim)
    inject_lora(model.backbone, restrict_to_blocks(model.backbone, patterns, blocks))
    freeze_batchnorm_stats(model)
    freeze(model)
    return model
