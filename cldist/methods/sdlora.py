"""SD-LoRA: scalable decoupled LoRA (ICLR 2025), with its -RR and -KD variants.

LoRA on the q and v projections (roles; any Linear or Conv2d target works), rank 10, A
Kaiming-uniform, B zero, scaling 1. While learning task t every target layer l computes

    W_l x + sum_{i<t} alpha_i * D_{l,i} x + alpha_t * B_{l,t} A_{l,t} x

- D_{l,i} = B_{l,i} A_{l,i} / n_{l,i} is task i's frozen direction. With `boundary: normalise`
  or `paper`, `variant: paper`: n = ||B A||_F (a unit-norm direction); `variant: official` (the
  authors' code): n = ||B||_F ||A||_F. With `boundary: continuous` (default): n = 1 (see below).
  B_{l,i}, A_{l,i} never change after task i.
- The current task's product B_t A_t is NOT normalised (`continuous`, `normalise`): normalising
  it is 0/0 at its B = 0 initialisation. It becomes the frozen direction D_t when task t+1
  starts, so the model *after* task t (what is evaluated and saved) uses alpha_t B_t A_t.
- `boundary: paper` is the paper's own form: the current direction is normalised too,
  alpha_t B_t A_t / n_{l,t} with the gradient flowing through n, from a small non-zero B
  (uniform in +-0.01 / sqrt(rank): nn.Linear's bound for B's fan-in, times 0.01; the forward
  does not depend on B's scale, only the step size of its direction does). The norm is defined
  from the first step and the direction is already unit-norm when it freezes, so nothing is
  rescaled at the boundary. At its first step task t adds alpha_t (1.0) times a random unit-norm
  rank-r update to every target layer: the price of the form. Measured beside `continuous`
  (seed 0, docs/RESULTS.md): Class-IL 20.4 against 48.3 on fmnist_5t, 10.0 against 38.8 on
  fmnist_digits_10t, Task-IL 70.1 / 59.2 against 96.3 / 98.2 - on EfficientNet-Lite0's small
  convolutions a unit-norm update per task wipes the earlier tasks; ViT-B's 768 x 768
  projections are what the form was written for. Reproduce:
      cldist run method=sdlora method.boundary=paper                 (fmnist_5t)
      cldist run method=sdlora method.boundary=paper scenario=fmnist_digits_10t
- `boundary` decides what that hand-over does. `normalise` (the literal form above) divides the
  finished B_t A_t by n_{l,t} while alpha_t stays: every layer's learned update is rescaled by
  1 / n_{l,t} the moment task t+1 starts. Measured on EfficientNet-Lite0 / Split Fashion-MNIST
  (rank 10, AdamW 1e-3, 4 epochs), ||B A||_F is 0.02-0.28 per layer, so the update of task t
  grows 4-50x at the boundary and the old tasks' features collapse (row after task 1:
  [50.5, 12.0] - one class of task 0 predicted for everything). `continuous` (the default) takes
  n_{l,i} = 1: the frozen direction is B_i A_i at its learned scale and the model that starts
  task t+1 computes exactly what was evaluated after task t - the continuity the paper's form
  has (there the current direction is normalised too, from a small random init, so no rescale
  happens at the boundary). The magnitudes still train, now as multipliers of each task's
  learned update; directions are still frozen and the KD fit still uses unit-norm targets.
- alpha_i: ONE trainable scalar per task, shared by every layer and both projections
  (`model.sd_magnitudes`). At task t all alphas 0..t train (old magnitudes keep their learned
  values and are rescaled freely; old directions do not move). New magnitudes start at
  `magnitude_init` (default 1.0, the paper's "all initialised to ones"); `variant: official`
  re-creates ALL magnitudes at 0.8 at the start of every task, as the authors' code does.
- Trainable at task t: A_t, B_t of every target layer, alpha_0..alpha_t, and head t. One linear
  head per task (old heads frozen); loss on the current task's logits (labels - offset).
- Optimiser: the config's `optimizer` (default SGD, momentum 0.9, as the authors' code, with the
  trainer's cosine schedule where their code keeps lr constant; lr 5e-3, since their 1e-2
  diverged in the first task of a 10-task EfficientNet-Lite0 stream). The paper text says
  Adam without its lr; `optimizer=adamw` gives that family. The choice matters beyond speed:
  AdamW moves every parameter by about lr per step whatever its gradient, so the shared scalar
  magnitudes barely move (0.993-1.014 at 1e-3) and each new B moves as far as the first task's
  did; SGD steps in proportion to the gradient, so the magnitudes move further.
- Prediction: one forward pass of the final model (all directions, all heads), argmax.

SD-LoRA-RR (`sdlora_rr`): the rank of task t's LoRA follows `rank_schedule` (default 10 for
tasks 0-3, 8 for 4-7, 6 from task 8 on; the last entry repeats).

SD-LoRA-KD (`sdlora_kd`): after task t > 0, for every layer l the new normalised direction
d = B_t A_t / ||B_t A_t||_F is least-squares fitted onto the old directions,
beta_l = argmin ||d - sum_i beta_{l,i} D_{l,i}||_F^2, with residual rho_l = ||d - D beta_l||_F^2
(the squared residual of a unit-norm target, in [0, 1]). The magnitudes are shared across layers
but the fits are per layer, so the absorption is resolved as follows:
- the decision is per TASK: the new LoRA is absorbed only if EVERY layer's residual is below
  `kd_threshold` (9e-4), because alpha_t and the direction set are shared by all layers;
  otherwise it is kept as an ordinary new direction;
- when absorbed, layer l's new contribution alpha_t B_t A_t = alpha_t ||B_t A_t|| d is moved onto
  the old directions by adding alpha_t ||B_{l,t} A_{l,t}||_F beta_{l,i} to the magnitude of
  D_{l,i} *in that layer*: each layer keeps an additive, frozen per-layer correction
  o_{l,i} and uses (alpha_i + o_{l,i}) D_{l,i}. The shared alpha_i keeps training exactly as
  before (same gradient); the corrections are the per-layer part of "add the coefficients to the
  old magnitudes", which a single shared scalar cannot hold. B_t, A_t and alpha_t are dropped, so
  the parameter count stops growing.

BatchNorm (CNN backbones): running statistics stay frozen like the rest of the backbone
(`freeze_batchnorm_stats`): otherwise train-mode forwards would drift them to every new task.

State after task t (`tasks/TTT/`): adapter (A_t, B_t unless absorbed), magnitudes (alpha_i of
every task with a direction, as after task t), offsets (every o_{l,i}), head t. Loading tasks
0..t in order rebuilds the model after task t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from ..config.schema import must_be
from ..models.continual import ContinualClassifier, freeze, task_key
from ..models.lora import cpu_draw
from .base import (ContinualMethod, FitRequest, TaskContext, current_task_loss,
                   register_method, trainable)
from .common import LoRAOptions, adapter_model, head_state, load_head, variant_problems

OFFICIAL_MAGNITUDE = 0.8
BOUNDARIES = ("continuous", "normalise", "paper")
# SD-LoRA-RR's rank of task t (the last entry repeats)
RR_SCHEDULE = [10, 10, 10, 10, 8, 8, 8, 8, 6]


@dataclass
class SDLoRAOptions(LoRAOptions):
    """configs/method/sdlora.yaml (see the module docstring for each key)."""
    name: str = "sdlora"
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    epochs: int = 4
    optimizer: str = "sgd"  # momentum 0.9, as the authors' code
    lr: float = 5e-3  # the authors' 1e-2 diverged in task 0 of fmnist_digits_10t
    variant: str = "paper"  # official: directions / (||B|| ||A||), magnitudes reset to 0.8
    rank_schedule: list[int] = field(default_factory=list)  # rank of task t = [min(t, len-1)]
    magnitude_init: Optional[float] = None  # None: 1.0 (paper) / 0.8 (official)
    # what a finished task's B A becomes: continuous (its learned scale kept) | normalise
    # (divided by its norm) | paper (every direction normalised, the current one too)
    boundary: str = "continuous"

    def problems(self) -> list[str]:
        p = super().problems() + variant_problems(self.variant)
        p += must_be("method.rank_schedule", list(self.rank_schedule),
                     all(int(r) >= 1 for r in self.rank_schedule), "every rank must be >= 1")
        p += must_be("method.magnitude_init", self.magnitude_init,
                     self.magnitude_init is None or math.isfinite(self.magnitude_init),
                     "must be a finite number or null")
        p += must_be("method.boundary", self.boundary, self.boundary in BOUNDARIES,
                     "choose continuous, normalise or paper")
        return p


@dataclass
class SDLoRARROptions(SDLoRAOptions):
    """configs/method/sdlora_rr.yaml."""
    name: str = "sdlora_rr"
    rank_schedule: list[int] = field(default_factory=lambda: list(RR_SCHEDULE))


@dataclass
class SDLoRAKDOptions(SDLoRAOptions):
    """configs/method/sdlora_kd.yaml."""
    name: str = "sdlora_kd"
    kd_threshold: float = 9e-4  # absorb when every layer's squared LS residual is below this

    def problems(self) -> list[str]:
        return super().problems() + must_be("method.kd_threshold", self.kd_threshold,
                                            self.kd_threshold >= 0, "must be >= 0")
# `boundary: paper`: B starts uniform in +-PAPER_B_SCALE / sqrt(rank) (see the docstring)
PAPER_B_SCALE = 0.01


class _LayerCoefficients:
    """Every direction's coefficient in one layer as ONE vector (`layer.set_coefficients`), in
    the order of `keys`: c_{l,i} = alpha_i for the current task (alpha_t / n_{l,t} with
    `boundary: paper`, trained through the norm) and (alpha_i + o_{l,i}) / n_{l,i} for a frozen
    direction. Per forward: one concatenation of the magnitudes, one add of the layer's offsets
    (when it has any), one division by its norms (when normalised) - whatever the number of
    tasks. The frozen norms and the offsets are cached as vectors, rebuilt when a direction's
    tensors (identity, in-place version), an offset or the current task change."""

    def __init__(self, method: "SDLoRA", model: ContinualClassifier, layer, keys: Sequence[str]):
        self.method, self.model, self.layer, self.keys = method, model, layer, tuple(keys)
        self._offsets: tuple | None = None
        self._norms: tuple | None = None

    def __call__(self) -> torch.Tensor:
        keys, current = self.keys, self.model.sd_current
        alpha = self.model.sd_alpha.vector(keys, self.model.sd_magnitudes._parameters)
        ref = alpha
        values = alpha
        offsets = self.layer.sd_offsets
        if offsets:
            off = tuple(0.0 if k == current else float(offsets.get(k, 0.0)) for k in keys)
            cached = self._offsets
            if cached is None or cached[0] != (off, ref.dtype, ref.device):
                with _building():
                    t = torch.tensor(off, dtype=ref.dtype, device=ref.device)
                cached = self._offsets = ((off, ref.dtype, ref.device), t)
            values = values + cached[1]
        if self.method.normalise:
            values = values / self._norm_vector(keys, current, ref)
        return values

    def _norm_vector(self, keys: tuple, current: str | None, ref: torch.Tensor) -> torch.Tensor:
        """n_{l,i} per key: `branch_norm` of every frozen direction (cached); the current
        task's entry is 1 (`normalise`) or its norm (`paper`), live with the gradient while its
        A or B trains."""
        method, layer = self.method, self.layer
        pa, pb = layer.lora_A._parameters, layer.lora_B._parameters
        live = None
        if current in keys and method.normalise_current and (
                pa[current].requires_grad or pb[current].requires_grad):
            live = current
        key = (current, live, method.official, method.normalise_current, ref.dtype, ref.device,
               tuple((k, id(pa[k]), pa[k]._version, id(pb[k]), pb[k]._version) for k in keys))
        cached = self._norms
        if cached is None or cached[0] != key:
            with _building():
                norms = []
                for k in keys:
                    if k == current and (live is not None or not method.normalise_current):
                        norms.append(torch.ones((), dtype=ref.dtype, device=ref.device))
                    else:
                        norms.append(method.branch_norm(layer, k).to(ref.dtype).reshape(()))
                norms = torch.stack(norms)
                mask = torch.tensor([k == live for k in keys], device=ref.device)
            # the key's ids stay valid: the cache keeps the tensors alive
            refs = [t for k in keys for t in (pa[k], pb[k])]
            cached = self._norms = (key, refs, norms, mask)
        norms, mask = cached[2], cached[3]
        if live is not None:
            norms = torch.where(mask, method.branch_norm(layer, live).to(ref.dtype), norms)
        return norms


class MagnitudeVector:
    """[alpha_k for k in keys] as one tensor, shared by every layer of a forward: the first
    layer concatenates the magnitudes, the others reuse it while no magnitude has changed
    (identity, in-place version - an optimiser step bumps it - requires_grad) and the grad mode
    is the same. The backward then sums the layers' gradients in one vector and splits it once
    into the per-task scalars, instead of once per layer. (The concatenation saves no tensor
    for its backward, so a graph reused by a second forward backpropagates again.) Copies and
    pickles start empty."""

    def __init__(self):
        self.entry: tuple | None = None

    def vector(self, keys: tuple, params: dict) -> torch.Tensor:
        ps = [params[k] for k in keys]
        key = (keys, tuple((id(p), p._version, p.requires_grad) for p in ps),
               ps[0].dtype, ps[0].device, torch.is_grad_enabled(),
               torch.is_inference_mode_enabled())
        entry = self.entry
        if entry is None or entry[0] != key:
            entry = self.entry = (key, ps, torch.cat(ps))  # ps: the key's ids stay valid
        return entry[2]

    def __getstate__(self):
        return {"entry": None}

    def __deepcopy__(self, memo):
        return MagnitudeVector()


def _building():
    """Where the cached vectors are built: outside autograd, as ordinary tensors (a cache first
    built under inference_mode must still serve a training forward)."""
    import contextlib
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


@register_method
class SDLoRA(ContinualMethod):
    name = "sdlora"
    Options = SDLoRAOptions
    options: SDLoRAOptions
    prediction = "single"
    graph = "chain"
    distill = False  # SD-LoRA-KD

    @property
    def official(self) -> bool:
        """`variant: official`: the authors' code where it departs from the paper."""
        return self.options.variant == "official"

    def rank_for(self, task_id: int) -> int:
        schedule = list(self.options.rank_schedule)
        if schedule:
            return int(schedule[min(task_id, len(schedule) - 1)])
        return self.options.rank

    def magnitude_init(self) -> float:
        if self.options.magnitude_init is not None:
            return float(self.options.magnitude_init)
        return OFFICIAL_MAGNITUDE if self.official else 1.0

    # -- model -----------------------------------------------------------------------------
    def build(self, backbone: nn.Module, feature_dim: int,
              classes_per_task: Sequence[int]) -> ContinualClassifier:
        model = adapter_model(backbone, feature_dim, self.target_patterns, self.options.blocks)
        model.sd_magnitudes = nn.ParameterDict()
        model.sd_current = None  # the task whose B A is used unnormalised
        model.sd_alpha = MagnitudeVector()  # the magnitudes as one tensor, once per forward
        for layer in model.lora_layers().values():
            layer.sd_offsets = {}
        freeze(model)
        return model

    @property
    def boundary(self) -> str:
        return self.options.boundary

    @property
    def normalise(self) -> bool:
        """Whether frozen directions are divided by their norm."""
        return self.boundary in ("normalise", "paper")

    @property
    def normalise_current(self) -> bool:
        """Whether the current task's B A is divided by its norm while it trains."""
        return self.boundary == "paper"

    def branch_norm(self, layer, key: str) -> torch.Tensor:
        """||B A||_F (paper) or ||B||_F ||A||_F (official), 1 for an all-zero branch; with the
        gradient (the current direction of `boundary: paper` trains through it). Frozen and
        current directions share this one computation, so a direction's coefficient is the
        same number before and after the boundary."""
        A, B = layer.lora_A[key], layer.lora_B[key]
        with torch.autocast(device_type=A.device.type, enabled=False):  # full precision
            Af, Bf = A.float(), B.float()
            n = torch.linalg.norm(Bf) * torch.linalg.norm(Af) if self.official else \
                torch.linalg.norm(Bf @ Af)
        n = torch.where(n > 0, n, torch.ones_like(n))
        return n.to(A.dtype)

    @torch.no_grad()
    def direction_norm(self, layer, key: str) -> torch.Tensor:
        """n_{l,i} of a frozen direction: `branch_norm`, or 1 for `boundary: continuous` (the
        finished task's B A keeps its learned scale)."""
        if not self.normalise:
            A = layer.lora_A[key]
            return torch.ones((), dtype=A.dtype, device=A.device)
        return self.branch_norm(layer, key)

    def direction(self, layer, key: str) -> torch.Tensor:
        """D_{l,i} flattened (frozen direction of task `key` in `layer`)."""
        with torch.no_grad():
            return (layer.lora_B[key] @ layer.lora_A[key]).flatten() / self.direction_norm(layer, key)

    def _wire(self, model: ContinualClassifier, current: str | None) -> list[str]:
        """Attach the coefficients; returns the task keys that own a direction, in order."""
        model.sd_current = current
        if not isinstance(getattr(model, "sd_alpha", None), MagnitudeVector):
            model.sd_alpha = MagnitudeVector()
        keys = sorted(model.sd_magnitudes.keys())
        for layer in model.lora_layers().values():
            names = layer.adapters()  # one coefficient vector per layer
            layer.set_coefficients(names, _LayerCoefficients(self, model, layer, names))
        return keys

    def learn_task(self, model: ContinualClassifier, ctx: TaskContext) -> dict:
        t, key = ctx.task_id, task_key(ctx.task_id)
        init = self.magnitude_init()
        with torch.no_grad():
            if self.official:  # the authors' code re-creates every magnitude at 0.8 each task
                for p in model.sd_magnitudes.values():
                    p.fill_(OFFICIAL_MAGNITUDE)
        rank = self.rank_for(t)
        layers = model.lora_layers()
        for layer in layers.values():
            layer.add_adapter(key, min(rank, layer.max_rank()), scaling=1.0, generator=ctx.generator)
            if self.normalise_current:  # B A / ||B A|| needs B != 0 from the first step
                self._small_B(layer, key, ctx.generator)
        ref = next(iter(layers.values())).weight
        model.sd_magnitudes[key] = nn.Parameter(torch.full((1,), init, dtype=ref.dtype,
                                                           device=ref.device))
        keys = self._wire(model, current=key)
        model.add_head(key, ctx.n_classes, ctx.generator)
        model.activate(keys, [key])  # every direction on; current task's logits only
        freeze(model)
        params = [p for layer in layers.values() for p in (layer.lora_A[key], layer.lora_B[key])]
        params += list(model.sd_magnitudes.values()) + list(model.heads[key].parameters())
        fit = ctx.fit(model, FitRequest("sdlora", trainable(params),
                                        loss_fn=current_task_loss(ctx.offset)))
        freeze(model)
        meta = {"fits": [fit], "rank": rank}
        if self.distill and t > 0 and len(keys) > 1:
            meta["kd"] = self._distill(model, key)
        meta["magnitudes"] = {k: float(v) for k, v in model.sd_magnitudes.items()}
        meta["directions"] = sorted(model.sd_magnitudes.keys())
        self.activate_model(model, t)
        return meta

    @staticmethod
    def _small_B(layer, key: str, generator: torch.Generator) -> None:
        B = layer.lora_B[key]
        bound = PAPER_B_SCALE / B.shape[1] ** 0.5
        with torch.no_grad():
            B.copy_(cpu_draw(B.shape, B.dtype,
                             lambda x: x.uniform_(-bound, bound, generator=generator), B.device))

    # -- SD-LoRA-KD ------------------------------------------------------------------------
    @torch.no_grad()
    def fit_new_direction(self, layer, key: str, old: list[str]) -> tuple[torch.Tensor, float, float]:
        """(beta, residual, ||B_t A_t||_F) of the least-squares fit of the new direction."""
        new = (layer.lora_B[key] @ layer.lora_A[key]).flatten().double()
        norm = float(torch.linalg.norm(new))
        if norm == 0.0:
            return torch.zeros(len(old), dtype=torch.float64), 0.0, 0.0
        d = new / norm
        d = d.cpu()
        D = torch.stack([self.direction(layer, k).double().cpu() for k in old], dim=1)  # numel x k
        beta = torch.linalg.lstsq(D, d.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        residual = float(torch.sum((d - D @ beta) ** 2))
        return beta, residual, norm

    @torch.no_grad()
    def _distill(self, model: ContinualClassifier, key: str) -> dict:
        old = [k for k in sorted(model.sd_magnitudes.keys()) if k != key]
        layers = model.lora_layers()
        threshold = self.options.kd_threshold
        fits = {n: self.fit_new_direction(layer, key, old) for n, layer in layers.items()}
        residuals = {n: f[1] for n, f in fits.items()}
        absorb = all(r < threshold for r in residuals.values())
        if absorb:
            alpha_t = float(model.sd_magnitudes[key])
            for n, layer in layers.items():
                beta, _, norm = fits[n]
                # the layer's new update is alpha_t ||B A|| / n_t times the unit direction
                # (n_t = 1 unless the current direction was normalised: `boundary: paper`)
                if self.normalise_current:
                    norm = norm / float(self.direction_norm(layer, key))
                for k, b in zip(old, beta.tolist()):
                    layer.sd_offsets[k] = layer.sd_offsets.get(k, 0.0) + alpha_t * norm * b
                layer.remove_adapter(key)
            del model.sd_magnitudes[key]
        return {"absorbed": absorb, "max_residual": max(residuals.values()),
                "residuals": residuals, "threshold": threshold}

    # -- state -----------------------------------------------------------------------------
    def task_state(self, model: ContinualClassifier, task_id: int):
        key = task_key(task_id)
        adapter: dict[str, torch.Tensor] = {}
        offsets: dict[str, torch.Tensor] = {}
        for n, layer in model.lora_layers().items():
            if key in layer.lora_A:
                adapter[f"{n}.lora_A"] = layer.lora_A[key].detach().contiguous()
                adapter[f"{n}.lora_B"] = layer.lora_B[key].detach().contiguous()
            for k, v in layer.sd_offsets.items():
                offsets[f"{n}|{k}"] = torch.tensor(float(v))
        magnitudes = {k: v.detach().reshape(1).clone() for k, v in model.sd_magnitudes.items()}
        return {"adapter": adapter, "magnitudes": magnitudes, "offsets": offsets,
                "head": head_state(model, key)}

    def load_task_state(self, model: ContinualClassifier, task_id: int, state) -> None:
        key = task_key(task_id)
        adapter = state.get("adapter", {})
        layers = model.lora_layers()
        for n, layer in layers.items():
            if f"{n}.lora_A" in adapter:
                A, B = adapter[f"{n}.lora_A"], adapter[f"{n}.lora_B"]
                if key not in layer.lora_A:
                    layer.add_adapter(key, A.shape[0])
                layer.set_adapter_weights(key, B, A)
        ref = next(iter(layers.values())).weight
        for k, v in state.get("magnitudes", {}).items():  # magnitudes as after task `task_id`
            if k in model.sd_magnitudes:
                with torch.no_grad():
                    model.sd_magnitudes[k].copy_(v)
            else:
                model.sd_magnitudes[k] = nn.Parameter(v.reshape(1).to(ref.device, ref.dtype).clone())
        for layer in layers.values():
            layer.sd_offsets = {}
        for name, v in state.get("offsets", {}).items():
            n, k = name.rsplit("|", 1)
            layers[n].sd_offsets[k] = float(v)
        load_head(model, key, state["head"])
        self._wire(model, current=key if key in model.sd_magnitudes else None)
        freeze(model)

    def params_added(self, model: ContinualClassifier, task_id: int) -> int:
        key = task_key(task_id)
        n = sum(p.numel() for layer in model.lora_layers().values() if key in layer.lora_A
                for p in (layer.lora_A[key], layer.lora_B[key]))
        n += 1 if key in model.sd_magnitudes else 0
        return int(n + sum(p.numel() for p in model.heads[key].parameters()))

    # -- prediction ------------------------------------------------------------------------
    def activate_model(self, model: ContinualClassifier, upto_task: int) -> None:
        """The model after `upto_task` (it must hold exactly tasks 0..upto_task, as loaded)."""
        key = task_key(upto_task)
        keys = self._wire(model, current=key if key in model.sd_magnitudes else None)
        model.activate([k for k in keys if int(k[1:]) <= upto_task],
                       [task_key(i) for i in range(upto_task + 1)])


@register_method
class SDLoRARR(SDLoRA):
    """SD-LoRA-RR: rank reduction over time (`rank_schedule`, default 10/8/6)."""

    name = "sdlora_rr"
    Options = SDLoRARROptions

    def rank_for(self, task_id: int) -> int:
        schedule = list(self.options.rank_schedule) or RR_SCHEDULE
        return int(schedule[min(task_id, len(schedule) - 1)])


@register_method
class SDLoRAKD(SDLoRA):
    """SD-LoRA-KD: absorb a new direction that the old ones already span (see module docstring)."""

    name = "sdlora_kd"
    Options = SDLoRAKDOptions
    options: SDLoRAKDOptions
    distill = True
