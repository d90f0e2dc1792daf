"""The training loop: one phase, a fixed trainable set, an engine that applies the updates.

`fit` is the same for the inline runner (plain torch AdamW) and the Ray runner (a DeepSpeed
engine per phase): only `make_engine` differs. Each rank iterates over its own share of the
task's batches; the engine (DeepSpeed) averages gradients across ranks.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch
from torch import nn

from ..methods.base import FitRequest
from .engine import StepEngine

MakeEngine = Callable[[nn.Module, list, float, float, int], StepEngine]
OnEpoch = Callable[[str, int, int, float, float], None]


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the message names the task, phase and step."""


def fit(model: nn.Module, request: FitRequest,
        batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
        steps_per_epoch: int, make_engine: MakeEngine, device: torch.device,
        on_epoch: OnEpoch | None = None, task_id: int = -1) -> dict:
    """Train `request.params` for `request.epochs` epochs; returns per-epoch losses and timing."""
    total_steps = max(1, request.epochs * steps_per_epoch)
    engine = make_engine(model, request.params, request.lr, request.weight_decay, total_steps)
    model.train()
    losses: list[float] = []
    step = 0
    start = time.perf_counter()
    for epoch in range(request.epochs):
        running, seen = 0.0, 0
        for images, labels in batches(epoch):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = engine.module(images)
            loss = request.loss_fn(logits.float(), labels)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteLoss(f"task {task_id} {request.phase}: loss became {loss_value} at "
                                    f"step {step}; lower the learning rate (method.lr / "
                                    f"method.stage1_lr) or check the data")
            engine.backward_and_step(loss)
            if request.after_step is not None:
                request.after_step(step, total_steps)
            running += loss_value * labels.shape[0]
            seen += labels.shape[0]
            step += 1
        epoch_loss = running / max(1, seen)
        losses.append(epoch_loss)
        if on_epoch is not None:
            on_epoch(request.phase, epoch, request.epochs, epoch_loss, engine.lr())
    engine.finish()
    model.eval()
    return {"phase": request.phase, "epochs": request.epochs, "steps": step,
            "losses": losses, "seconds": time.perf_counter() - start,
            "trainable_params": int(sum(p.numel() for p in request.params))}
