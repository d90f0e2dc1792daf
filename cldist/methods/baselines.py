"""Baselines every comparison needs.

seq_ft: full fine-tuning task after task with a growing head (one linear head per task,
concatenated). The lower bound: nothing protects old tasks, so they are overwritten.

seq_lora: ONE fixed-rank LoRA (rank 8 on q and v) trained continually across all tasks, with a
growing head; no isolation, so later tasks overwrite what earlier ones learned in the adapter.

joint: the upper bound - at task t, train on the data of tasks 0..t mixed, over all seen classes.

linear_probe: the frozen pre-trained backbone and one linear head per task: features never
change, so whatever Class-IL accuracy it loses is cross-task confusion between the heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..config.schema import MethodOptions
from ..models.continual import ContinualClassifier, freeze, task_key
from .common import LoRAOptions, adapter_model, freeze_batchnorm_stats, head_state, load_head
from .base import (ContinualMethod, FitRequest, TaskContext, current_task_loss,
                   register_method, trainable)


@dataclass
class SeqFTOptions(MethodOptions):
    """configs/method/seq_ft.yaml (targets unused: no adapters)."""
    name: str = "seq_ft"
    epochs: int = 4
    optimizer: str = "sgd"
    lr: float = 1e-2


@register_method
class SeqFT(ContinualMethod):
    name = "seq_ft"
    Options = SeqFTOptions
    prediction = "single"
    graph = "chain"

    def learn_task(self, model: ContinualClassifier, ctx: TaskContext) -> dict:
        key = task_key(ctx.task_id)
        model.add_head(key, ctx.n_classes, ctx.generator)
        # train on the current task's logits only (the Class-IL convention of every method here)
        model.activate([], [key])
        params = list(model.backbone.parameters()) + list(model.heads[key].parameters())
        fit = ctx.fit(model, FitRequest("finetune", trainable(params),
                                        loss_fn=current_task_loss(ctx.offset)))
        freeze(model)
        return {"fits": [fit]}

    def task_state(self, model: ContinualClassifier, task_id: int):
        key = task_key(task_id)
        return {"backbone": {k: v.detach().contiguous() for k, v in model.backbone.state_dict().items()},
                "head": {k: v.detach().contiguous() for k, v in model.heads[key].state_dict().items()}}

    def load_task_state(self, model: ContinualClassifier, task_id: int, state) -> None:
        key = task_key(task_id)
        model.backbone.load_state_dict(state["backbone"])
        if key not in model.heads:
            model.add_head(key, state["head"]["weight"].shape[0])
        model.heads[key].load_state_dict(state["head"])
        freeze(model)

    def params_added(self, model: ContinualClassifier, task_id: int) -> int:
        return int(sum(p.numel() for p in model.heads[task_key(task_id)].parameters()))

    def activate_model(self, model: ContinualClassifier, upto_task: int) -> None:
        model.activate([], [task_key(i) for i in range(upto_task + 1)])


@dataclass
class SeqLoRAOptions(LoRAOptions):
    """configs/method/seq_lora.yaml."""
    name: str = "seq_lora"
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    rank: int = 8
    epochs: int = 4
    optimizer: str = "sgd"  # the SD-LoRA family's: seq-LoRA is their no-isolation control
    lr: float = 1e-2


@register_method
class SeqLoRA(ContinualMethod):
    """One LoRA (rank `rank`, scaling 1, A Kaiming, B zero; created at task 0) on the target roles
    (q, v), trained task after task together with that task's head; old heads frozen; loss on the
    current task's logits. The state after task t holds the adapter as it is after task t.
    CNN BatchNorm statistics stay frozen, as in the other adapter methods."""

    name = "seq_lora"
    Options = SeqLoRAOptions
    options: SeqLoRAOptions
    prediction = "single"
    graph = "chain"
    adapter = "lora"

    def build(self, backbone: nn.Module, feature_dim: int,
              classes_per_task: Sequence[int]) -> ContinualClassifier:
        return adapter_model(backbone, feature_dim, self.target_patterns, self.options.blocks)

    def learn_task(self, model: ContinualClassifier, ctx: TaskContext) -> dict:
        key = task_key(ctx.task_id)
        layers = model.lora_layers()
        for layer in layers.values():
            if self.adapter not in layer.lora_A:
                layer.add_adapter(self.adapter, min(self.options.rank, layer.max_rank()),
                                  scaling=1.0, generator=ctx.generator)
        model.add_head(key, ctx.n_classes, ctx.generator)
        model.activate([self.adapter], [key])
        freeze(model)
        params = [p for layer in layers.values()
                  for p in (layer.lora_A[self.adapter], layer.lora_B[self.adapter])]
        params += list(model.heads[key].parameters())
        fit = ctx.fit(model, FitRequest("seq_lora", trainable(params),
                                        loss_fn=current_task_loss(ctx.offset)))
        freeze(model)
        return {"fits": [fit]}

    def task_state(self, model: ContinualClassifier, task_id: int):
        adapter = {}
        for n, layer in model.lora_layers().items():
            adapter[f"{n}.lora_A"] = layer.lora_A[self.adapter].detach().contiguous()
            adapter[f"{n}.lora_B"] = layer.lora_B[self.adapter].detach().contiguous()
        return {"adapter": adapter, "head": head_state(model, task_key(task_id))}

    def load_task_state(self, model: ContinualClassifier, task_id: int, state) -> None:
        for n, layer in model.lora_layers().items():
            A, B = state["adapter"][f"{n}.lora_A"], state["adapter"][f"{n}.lora_B"]
            if self.adapter not in layer.lora_A:
                layer.add_adapter(self.adapter, A.shape[0])
            layer.set_adapter_weights(self.adapter, B, A)
        load_head(model, task_key(task_id), state["head"])
        freeze(model)

    def params_added(self, model: ContinualClassifier, task_id: int) -> int:
        n = sum(p.numel() for p in model.heads[task_key(task_id)].parameters())
        if task_id == 0:  # the one adapter is created by the first task
            n += sum(p.numel() for layer in model.lora_layers().values()
                     for p in (layer.lora_A[self.adapter], layer.lora_B[self.adapter]))
        return int(n)

    def activate_model(self, model: ContinualClassifier, upto_task: int) -> None:
        model.activate([self.adapter], [task_key(i) for i in range(upto_task + 1)])


def seen_classes_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the logits of every seen class (heads 0..t concatenated in task order,
    so column j is stream label j)."""
    return nn.functional.cross_entropy(logits, labels)


@dataclass
class JointOptions(MethodOptions):
    """configs/method/joint.yaml (targets unused: no adapters)."""
    name: str = "joint"
    epochs: int = 4


@register_method
class Joint(ContinualMethod):
    """The upper bound. At task t: start from the INITIAL backbone (pre-trained or the run's
    random init) and fresh heads 0..t, and fine-tune everything on the data of tasks 0..t mixed
    together (`FitRequest(data="seen")`), cross-entropy over all seen classes' logits.

    Choice: re-training from the initial backbone at every task (rather than continuing from the
    model after task t-1) makes row t of the accuracy matrix the accuracy of joint training on
    tasks 0..t, independent of the task order and of how many epochs earlier tasks added. The
    graph stays "chain" (tasks run in order) but a task loads no earlier state: its own state
    holds the whole backbone and every head 0..t."""

    name = "joint"
    Options = JointOptions
    prediction = "single"
    graph = "chain"

    def state_dependencies(self, task_id: int) -> list[int]:
        return []

    def learn_task(self, model: ContinualClassifier, ctx: TaskContext) -> dict:
        keys = [task_key(i) for i in range(ctx.task_id + 1)]
        for i, key in enumerate(keys):
            model.add_head(key, ctx.classes_per_task[i], ctx.generator)
        model.activate([], keys)
        freeze(model)
        params = list(model.backbone.parameters())
        params += [p for key in keys for p in model.heads[key].parameters()]
        fit = ctx.fit(model, FitRequest("joint", trainable(params), loss_fn=seen_classes_loss,
                                        data="seen"))
        freeze(model)
        return {"fits": [fit]}

    def task_state(self, model: ContinualClassifier, task_id: int):
        heads = {f"{key}.{k}": v for key in model.heads for k, v in head_state(model, key).items()}
        return {"backbone": {k: v.detach().contiguous()
                             for k, v in model.backbone.state_dict().items()},
                "heads": heads}

    def load_task_state(self, model: ContinualClassifier, task_id: int, state) -> None:
        model.backbone.load_state_dict(state["backbone"])
        for key in sorted({k.split(".", 1)[0] for k in state["heads"]}):
            load_head(model, key, {k.split(".", 1)[1]: v for k, v in state["heads"].items()
                                   if k.split(".", 1)[0] == key})
        freeze(model)

    def params_added(self, model: ContinualClassifier, task_id: int) -> int:
        return int(sum(p.numel() for p in model.heads[task_key(task_id)].parameters()))

    def activate_model(self, model: ContinualClassifier, upto_task: int) -> None:
        model.activate([], [task_key(i) for i in range(upto_task + 1)])


@dataclass
class LinearProbeOptions(MethodOptions):
    """configs/method/linear_probe.yaml (targets unused: no adapters)."""
    name: str = "linear_probe"
    epochs: int = 4
    optimizer: str = "sgd"  # as seq_ft: only a linear head trains
    lr: float = 1e-2


@register_method
class LinearProbe(ContinualMethod):
    """Zero-forgetting reference for the features: the backbone (BatchNorm statistics included)
    never changes; task t trains only its head h_t on its own logits, and Class-IL prediction
    takes argmax over the concatenated heads, pred(x) = argmax_c [h_0(f(x)), ..., h_t(f(x))]_c.

    Any gap to joint is therefore the heads' cross-task confusion, never lost features: with
    task-local cross-entropy the gradient of every head sums to zero over its classes, so under
    SGD without weight decay (the config's) the level each head's logits sit at - their common
    mode, which decides between tasks - is never trained, only initialised.
    Tasks depend on nothing but the backbone (graph "independent"); each task is a sub-network
    (backbone + its head), so the evaluator scores a head once per test set."""

    name = "linear_probe"
    Options = LinearProbeOptions
    prediction = "subnetworks"
    graph = "independent"
    class_statistics = True  # the router of the routed Class-IL decision

    def build(self, backbone: nn.Module, feature_dim: int,
              classes_per_task: Sequence[int]) -> ContinualClassifier:
        model = super().build(backbone, feature_dim, classes_per_task)  # frozen, no adapters
        freeze_batchnorm_stats(model)
        return model

    def learn_task(self, model: ContinualClassifier, ctx: TaskContext) -> dict:
        key = task_key(ctx.task_id)
        model.add_head(key, ctx.n_classes, ctx.generator)
        model.activate([], [key])
        fit = ctx.fit(model, FitRequest("probe", trainable(model.heads[key].parameters()),
                                        loss_fn=current_task_loss(ctx.offset)))
        freeze(model)
        return {"fits": [fit]}

    def task_state(self, model: ContinualClassifier, task_id: int):
        return {"head": head_state(model, task_key(task_id))}

    def load_task_state(self, model: ContinualClassifier, task_id: int, state) -> None:
        load_head(model, task_key(task_id), state["head"])
        freeze(model)

    def activate_subnetwork(self, model: ContinualClassifier, task_id: int) -> None:
        model.activate([], [task_key(task_id)])
