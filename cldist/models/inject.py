"""Find target layers by module-name pattern and wrap them for LoRA.

Patterns are shell-style globs over `named_modules()` names (`blocks.*.attn.k`,
`blocks.[0-4].attn.v`, `conv_head`). timm fuses q, k and v into one `attn.qkv` Linear;
`split_fused_qkv` first replaces it by a `SplitQKV` with three Linear children so that each
projection can be targeted alone, and the model computes exactly what it did before.
"""
from __future__ import annotations

import fnmatch
from typing import Sequence

import torch
from torch import nn

from .lora import LoRAConv2d, LoRALayer, LoRALinear, TaskBatchNorm2d


class SplitQKV(nn.Module):
    """timm's fused `qkv` Linear as three Linear layers `q`, `k`, `v`; output is their concat."""

    def __init__(self, fused: nn.Linear):
        super().__init__()
        dim_out = fused.out_features // 3
        has_bias = fused.bias is not None
        self.q, self.k, self.v = (nn.Linear(fused.in_features, dim_out, bias=has_bias)
                                  for _ in range(3))
        with torch.no_grad():
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(fused.weight[i * dim_out:(i + 1) * dim_out])
                if has_bias:
                    lin.bias.copy_(fused.bias[i * dim_out:(i + 1) * dim_out])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def split_fused_qkv(model: nn.Module) -> int:
    """Replace every `*.qkv` Linear by a SplitQKV; returns how many were split."""
    count = 0
    for name, module in list(model.named_modules()):
        if name.endswith("qkv") and isinstance(module, nn.Linear) and module.out_features % 3 == 0:
            _set_submodule(model, name, SplitQKV(module))
            count += 1
    return count


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def match_modules(model: nn.Module, patterns: Sequence[str],
                  types: tuple[type, ...] = (nn.Linear, nn.Conv2d)) -> list[str]:
    """Names of modules of `types` matching any pattern, in model order."""
    return [name for name, m in model.named_modules()
            if name and isinstance(m, types) and any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def inject_lora(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Wrap every Linear/Conv2d whose name matches `patterns` in a LoRA layer.

    Returns the wrapped names. Raises ValueError naming the patterns and some candidate names
    when nothing matched - a silent no-op would train nothing and look like it worked.
    """
    names = match_modules(model, patterns)
    if not names:
        candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        shown = ", ".join(candidates[:12]) + (" ..." if len(candidates) > 12 else "")
        raise ValueError(f"no LoRA target matched {list(patterns)}; Linear/Conv2d modules of this "
                         f"backbone include: {shown}. Set method.targets to patterns that match.")
    for name in names:
        m = model.get_submodule(name)
        _set_submodule(model, name, LoRALinear(m) if isinstance(m, nn.Linear) else LoRAConv2d(m))
    return names


def inject_task_norms(model: nn.Module) -> list[str]:
    """Wrap every BatchNorm2d so that each task can own a private copy."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for name in names:
        _set_submodule(model, name, TaskBatchNorm2d(model.get_submodule(name)))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Wrapped layers by their (pre-wrapping) module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def task_norm_layers(model: nn.Module) -> dict[str, TaskBatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TaskBatchNorm2d)}
