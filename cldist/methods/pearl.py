"""PEARL: dynamic-rank LoRA per task, from the SVD of a task vector (arXiv 2505.11998).

Reference weights W_r are the pre-trained backbone, or - when the backbone is not pre-trained -
the backbone after training task 0 in full (`reference: first_task`). For every other task t
and every target layer l:

    stage 1   fine-tune the target layers from W_r on task t for E1 epochs      -> W_t
    ranks     k_l from the SVD of W_t - W_r and the dynamic threshold          (coordinator,
              see cldist.coordinator.ranks for the formulas)
    init      B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T, then - by default - re-initialise the
              LoRA (A Kaiming, B zero), the task's norm layers (CNN) and its head; stage-1
              weights are discarded
    stage 2   train LoRA_t (+ its norms, + head_t) on the frozen W_r for E2 epochs; freeze

The re-initialised head follows `method.head_init` like every new head. `method.weight_decay`
applies to stage 2 and to the reference training (the trainer's default), not to stage 1:
decoupled decay pulls W_t towards 0, not towards W_r, so it would add a full-rank -lr wd W_r
term to the task vector whose spectrum decides the ranks. With `task_norms: false` (or on a
CNN whose norms are not per task) BatchNorm statistics are frozen after the reference, as in
the other adapter methods: train-mode forwards would otherwise drift the norms every
sub-network shares.

Tasks are independent given W_r, so tasks after the reference can train concurrently.
Class-IL inference runs every sub-network W_r + LoRA_t (+ norms_t) + head_t on every image and
takes the argmax of the concatenated logits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..config.schema import (MethodOptions, RunConfig, has_pretrained_weights, must_be, one_of,
                             positive_lr)
from ..coordinator.ranks import THRESHOLD_RULES
from ..models.continual import ContinualClassifier, freeze, task_key
from ..models.inject import inject_lora, inject_task_norms
from .base import (ContinualMethod, FitRequest, TaskContext, current_task_loss,
                   register_method, trainable)
from .common import freeze_batchnorm_stats


REFERENCES = ("auto", "pretrained", "first_task")


@dataclass
class PearlOptions(MethodOptions):
    """configs/method/pearl.yaml; `epochs` and `lr` are stage 2's."""
    name: str = "pearl"
    targets: list[str] = field(default_factory=lambda: ["k"])
    epochs: int = 4
    lr: float = 3e-3
    stage1_epochs: int = 1  # E1: fine-tune the target layers from W_r for the task vector
    stage1_lr: float = 1e-3  # stage 1's and the reference training's learning rate
    reference: str = "auto"  # auto | pretrained | first_task (W_r = weights after task 0)
    reference_epochs: int = 4
    threshold_rule: str = "squashed"  # cldist.coordinator.ranks.THRESHOLD_RULES
    rule_params: dict[str, Any] = field(
        default_factory=lambda: {"scale": 2e-3, "t_min": 0.3, "t_max": 0.85})
    min_rank: int = 1
    max_rank: Optional[int] = 32
    reinit: bool = True  # re-initialise LoRA/norms/head after the SVD init (the paper's ablation)
    task_norms: bool = True  # CNNs: one private copy of every BatchNorm per task

    def problems(self) -> list[str]:
        p = super().problems()
        p += must_be("method.stage1_epochs", self.stage1_epochs, self.stage1_epochs >= 0,
                     "must be >= 0")
        p += must_be("method.reference_epochs", self.reference_epochs,
                     self.reference_epochs >= 1, "must be >= 1")
        p += must_be("method.min_rank", self.min_rank, self.min_rank >= 1, "must be >= 1")
        if self.max_rank is not None and self.max_rank < self.min_rank:
            p.append(f"method.max_rank={self.max_rank}: must be >= method.min_rank "
                     f"({self.min_rank})")
        p += positive_lr("method.stage1_lr", self.stage1_lr)
        p += one_of("method.threshold_rule", self.threshold_rule, sorted(THRESHOLD_RULES))
        p += must_be("method.reference", self.reference, self.reference in REFERENCES,
                     "choose auto, pretrained or first_task")
        return p

    def run_problems(self, cfg: RunConfig) -> list[str]:
        if self.reference == "pretrained" and not has_pretrained_weights(cfg):
            return ["method.reference=pretrained but the backbone has no pre-trained weights "
                    "(backbone.checkpoint / backbone.pretrained): set method.reference=first_task"]
        return []


@register_method
class Pearl(ContinualMethod):
    name = "pearl"
    Options = PearlOptions
    options: PearlOptions
    prediction = "subnetworks"
    graph = "independent"
    class_statistics = True  # the router of the routed Class-IL decision

    @classmethod
    def from_run(cls, cfg: RunConfig, target_patterns=None, is_cnn=None) -> "Pearl":
        """`reference: auto` becomes pretrained or first_task by the run's backbone weights."""
        method = super().from_run(cfg, target_patterns, is_cnn)
        if method.options.reference == "auto":
            method.options = dataclasses.replace(
                method.options,
                reference="pretrained" if has_pretrained_weights(cfg) else "first_task")
        return method

    # -- scheduling ------------------------------------------------------------------------
    @property
    def trains_reference(self) -> bool:
        return self.options.reference == "first_task"

    def task_graph(self, n_tasks: int) -> list[list[int]]:
        if self.trains_reference:
            return [[]] + [[0] for _ in range(1, n_tasks)]
        return [[] for _ in range(n_tasks)]

    def state_dependencies(self, task_id: int) -> list[int]:
        return []  # a sub-network needs only W_r, which the runner loads as the reference

    # -- model -----------------------------------------------------------------------------
    def build(self, backbone: nn.Module, feature_dim: int,
              classes_per_task: Sequence[int]) -> ContinualClassifier:
        model = ContinualClassifier(backbone, feature_dim)
        inject_lora(model.backbone, self.target_patterns)
        if self.is_cnn and self.options.task_norms:
            inject_task_norms(model.backbone)
        freeze(model)
        return model

    def learn_task(self, model: ContinualClassifier, ctx: TaskContext) -> dict:
        t, key = ctx.task_id, task_key(ctx.task_id)
        if self.trains_reference and t == 0:
            return self._learn_reference(model, ctx)
        opts = self.options
        loss = current_task_loss(ctx.offset)
        targets = model.lora_layers()
        if not model.task_norm_layers():
            # no private norms to hold this task's statistics: W_r's must not move (the
            # per-task norms' base copies are restored after stage 1 instead)
            freeze_batchnorm_stats(model)

        # stage 1: fine-tune the target layers (and the norms, for CNNs) from W_r
        reference = {n: layer.weight.detach().clone() for n, layer in targets.items()}
        norms_before = {n: {k: v.clone() for k, v in m.base.state_dict().items()}
                        for n, m in model.task_norm_layers().items()}
        model.add_head(key, ctx.n_classes, ctx.generator)
        model.activate([], [key])
        stage1_params = [layer.weight for layer in targets.values()]
        stage1_params += [p for m in model.task_norm_layers().values() for p in m.base.parameters()]
        stage1_params += list(model.heads[key].parameters())
        stage1 = ctx.fit(model, FitRequest("stage1", trainable(stage1_params),
                                           epochs=opts.stage1_epochs, lr_key="stage1_lr",
                                           loss_fn=loss, weight_decay=0.0))  # see the docstring
        fine_tuned = {n: layer.weight.detach().clone() for n, layer in targets.items()}
        # discard the stage-1 weights: W_r stays bit-identical for every later sub-network
        with torch.no_grad():
            for n, layer in targets.items():
                layer.weight.copy_(reference[n])
            for n, m in model.task_norm_layers().items():
                m.base.load_state_dict(norms_before[n])
        freeze(model)

        # ranks from the task vectors (the coordinator fans the SVDs out)
        reinit = opts.reinit
        decisions = ctx.allocate_ranks(
            {n: (reference[n], fine_tuned[n]) for n in targets},
            {"rule": opts.threshold_rule, "rule_params": dict(opts.rule_params),
             "min_rank": opts.min_rank, "max_rank": opts.max_rank,
             "return_factors": not reinit})

        # stage 2: a fresh LoRA of the allocated rank, fresh norms and head
        for n, layer in targets.items():
            d = decisions[n]
            layer.add_adapter(key, d["rank"], scaling=1.0, generator=ctx.generator)
            if not reinit:
                layer.set_adapter_weights(key, d["B"], d["A"])
        for m in model.task_norm_layers().values():
            m.add_adapter(key)  # a copy of the reference norm: "re-initialised" to W_r's
        model.init_head(model.heads[key], ctx.generator)  # `method.head_init`, as a new head
        model.activate([key], [key])
        stage2_params = self._task_params(model, key)
        stage2 = ctx.fit(model, FitRequest("stage2", trainable(stage2_params), loss_fn=loss))
        freeze(model)
        return {"ranks": {n: int(d["rank"]) for n, d in decisions.items()},
                "thresholds": {n: float(d["threshold"]) for n, d in decisions.items()},
                "distances": {n: float(d["distance"]) for n, d in decisions.items()},
                "fits": [stage1, stage2]}

    def _learn_reference(self, model: ContinualClassifier, ctx: TaskContext) -> dict:
        """Task 0 without a pre-trained backbone: train everything; the result is W_r."""
        key = task_key(0)
        model.add_head(key, ctx.n_classes, ctx.generator)
        model.activate([], [key])
        params = [p for n, p in model.named_parameters()
                  if ".lora_" not in n and ".branches." not in n]
        fit = ctx.fit(model, FitRequest("reference", trainable(params),
                                        epochs=self.options.reference_epochs, lr_key="stage1_lr",
                                        loss_fn=current_task_loss(ctx.offset)))
        freeze(model)
        return {"ranks": {}, "reference": True, "fits": [fit]}

    def _task_params(self, model: ContinualClassifier, key: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for layer in model.lora_layers().values():
            if key in layer.lora_A:
                params += [layer.lora_A[key], layer.lora_B[key]]
        for m in model.task_norm_layers().values():
            if key in m.branches:
                params += list(m.branches[key].parameters())
        return params + list(model.heads[key].parameters())

    # -- state -----------------------------------------------------------------------------
    def task_state(self, model: ContinualClassifier, task_id: int):
        key = task_key(task_id)
        adapter: dict[str, torch.Tensor] = {}
        for n, layer in model.lora_layers().items():
            if key in layer.lora_A:
                adapter[f"{n}.lora_A"] = layer.lora_A[key].detach().contiguous()
                adapter[f"{n}.lora_B"] = layer.lora_B[key].detach().contiguous()
        for n, m in model.task_norm_layers().items():
            if key in m.branches:
                for k, v in m.branches[key].state_dict().items():
                    adapter[f"{n}.norm.{k}"] = v.detach().contiguous()
        head = {k: v.detach().contiguous() for k, v in model.heads[key].state_dict().items()}
        return {"adapter": adapter, "head": head}

    def load_task_state(self, model: ContinualClassifier, task_id: int, state) -> None:
        key = task_key(task_id)
        adapter, head = state["adapter"], state["head"]
        for n, layer in model.lora_layers().items():
            if f"{n}.lora_A" in adapter:
                A, B = adapter[f"{n}.lora_A"], adapter[f"{n}.lora_B"]
                if key not in layer.lora_A:
                    layer.add_adapter(key, A.shape[0])
                layer.set_adapter_weights(key, B, A)
        for n, m in model.task_norm_layers().items():
            prefix = f"{n}.norm."
            sub = {k[len(prefix):]: v for k, v in adapter.items() if k.startswith(prefix)}
            if sub:
                if key not in m.branches:
                    m.add_adapter(key)
                m.branches[key].load_state_dict(sub)
        if key not in model.heads:
            model.add_head(key, head["weight"].shape[0])
        model.heads[key].load_state_dict(head)
        freeze(model)

    def reference_state(self, model: ContinualClassifier):
        if not self.trains_reference:
            return None
        return {k: v.detach().contiguous() for k, v in model.backbone.state_dict().items()
                if ".lora_" not in k and ".branches." not in k}

    def load_reference_state(self, model: ContinualClassifier, state) -> None:
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"reference weights hold unknown entries {unexpected[:3]}")
        freeze(model)

    # -- prediction ------------------------------------------------------------------------
    def activate_subnetwork(self, model: ContinualClassifier, task_id: int) -> None:
        key = task_key(task_id)
        model.activate([key], [key])
