"""Baselines every comparison needs.

seq_ft: full fine-tuning task after task with a growing head (one linear head per task,
concatenated). The lower bound: nothing protects old tasks, so they are overwritten.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..models.continual import ContinualClassifier, freeze, task_key
from .base import (ContinualMethod, FitRequest, TaskContext, current_task_loss,
                   register_method, trainable)


@register_method
class SeqFT(ContinualMethod):
    name = "seq_ft"
    prediction = "single"
    graph = "chain"

    def build(self, backbone: nn.Module, feature_dim: int,
              classes_per_task: Sequence[int]) -> ContinualClassifier:
        model = ContinualClassifier(backbone, feature_dim)
        freeze(model)
        return model

    def learn_task(self, model: ContinualClassifier, ctx: TaskContext) -> dict:
        key = task_key(ctx.task_id)
        model.add_head(key, ctx.n_classes, ctx.generator)
        # train on the current task's logits only (the Class-IL convention of every method here)
        model.activate([], [key])
        params = list(model.backbone.parameters()) + list(model.heads[key].parameters())
        fit = ctx.fit(model, FitRequest("finetune", trainable(params), int(self.cfg["epochs"]),
                                        float(self.cfg["lr"]), current_task_loss(ctx.offset)))
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
