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
- a coefficient `c_a`: the branch is multiplied by c_a (SD-LoRA's trainable magnitude divided by
  the frozen direction's norm), evaluated at every forward with autograd. Either one callable per
  branch (`set_coefficient(name, fn)`, fn() a scalar tensor or float) or one callable for many
  branches (`set_coefficients(names, fn)`, fn() a 1-D tensor of len(names), entry i the
  coefficient of names[i]): a forward then evaluates fn once, not once per branch.

Batched forward (`BATCH_BRANCHES`, on by default): the sum above is regrouped so a layer's cost
does not grow with the number of active branches; the result is the same up to float rounding.
- trainable branches (A, B or the gate requires grad): one by one, as written above (the
  "loop" path), so their gradients are the ordinary ones;
- frozen branches without a coefficient, when two or more are active: folded once into
  W_eff = W + sum_a s_a B_a diag(w_a) A_a, cached and rebuilt only when the set of such branches,
  one of their tensors (identity or in-place version), a scaling or the base weight changes;
  the layer then runs one base-sized matmul / conv whatever their number;
- frozen branches with a coefficient, when two or more are active: A_cat = [A_a] (R x fan_in)
  and B_cat = [s_a B_a diag(w_a)] (out x R) are cached the same way; each forward evaluates the
  coefficients c_a (the callables may depend on trainable scalars: each vector callable once,
  each single-branch callable once) and expands them to one factor per rank component with one
  cached index, m = (c_a repeated r_a times), then adds
  B_cat diag(m) A_cat x (factored) or folds (B_cat diag(m)) A_cat into the weight (dense, when
  that is cheaper: always for Conv2d, for a Linear once tokens * (in + out) >= in * out), both
  with autograd through m, so the coefficients get their gradients.
A lone branch of a group takes the loop path (bit-identical to the unbatched layer, and nothing
to rebuild when a method switches between single sub-networks). `BATCH_BRANCHES = False` keeps
the per-branch loop everywhere (the benchmark's "before"); there a vector coefficient is still
evaluated once per forward and indexed per branch.

Per-task batch-norm (`TaskBatchNorm2d`) follows the same keying: PEARL's CNN sub-networks each
own their norm layers. Only one norm branch can be active; with none active the base norm runs.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.conv2d_same import conv2d_same
from torch import nn


# False: every active branch runs one by one (the unbatched layer, kept for `cldist bench layers`)
BATCH_BRANCHES = True


def _flat_shape(weight: torch.Tensor) -> tuple[int, int]:
    """(out, fan_in) of a Linear or Conv weight seen as a matrix."""
    return weight.shape[0], int(weight[0].numel())


def cpu_draw(shape, dtype: torch.dtype, draw: Callable[[torch.Tensor], torch.Tensor],
             device: torch.device) -> torch.Tensor:
    """`draw(tensor)` fills a CPU tensor, which then moves to `device`: the run's generators
    are CPU generators (a CUDA tensor refuses them), and a GPU run gets the CPU run's values."""
    return draw(torch.empty(shape, dtype=dtype)).to(device)


class CoefficientGroup:
    """The branches `names` of one layer whose coefficients come from one callable: fn() is a
    1-D tensor of len(names), entry i the coefficient of names[i] (`set_coefficients`)."""

    def __init__(self, names: Sequence[str], fn: Callable[[], torch.Tensor]):
        self.names, self.fn = tuple(names), fn

    def values(self) -> torch.Tensor:
        v = self.fn()
        if v.shape != (len(self.names),):
            raise ValueError(f"a coefficient vector for {len(self.names)} branches has shape "
                             f"{tuple(v.shape)}")
        return v


class GroupCoefficient:
    """Branch `group.names[index]`'s coefficient, as a per-branch callable (what
    `layer.coefficients[name]` holds for a branch of a `set_coefficients` group)."""

    def __init__(self, group: CoefficientGroup, index: int):
        self.group, self.index = group, index

    def __call__(self) -> torch.Tensor:
        return self.group.values()[self.index]


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
        # batched forward: (key, tensors the key's ids refer to, cached tensors) or None
        self._fold_cache: tuple | None = None
        self._coef_cache: tuple | None = None

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

    def set_coefficients(self, names: Sequence[str],
                         fn: Callable[[], torch.Tensor] | None) -> None:
        """Multiply branch names[i] by fn()[i] at every forward: one callable returning a 1-D
        tensor of len(names) for many branches (None removes their coefficients). It replaces
        any coefficient the branches had; the batched forward evaluates it once per forward."""
        names = list(names)
        if len(set(names)) != len(names):
            raise ValueError(f"repeated branch names in {names}")
        if fn is None:
            for n in names:
                self.coefficients.pop(n, None)
            return
        group = CoefficientGroup(names, fn)
        for i, n in enumerate(names):
            self.coefficients[n] = GroupCoefficient(group, i)

    def _gated_B(self, name: str) -> torch.Tensor:
        """B diag(w) (just B without a gate)."""
        B = self.lora_B[name]
        return B * self.lora_w[name] if name in self.lora_w else B

    def _factor(self, name: str, memo: dict | None = None):
        """s * c for branch `name` (c = 1 without a coefficient). `memo` (one dict per forward)
        evaluates each coefficient vector once for all its branches."""
        fn = self.coefficients.get(name)
        if fn is None:
            return self.scaling[name]
        if memo is not None and isinstance(fn, GroupCoefficient):
            values = memo.get(fn.group)
            if values is None:
                values = memo[fn.group] = fn.group.values()
            return self.scaling[name] * values[fn.index]
        return self.scaling[name] * fn()

    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    def rank(self, name: str) -> int:
        return int(self.lora_A[name].shape[0])

    def delta_matrix(self, name: str, memo: dict | None = None) -> torch.Tensor:
        """s * B A as an (out, fan_in) matrix (s * c * B diag(w) A with the optional extras)."""
        if name not in self.lora_w and name not in self.coefficients:
            return self.scaling[name] * (self.lora_B[name] @ self.lora_A[name])
        return self._factor(name, memo) * (self._gated_B(name) @ self.lora_A[name])

    def delta_weight(self, names: Iterable[str], memo: dict | None = None) -> torch.Tensor:
        """The summed update of `names`, shaped like the base weight (`memo`: see `_factor`)."""
        w = self.base.weight
        total = torch.zeros(_flat_shape(w), dtype=w.dtype, device=w.device)
        memo = {} if memo is None else memo
        for n in names:
            total = total + self.delta_matrix(n, memo)
        return total.reshape(w.shape)

    # -- batched forward (module docstring) ------------------------------------------------
    def __getstate__(self):
        # the caches are derived data: a copy (deepcopy, Ray) rebuilds them from its own tensors
        state = self.__dict__.copy()
        state["_fold_cache"] = state["_coef_cache"] = None
        return state

    def _groups(self) -> tuple[list[str], list[str], list[str], tuple, tuple]:
        """(loop, fold, coef, fold_key, coef_key): the active branches by path, and what each
        cached concatenation depends on - every branch's tensors by identity and in-place
        version (an optimiser step, copy_, load_state_dict bump it; a write through `.data`
        bumps nothing, so none of cldist's code writes frozen branches that way) and its
        scaling; the ids stay valid because a cache keeps its tensors alive (no id reuse).
        A group of one joins the loop, which keeps the order of `active` (one branch computes
        exactly as unbatched). Runs at every forward, so it reads the parameter dicts directly:
        Module.__getattr__ per branch would cost more than the branches' matmuls."""
        pa, pb, pw = self.lora_A._parameters, self.lora_B._parameters, self.lora_w._parameters
        names = [n for n in self.active if n in pa]
        if not BATCH_BRANCHES:
            return names, [], [], (), ()
        fold, coef, fold_key, coef_key = [], [], [], []
        for n in names:
            A, B, w = pa[n], pb[n], pw.get(n)
            if A.requires_grad or B.requires_grad or (w is not None and w.requires_grad):
                continue
            entry = (n, self.scaling[n], id(A), A._version, id(B), B._version,
                     None if w is None else (id(w), w._version))
            fn = self.coefficients.get(n)
            if fn is not None:
                coef.append(n)
                # a vector coefficient's group and slot decide the cached index
                coef_key.append(entry + ((id(fn.group), fn.index)
                                         if isinstance(fn, GroupCoefficient) else None,))
            else:
                fold.append(n)
                fold_key.append(entry)
        if len(fold) < 2:
            fold, fold_key = [], []
        if len(coef) < 2:
            coef, coef_key = [], []
        if fold or coef:
            batched = set(fold) | set(coef)
            names = [n for n in names if n not in batched]
        return names, fold, coef, tuple(fold_key), tuple(coef_key)

    def _refs(self, names: list[str]) -> list[torch.Tensor]:
        """The tensors a cache key names by id, kept alive by the cache."""
        return [d[n] for n in names for d in (self.lora_A, self.lora_B, self.lora_w) if n in d]

    def _building(self) -> contextlib.ExitStack:
        """Where a cache is built: outside autograd, in full precision (not the autocast dtype
        of the forward that happens to build it), as ordinary tensors (a cache first built
        under inference_mode must still serve a training forward)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.no_grad())
        stack.enter_context(torch.autocast(self.base.weight.device.type, enabled=False))
        return stack

    def _concat(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A_cat = [A_a] (R x fan_in), B_cat = [s_a B_a diag(w_a)] (out x R), no gradient."""
        A = torch.cat([self.lora_A[n].detach() for n in names])
        B = torch.cat([self.scaling[n] * self._gated_B(n).detach() for n in names], dim=1)
        return A, B

    def _folded_weight(self, fold: list[str], key: tuple) -> torch.Tensor:
        """W + sum_{a in fold} s_a B_a diag(w_a) A_a as an (out, fan_in) matrix; cached (with the
        gradient path through W kept when W itself trains)."""
        W = self.base.weight
        w_key = (id(W), W._version, W.requires_grad, W.dtype, W.device)
        cache = self._fold_cache
        if cache is None or cache[0] != (key, w_key):
            with self._building():
                A, B = self._concat(fold)
                delta = B @ A
                flat = W.detach().reshape(delta.shape)
                # a trainable W: cache only the delta and add it with autograd below
                cached = delta if W.requires_grad else flat + delta
            cache = self._fold_cache = ((key, w_key), self._refs(fold) + [W], cached)
        if W.requires_grad:
            return W.reshape(cache[2].shape) + cache[2]
        return cache[2]

    def _coef_factors(self, coef: list[str], key: tuple, memo: dict
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A_cat, B_cat, m): the cached concatenation of `coef` and this forward's factor per
        rank component, m = (c_a repeated r_a times), with autograd through every c_a. The
        coefficients are evaluated once per source - each vector group's callable once, the
        single-branch callables stacked - and m is one gather of their concatenation (the index,
        from rank component to entry, is cached with A_cat and B_cat). The vectors go into `memo`
        for the loop path's branches of the same groups (a trainable one)."""
        W = self.base.weight
        key = (key, W.dtype, W.device)
        cache = self._coef_cache
        if cache is None or cache[0] != key:
            groups: list[CoefficientGroup] = []
            singles: list[str] = []
            slot: list[tuple[int, int]] = []  # (source, entry) of each branch in `coef`
            for n in coef:
                fn = self.coefficients[n]
                if isinstance(fn, GroupCoefficient):
                    if fn.group not in groups:
                        groups.append(fn.group)
                    slot.append((groups.index(fn.group), fn.index))
                else:
                    slot.append((-1, len(singles)))
                    singles.append(n)
            starts, total = [], 0
            for g in groups:
                starts.append(total)
                total += len(g.names)
            entry = [total + i if src < 0 else starts[src] + i for src, i in slot]
            with self._building():
                A, B = self._concat(coef)
                ranks = torch.tensor([self.rank(n) for n in coef], device=A.device)
                index = torch.repeat_interleave(torch.tensor(entry, device=A.device), ranks)
            plan = (A, B, index, groups, singles)
            cache = self._coef_cache = (key, self._refs(coef) + groups, plan)
        A, B, index, groups, singles = cache[2]
        parts = []
        for g in groups:
            values = memo.get(g)
            if values is None:
                values = memo[g] = g.values()
            parts.append(values)
        if singles:
            values = [self.coefficients[n]() for n in singles]
            parts.append(torch.stack([torch.as_tensor(v, dtype=A.dtype, device=A.device).reshape(())
                                      for v in values]))
        c = parts[0] if len(parts) == 1 else torch.cat([p.to(A.dtype) for p in parts])
        return A, B, c.to(A.dtype)[index]

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
        loop, fold, coef, fold_key, coef_key = self._groups()
        if not fold and not coef:
            return self._forward_loop(x, loop)
        weight = self._folded_weight(fold, fold_key) if fold else self.base.weight
        factored, memo = None, {}
        if coef:
            A, B, m = self._coef_factors(coef, coef_key, memo)
            tokens = x.numel() // x.shape[-1]
            if tokens * (A.shape[1] + B.shape[0]) >= A.shape[1] * B.shape[0]:
                weight = weight + (B * m) @ A  # dense: cheaper than the factored pair here
            else:
                factored = (A, B, m)
        y = F.linear(x, weight, self.base.bias)
        if factored is not None:
            A, B, m = factored
            y = y + F.linear(F.linear(x, A) * m, B)
        return self._forward_loop(x, loop, y, memo)

    def _forward_loop(self, x: torch.Tensor, names: Sequence[str],
                      y: torch.Tensor | None = None, memo: dict | None = None) -> torch.Tensor:
        """y (default W x + b) plus the branches `names`, one by one (the unbatched layer)."""
        y = self.base(x) if y is None else y
        memo = {} if memo is None else memo  # each coefficient vector once per forward
        for name in names:
            if name not in self.lora_w and name not in self.coefficients:
                # low-rank path: never materialise B A for a Linear
                y = y + self.scaling[name] * F.linear(F.linear(x, self.lora_A[name]),
                                                      self.lora_B[name])
                continue
            h = F.linear(x, self.lora_A[name])
            if name in self.lora_w:
                h = h * self.lora_w[name]
            y = y + self._factor(name, memo) * F.linear(h, self.lora_B[name])
        return y


class LoRAConv2d(LoRALayer):
    def __init__(self, base: nn.Conv2d):
        super().__init__(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        loop, fold, coef, fold_key, coef_key = self._groups()
        if not loop and not fold and not coef:
            return self.base(x)
        if fold:
            weight = self._folded_weight(fold, fold_key).reshape(self.base.weight.shape)
        else:
            weight = self.base.weight
        memo: dict = {}
        if coef:
            A, B, m = self._coef_factors(coef, coef_key, memo)
            weight = weight + ((B * m) @ A).reshape(weight.shape)
        if loop:
            weight = weight + self.delta_weight(loop, memo)
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
