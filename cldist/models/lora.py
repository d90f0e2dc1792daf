"""Multi-branch LoRA layers keyed by adapter name.

A wrapped layer keeps its frozen base weight W and any number of named low-rank branches. With
the set `active` of adapter names switched on, a Linear layer computes

    y = W x + b + sum_{a in active} s_a * B_a (A_a x),      B_a: out x r_a,  A_a: r_a x in,

and a Conv2d layer convolves with W + sum_a s_a * reshape(B_a A_a, W.shape), the LoRA of the
kernel reshaped to (out, in/groups * kh * kw). `s_a` is the branch's scaling (alpha / r, or 1).

Two optional per-branch extras (absent unless a method adds them; without them a branch computes
exactly the above):
- a gate `w_a` (one weight per rank component, `add_gate`): the branch becomes B_a diag(w_a) A_a
  (CoDyRA's rank-selective LoRA);
- a coefficient `c_a` (`set_coefficient`, a callable returning a scalar tensor or float, evaluated
  at every forward): the branch is multiplied by c_a (SD-LoRA's trainable magnitude divided by the
  frozen direction's norm).

Per-task batch-norm (`TaskBatchNorm2d`) follows the same keying: PEARL's CNN sub-networks each
own their norm layers. Only one norm branch can be active; with none active the base norm runs.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.conv2d_same import conv2d_same
from torch import nn


def _flat_shape(weight: torch.Tensor) -> tuple[int, int]:
    """(out, fan_in) of a Linear or Conv weight seen as a matrix."""
    return weight.shape[0], int(weight[0].numel())


def cpu_draw(shape, dtype: torch.dtype, draw: Callable[[torch.Tensor], torch.Tensor],
             device: torch.device) -> torch.Tensor:
    """`draw(tensor)` fills a CPU tensor, which then moves to `device`: the run's generators
    are CPU generators (a CUDA tensor refuses them), and a GPU run gets the CPU run's values."""
    return draw(torch.empty(shape, dtype=dtype)).to(device)


class LoRALayer(nn.Module):
    """Shared bookkeeping of the Linear and Conv2d LoRA wrappers."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.active: tuple[str, ...] = ()
        # optional extras (see the module docstring): per-component gates, dynamic coefficients
        self.lora_w = nn.ParameterDict()
        self.coefficients: dict[str, Callable[[], torch.Tensor | float]] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def out_features(self) -> int:
        return _flat_shape(self.base.weight)[0]

    @property
    def in_features(self) -> int:
        return _flat_shape(self.base.weight)[1]

    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)

    def add_adapter(self, name: str, rank: int, scaling: float = 1.0,
                    init_A: str = "kaiming", generator: torch.Generator | None = None) -> None:
        """Add branch `name` of rank `rank`: A random (Kaiming-uniform), B zero, so it starts at 0."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if not 1 <= rank <= self.max_rank():
            raise ValueError(f"adapter rank {rank} outside [1, {self.max_rank()}]")
        w = self.base.weight
        if init_A == "kaiming":
            # the same bound nn.Linear uses (kaiming_uniform with a=sqrt(5)): 1/sqrt(fan_in)
            bound = 1.0 / math.sqrt(self.in_features)
            A = cpu_draw((rank, self.in_features), w.dtype,
                         lambda t: t.uniform_(-bound, bound, generator=generator), w.device)
        elif init_A == "zero":
            A = torch.zeros(rank, self.in_features, dtype=w.dtype, device=w.device)
        else:
            raise ValueError(f"unknown init_A {init_A!r}; use 'kaiming' or 'zero'")
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype,
                                                     device=w.device))
        self.scaling[name] = float(scaling)

    def set_adapter_weights(self, name: str, B: torch.Tensor, A: torch.Tensor) -> None:
        with torch.no_grad():
            self.lora_B[name].copy_(B)
            self.lora_A[name].copy_(A)

    def remove_adapter(self, name: str) -> None:
        del self.lora_A[name]
        del self.lora_B[name]
        if name in self.lora_w:
            del self.lora_w[name]
        self.coefficients.pop(name, None)
        self.scaling.pop(name, None)
        self.active = tuple(a for a in self.active if a != name)

    # -- optional extras -------------------------------------------------------------------
    def add_gate(self, name: str, values: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> None:
        """Give branch `name` a per-component gate w (B diag(w) A); default w ~ N(0, 1)."""
        if name not in self.lora_A:
            raise KeyError(f"no adapter {name!r} on this layer")
        A = self.lora_A[name]
        if values is None:
            w = cpu_draw(A.shape[0], A.dtype, lambda t: t.normal_(0.0, 1.0, generator=generator),
                         A.device)
        else:
            w = torch.empty(A.shape[0], dtype=A.dtype, device=A.device).copy_(values)
        self.lora_w[name] = nn.Parameter(w)

    def set_coefficient(self, name: str, fn: Callable[[], torch.Tensor | float] | None) -> None:
        """Multiply branch `name` by fn() at every forward (None removes the coefficient)."""
        if fn is None:
            self.coefficients.pop(name, None)
        else:
            self.coefficients[name] = fn

    def _gated_B(self, name: str) -> torch.Tensor:
        """B diag(w) (just B without a gate)."""
        B = self.lora_B[name]
        return B * self.lora_w[name] if name in self.lora_w else B

    def _factor(self, name: str):
        """s * c for branch `name` (c = 1 without a coefficient)."""
        fn = self.coefficients.get(name)
        return self.scaling[name] if fn is None else self.scaling[name] * fn()

    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    def rank(self, name: str) -> int:
        return int(self.lora_A[name].shape[0])

    def delta_matrix(self, name: str) -> torch.Tensor:
        """s * B A as an (out, fan_in) matrix (s * c * B diag(w) A with the optional extras)."""
        if name not in self.lora_w and name not in self.coefficients:
            return self.scaling[name] * (self.lora_B[name] @ self.lora_A[name])
        return self._factor(name) * (self._gated_B(name) @ self.lora_A[name])

    def delta_weight(self, names: Iterable[str]) -> torch.Tensor:
        """The summed update of `names`, shaped like the base weight."""
        w = self.base.weight
        total = torch.zeros(_flat_shape(w), dtype=w.dtype, device=w.device)
        for n in names:
            total = total + self.delta_matrix(n)
        return total.reshape(w.shape)

    def merge(self, names: Sequence[str]) -> None:
        """Fold the branches into the base weight and remove them (no inference overhead)."""
        with torch.no_grad():
            self.base.weight.add_(self.delta_weight(names))
        for n in names:
            self.remove_adapter(n)


class LoRALinear(LoRALayer):
    def __init__(self, base: nn.Linear):
        super().__init__(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name in self.active:
            if name in self.lora_A:
                if name not in self.lora_w and name not in self.coefficients:
                    # low-rank path: never materialise B A for a Linear
                    y = y + self.scaling[name] * F.linear(F.linear(x, self.lora_A[name]),
                                                          self.lora_B[name])
                    continue
                h = F.linear(x, self.lora_A[name])
                if name in self.lora_w:
                    h = h * self.lora_w[name]
                y = y + self._factor(name) * F.linear(h, self.lora_B[name])
        return y


class LoRAConv2d(LoRALayer):
    def __init__(self, base: nn.Conv2d):
        super().__init__(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = [n for n in self.active if n in self.lora_A]
        if not names:
            return self.base(x)
        weight = self.base.weight + self.delta_weight(names)
        b = self.base
        if isinstance(b, Conv2dSame):
            # timm's tf_* convs pad 'same' dynamically from the input size
            return conv2d_same(x, weight, b.bias, b.stride, b.padding, b.dilation, b.groups)
        return b._conv_forward(x, weight, b.bias)


class TaskBatchNorm2d(nn.Module):
    """A BatchNorm2d with one private copy per adapter name (PEARL's per-task CNN norms)."""

    def __init__(self, base: nn.BatchNorm2d):
        super().__init__()
        self.base = base
        self.branches = nn.ModuleDict()
        self.active: tuple[str, ...] = ()

    def add_adapter(self, name: str) -> None:
        import copy
        branch = copy.deepcopy(self.base)
        for p in branch.parameters():
            p.requires_grad_(True)
        self.branches[name] = branch

    def adapters(self) -> list[str]:
        return list(self.branches.keys())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owned = [n for n in self.active if n in self.branches]
        if len(owned) > 1:
            raise RuntimeError(f"TaskBatchNorm2d: at most one norm branch can be active, got {owned}")
        return self.branches[owned[0]](x) if owned else self.base(x)


def set_active_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """Switch on exactly `names` in every LoRA and per-task norm layer of `model`."""
    names = tuple(names)
    for m in model.modules():
        if isinstance(m, (LoRALayer, TaskBatchNorm2d)):
            m.active = names
