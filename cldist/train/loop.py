"""The training loop: one phase, a fixed trainable set, an engine that applies the updates.

`fit` is the same for the inline runner (a plain torch optimiser) and the Ray runner (a DeepSpeed
engine per phase): only `make_engine` differs. Each rank iterates over its own share of the
task's batches; the engine (DeepSpeed) averages gradients across ranks.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import UserError
from ..methods.base import FitRequest
from .engine import StepEngine

# (module, params, lr, weight_decay, total_steps, optimizer=...) -> engine
MakeEngine = Callable[..., StepEngine]
OnEpoch = Callable[[str, int, int, float, float], None]


class NonFiniteLoss(UserError):
    """Training produced a NaN/inf loss; the message names the task, phase, step and lr.

    A user error: almost always a learning rate too high for the data (or bad data), fixed
    by resuming with a lower one - the stream driver adds the resume command.
    """


# Steps between host reads of the loss on a GPU: `float(loss)` makes the host wait for the
# GPU every step, so the losses stay on the device and are read (and checked) in one go.
LOSS_CHECK_EVERY_GPU = 32


def fit(model: nn.Module, request: FitRequest,
        batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
        steps_per_epoch: int, make_engine: MakeEngine, device: torch.device,
        on_epoch: OnEpoch | None = None, task_id: int = -1, lr_key: str | None = None,
        check_every: int | None = None) -> dict:
    """Train `request.params` for `request.epochs` epochs; returns per-epoch losses and timing.

    `lr_key` names the config key `request.lr` came from, for the NaN message.

    The NaN/inf check reads the losses on the host every `check_every` steps and at the end of
    each epoch (default: every step on a CPU, where reading costs nothing, and every
    `LOSS_CHECK_EVERY_GPU` steps on a GPU, so the host does not wait for the device every
    step). A non-finite loss raises `NonFiniteLoss` naming the step where it first appeared;
    with `check_every` > 1 that happens up to `check_every - 1` steps later, after those steps
    have updated the (by then NaN) weights - the task fails either way and nothing of it is kept.
    With `check_every` = 1 it raises before the bad step's update, as it always did.
    """
    total_steps = max(1, request.epochs * steps_per_epoch)
    if check_every is None:
        check_every = 1 if torch.device(device).type == "cpu" else LOSS_CHECK_EVERY_GPU
    check_every = max(1, int(check_every))
    begin = time.perf_counter()
    weight_decay = 0.0 if request.weight_decay is None else float(request.weight_decay)
    engine = make_engine(model, request.params, request.lr, weight_decay, total_steps,
                         optimizer=request.optimizer or "adamw")
    engine_seconds = time.perf_counter() - begin  # DeepSpeed's start-up, for the benchmarks
    model.train()
    losses: list[float] = []
    lrs: list[float] = []
    step = 0
    start = time.perf_counter()
    # (step, loss on the device, batch size) of the steps whose loss the host has not read yet
    pending: list[tuple[int, torch.Tensor, int]] = []
    running = 0.0

    def read_losses() -> None:
        """Read the pending losses in one transfer, check them, add them to the epoch's sum."""
        nonlocal running
        if not pending:
            return
        values = torch.stack([loss for _, loss, _ in pending]).tolist()
        for (at, _, n), value in zip(pending, values):
            if not math.isfinite(value):
                key = lr_key or "method.lr / method.stage1_lr"
                err = NonFiniteLoss(f"task {task_id}, phase {request.phase}: the loss became "
                                    f"{value} at step {at} with learning rate "
                                    f"{request.lr:g}; lower {key} (or check the data)")
                err.resume_overrides = f"--allow-lr-change {lr_key}=LOWER" if lr_key else \
                    "--allow-lr-change method.lr=LOWER"
                raise err
            running += value * n
        pending.clear()

    for epoch in range(request.epochs):
        running, seen = 0.0, 0
        for images, labels in batches(epoch):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = engine.module(images)
            loss = request.loss_fn(logits.float(), labels)
            pending.append((step, loss.detach(), labels.shape[0]))
            if len(pending) >= check_every:
                read_losses()
            engine.backward_and_step(loss)
            if request.after_step is not None:
                request.after_step(step, total_steps)
            seen += labels.shape[0]
            step += 1
        read_losses()
        epoch_loss = running / max(1, seen)
        losses.append(epoch_loss)
        lrs.append(engine.lr())
        if on_epoch is not None:
            on_epoch(request.phase, epoch, request.epochs, epoch_loss, lrs[-1])
    engine.finish()
    model.eval()
    return {"phase": request.phase, "epochs": request.epochs, "steps": step,
            "losses": losses, "lrs": lrs, "seconds": time.perf_counter() - start,
            "engine_seconds": engine_seconds,
            "trainable_params": int(sum(p.numel() for p in request.params))}
