"""InfLoRA: interference-free low-rank adaptation (CVPR 2024).

One branch per task on the key and value projections (roles k, v; `blocks: 5` restricts them to
blocks 0-4, the "b5" variant), rank 10, no alpha/r scaling. With tasks 0..t learned a target
layer computes

    W x + sum_{i<=t} B_i (A_i x),      A_i: r x d_in (input side),  B_i: d_out x r (output side).

NAMING: in the paper the input-side matrix is called B_t ("dimensionality reduction matrix") and
the output side A_t; the official code swaps the names again. Here, as in every cldist LoRA
layer, `lora_A` is the INPUT side and `lora_B` the OUTPUT side:

- A_t (paper B_t) is DESIGNED before training and then FROZEN. A no-grad pass over the task's
  training data (model.eval(), branches 0..t-1 on) collects per target layer the token-averaged
  Gram matrix of its input, C = mean_tokens x x^T (d_in x d_in; for a Conv2d the tokens are the
  unfolded input patches, so any groups=1 conv works, a 1x1 conv trivially). Data-parallel ranks
  average it with `reduce_mean` (sums and token counts separately, so it is the exact global
  mean). The old tasks' subspace is projected out with the DualGPM memory M of the layer:
      memory holds a basis U of the protected subspace ("remove"):  C' = (I - U U^T) C
      memory holds a basis V of its complement ("retain"):          C' = V V^T C
  (`variant: paper` uses the symmetric C' = P C P with the same projector P, computed inside
  the free subspace so that every designed row lies exactly in it - rows for which no free
  dimension is left are zero; `variant: official` the one-sided P C of the authors' code), then
  A_t = (top-r left singular vectors of C')^T / sqrt(3).
- B_t (paper A_t) starts at zero and is the only adapter weight that trains, with head t.
- After training, a second no-grad pass recollects C (branches 0..t on) and updates DualGPM with
  eps_t = eps_0 + (1 - eps_0) t / T (`gpm_eps` = eps_0: 0.95 CIFAR/DomainNet, 0.98 ImageNet-R):
    first task:  keep the r leading eigen-directions of C with cumulative energy < eps_t
                 (at least one);
    "remove":    energy of C outside span(U) counts as new; add leading residual directions of
                 (I - U U^T) C until the captured fraction reaches eps_t;
    "retain":    remove from the complement V the leading directions of V V^T C while the
                 energy left in the complement is >= 1 - eps_t;
  and once a protected basis has more than d/2 columns the memory stores its orthogonal
  complement instead. Energy of a direction: `variant: paper` its eigenvalue of C (= the squared
  singular value of the representation matrix H with C = H H^T / n, GPM's criterion);
  `variant: official` the SQUARED singular value of C, as the authors' code computes it
  (`S**2` of the SVD of the Gram matrix). The authors' first-task branch for r >= d/2 stores the
  leading basis itself labelled "retain"; that is treated as a bug and not reproduced (the
  complement is stored).
- One linear head per task; training uses the current task's logits; prediction is one model
  (all branches, all heads concatenated), argmax.
- Optimiser: the trainer's AdamW (the paper: Adam, lr 5e-4).

BatchNorm (CNN backbones): running statistics stay frozen like the rest of the backbone
(`freeze_batchnorm_stats`): otherwise train-mode forwards would drift them to every new task.

State after task t: adapter (A_t, B_t), memory (every layer's basis after task t and a flag
saying whether it is the complement), head t. The memory is training-time state only; it is not
part of the model at inference.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn

from ..config.schema import must_be
from ..models.continual import ContinualClassifier, freeze, task_key
from ..models.lora import LoRAConv2d, LoRALayer
from .base import (ContinualMethod, FitRequest, TaskContext, current_task_loss,
                   register_method, trainable)
from .common import LoRAOptions, adapter_model, head_state, load_head, variant_problems


@dataclass
class InfLoRAOptions(LoRAOptions):
    """configs/method/inflora.yaml (rank 30 for DomainNet in the paper; blocks 5: InfLoRA-b5)."""
    name: str = "inflora"
    targets: list[str] = field(default_factory=lambda: ["k", "v"])
    epochs: int = 4
    lr: float = 5e-4  # the paper's Adam lr
    gpm_eps: float = 0.95  # DualGPM eps_0: 0.95 CIFAR-100/DomainNet, 0.98 ImageNet-R
    variant: str = "paper"  # official: one-sided projection, energy = squared singular values

    def problems(self) -> list[str]:
        return super().problems() + variant_problems(self.variant) + must_be(
            "method.gpm_eps", self.gpm_eps, 0 < self.gpm_eps <= 1, "must be in (0, 1]")


def layer_tokens(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer's (flattened) weight multiplies: (n_tokens, fan_in)."""
    if not isinstance(layer, LoRAConv2d):
        return x.reshape(-1, x.shape[-1])
    conv = layer.base
    if conv.groups != 1:
        raise ValueError("InfLoRA needs convolutions with groups=1 (a grouped/depthwise kernel "
                         "has no single input space); choose other method.targets")
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    if isinstance(conv, Conv2dSame):
        x, padding = pad_same(x, kernel, stride, dilation), 0
    elif conv.padding_mode != "zeros":
        ph, pw = conv.padding
        x, padding = F.pad(x, (pw, pw, ph, ph), mode=conv.padding_mode), 0
    else:
        padding = conv.padding
    if kernel == (1, 1) and padding in (0, (0, 0)):
        x = x[:, :, ::stride[0], ::stride[1]]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # N, C*k*k, L
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class GramCollector:
    """Forward pre-hooks accumulating sum(x x^T) and the token count per target layer."""

    def __init__(self, layers: dict[str, LoRALayer]):
        self.layers = layers
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {n: 0.0 for n in layers}
        self._cache: dict[str, tuple] = {}
        self._handles = []

    def __enter__(self):
        for n, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._hook(n)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def new_batch(self) -> None:
        self._cache.clear()

    @staticmethod
    def _shape_key(layer: LoRALayer) -> tuple:
        """What besides the input decides a layer's tokens (a conv's kernel geometry)."""
        b = layer.base
        return (type(b).__name__, getattr(b, "kernel_size", None), getattr(b, "stride", None),
                getattr(b, "padding", None), getattr(b, "dilation", None),
                getattr(b, "padding_mode", None))

    def _hook(self, name: str):
        layer = self.layers[name]

        def hook(module, args):
            x = args[0]
            # k and v of one block (siblings under SplitQKV) receive the very same tensor object:
            # compute its Gram matrix once. A weak reference identifies that live object, so a
            # freed input whose memory another layer's input reuses is never mistaken for it.
            for ref, shape_key, gram, n in self._cache.values():
                if ref() is x and shape_key == self._shape_key(layer):
                    break
            else:
                tok = layer_tokens(layer, x.detach()).double()
                gram, n = tok.T @ tok, tok.shape[0]
                self._cache.clear()  # siblings run back to back: the last input is enough
                self._cache[name] = (weakref.ref(x), self._shape_key(layer), gram, n)
            self.sums[name] = self.sums[name] + gram if name in self.sums else gram.clone()
            self.counts[name] += n
        return hook

    def means(self, reduce_mean) -> dict[str, torch.Tensor]:
        out = {}
        for n, s in self.sums.items():
            count = reduce_mean(torch.tensor([self.counts[n]], dtype=torch.float64, device=s.device))
            out[n] = reduce_mean(s) / count
        return out


def _eigh_desc(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    S, U = torch.linalg.eigh(0.5 * (C + C.T))
    return S.flip(0).clamp_min(0.0), U.flip(1)


@register_method
class InfLoRA(ContinualMethod):
    name = "inflora"
    Options = InfLoRAOptions
    options: InfLoRAOptions
    prediction = "single"
    graph = "chain"

    @property
    def official(self) -> bool:
        """`variant: official`: the authors' code where it departs from the paper."""
        return self.options.variant == "official"

    # -- model -----------------------------------------------------------------------------
    def build(self, backbone: nn.Module, feature_dim: int,
              classes_per_task: Sequence[int]) -> ContinualClassifier:
        model = adapter_model(backbone, feature_dim, self.target_patterns, self.options.blocks)
        # DualGPM memory per layer: (basis d x k, is_complement); float32, on the CPU
        model.gpm = {}
        freeze(model)
        return model

    def _collect(self, model: ContinualClassifier, ctx: TaskContext) -> dict[str, torch.Tensor]:
        layers = model.lora_layers()
        model.eval()
        with torch.no_grad(), GramCollector(layers) as gc:
            for images, _ in ctx.train_batches(0):
                gc.new_batch()
                model(images.to(ctx.device, non_blocking=True))
            gc.new_batch()
        grams = gc.means(ctx.reduce_mean)
        missing = [n for n in layers if n not in grams]
        if missing:
            raise RuntimeError(f"InfLoRA: no input reached {missing[:3]} during the statistics pass")
        return grams

    # -- DualGPM ---------------------------------------------------------------------------
    def energy(self, S: torch.Tensor) -> torch.Tensor:
        return S ** 2 if self.official else S

    def project(self, C: torch.Tensor, memory) -> torch.Tensor:
        """C with the protected subspace projected out (see the module docstring)."""
        if memory is None:
            return C
        M, complement = memory
        M = M.to(C.device, C.dtype)
        P = M @ M.T if complement else torch.eye(C.shape[0], dtype=C.dtype, device=C.device) - M @ M.T
        return P @ C if self.official else P @ C @ P

    @staticmethod
    def free_basis(memory, d: int, dtype, device) -> torch.Tensor:
        """An orthonormal basis (d x f) of the subspace old tasks left free."""
        if memory is None:
            return torch.eye(d, dtype=dtype, device=device)
        M, complement = memory
        M = M.to(device, dtype)
        if complement:
            return M
        if M.shape[1] == 0:
            return torch.eye(d, dtype=dtype, device=device)
        return torch.linalg.svd(M, full_matrices=True)[0][:, M.shape[1]:]

    def design(self, C: torch.Tensor, memory, rank: int) -> torch.Tensor:
        """A_t: the top-`rank` directions of the projected Gram matrix, / sqrt(3).

        paper: the leading eigenvectors of P C P, computed inside the free subspace F as
        F eig(F^T C F), which is the same thing but stays exactly in F when C is rank-deficient
        there; when F has fewer than `rank` dimensions the remaining rows are zero (no capacity
        is left that would not interfere). official: the left singular vectors of P C."""
        if self.official:
            U = torch.linalg.svd(self.project(C, memory), full_matrices=False)[0]
            return U[:, :rank].T / math.sqrt(3.0)
        F = self.free_basis(memory, C.shape[0], C.dtype, C.device)
        A = torch.zeros(rank, C.shape[0], dtype=C.dtype, device=C.device)
        if F.shape[1]:
            W = _eigh_desc(F.T @ C @ F)[1]
            k = min(rank, F.shape[1])
            A[:k] = (F @ W[:, :k]).T
        return A / math.sqrt(3.0)

    def update_memory(self, C: torch.Tensor, memory, eps: float):
        """DualGPM after a task; returns the new (basis, is_complement) on the CPU, float32."""
        C = C.double()
        d = C.shape[0]
        svd = (lambda X: torch.linalg.svd(X, full_matrices=False)[:2]) if self.official else \
            (lambda X: _eigh_desc(X)[::-1])
        if memory is None:
            U, S = svd(C)
            e = self.energy(S)
            ratio = e / e.sum().clamp_min(1e-300)
            r = int((torch.cumsum(ratio, 0) < eps).sum())
            basis, complement = (U[:, :max(r, 1)], False) if r < d / 2 else (U[:, r:], True)
        else:
            M, complement = memory
            M = M.to(C.device, C.dtype)
            total = self.energy(svd(C)[1]).sum().clamp_min(1e-300)
            if not complement:
                U, S = svd(self.project(C, memory))
                ratio = self.energy(S) / total
                captured = float(1.0 - ratio.sum())
                r = 0
                for value in ratio.tolist():
                    if captured >= eps:
                        break
                    captured += value
                    r += 1
                basis = torch.cat([M, U[:, :r]], dim=1)[:, :d] if r else M
            else:
                U, S = svd(self.project(C, memory))
                ratio = self.energy(S) / total
                left = float(ratio.sum())  # energy in the complement (not yet protected)
                r = 0
                for value in ratio.tolist():
                    if left < 1.0 - eps:
                        break
                    left -= value
                    r += 1
                if r:
                    rest = M - U[:, :r] @ (U[:, :r].T @ M)
                    Ur = torch.linalg.svd(rest, full_matrices=False)[0]
                    basis = Ur[:, :max(M.shape[1] - r, 0)]
                else:
                    basis = M
        if not complement and basis.shape[1] > d / 2:
            full = torch.linalg.svd(basis, full_matrices=True)[0]
            basis, complement = full[:, basis.shape[1]:], True
        # kept (and saved) in float32: a reloaded memory is bit-identical to this one
        return basis.float().cpu().contiguous(), complement

    @staticmethod
    def protected_dims(memory, d: int) -> int:
        basis, complement = memory
        return d - basis.shape[1] if complement else basis.shape[1]

    # -- task ------------------------------------------------------------------------------
    def learn_task(self, model: ContinualClassifier, ctx: TaskContext) -> dict:
        t, key = ctx.task_id, task_key(ctx.task_id)
        rank = self.options.rank
        layers = model.lora_layers()
        model.add_head(key, ctx.n_classes, ctx.generator)
        old = sorted({k for layer in layers.values() for k in layer.adapters()})
        model.activate(old, [key])

        # 1. design the input side from the projected Gram matrices, freeze it
        grams = self._collect(model, ctx)
        for n, layer in layers.items():
            r = min(rank, layer.max_rank())
            layer.add_adapter(key, r, scaling=1.0, init_A="zero")
            A = self.design(grams[n], model.gpm.get(n), r)
            with torch.no_grad():
                layer.lora_A[key].copy_(A.to(layer.lora_A[key].dtype))
        del grams

        # 2. train the output side (zero init) and head t; every branch 0..t on
        freeze(model)  # the designed input sides (fresh parameters) must not train
        model.activate(old + [key], [key])
        params = [layer.lora_B[key] for layer in layers.values()]
        params += list(model.heads[key].parameters())
        fit = ctx.fit(model, FitRequest("inflora", trainable(params),
                                        loss_fn=current_task_loss(ctx.offset)))
        freeze(model)

        # 3. DualGPM update from the task's representations after training
        eps0 = self.options.gpm_eps
        eps = eps0 + (1.0 - eps0) * t / ctx.n_tasks
        grams = self._collect(model, ctx)
        for n in layers:
            model.gpm[n] = self.update_memory(grams[n], model.gpm.get(n), eps)
        dims = {n: self.protected_dims(m, m[0].shape[0]) for n, m in model.gpm.items()}
        self.activate_model(model, t)
        return {"fits": [fit], "gpm_eps": eps, "protected_dims": dims,
                "ranks": {n: layer.rank(key) for n, layer in layers.items()}}

    # -- state -----------------------------------------------------------------------------
    def task_state(self, model: ContinualClassifier, task_id: int):
        key = task_key(task_id)
        adapter: dict[str, torch.Tensor] = {}
        for n, layer in model.lora_layers().items():
            adapter[f"{n}.lora_A"] = layer.lora_A[key].detach().contiguous()
            adapter[f"{n}.lora_B"] = layer.lora_B[key].detach().contiguous()
        memory: dict[str, torch.Tensor] = {}
        for n, (basis, complement) in model.gpm.items():
            memory[f"{n}.basis"] = basis.contiguous()
            memory[f"{n}.complement"] = torch.tensor([1 if complement else 0], dtype=torch.uint8)
        return {"adapter": adapter, "memory": memory, "head": head_state(model, key)}

    def load_task_state(self, model: ContinualClassifier, task_id: int, state) -> None:
        key = task_key(task_id)
        for n, layer in model.lora_layers().items():
            A, B = state["adapter"][f"{n}.lora_A"], state["adapter"][f"{n}.lora_B"]
            if key not in layer.lora_A:
                layer.add_adapter(key, A.shape[0])
            layer.set_adapter_weights(key, B, A)
            if f"{n}.basis" in state.get("memory", {}):  # the memory as after task `task_id`
                model.gpm[n] = (state["memory"][f"{n}.basis"].float(),
                                bool(state["memory"][f"{n}.complement"].item()))
        load_head(model, key, state["head"])
        freeze(model)

    def params_added(self, model: ContinualClassifier, task_id: int) -> int:
        """The branch (designed A_t + trained B_t) and head t; the DualGPM memory is training-time
        state, not a model parameter."""
        key = task_key(task_id)
        n = sum(p.numel() for layer in model.lora_layers().values()
                for p in (layer.lora_A[key], layer.lora_B[key]))
        return int(n + sum(p.numel() for p in model.heads[key].parameters()))

    # -- prediction ------------------------------------------------------------------------
    def activate_model(self, model: ContinualClassifier, upto_task: int) -> None:
        keys = [task_key(i) for i in range(upto_task + 1)]
        model.activate(keys, keys)
