"""The step engine: what a training loop needs from an optimiser back-end.

The trainer owns the loop; an engine owns how a loss becomes a parameter update. The inline
runner uses `TorchStepEngine` (a plain torch optimiser); the Ray runner uses
`cldist.distributed.deepspeed_engine.DeepSpeedStepEngine`, which wraps the same model in a
DeepSpeed engine. Both expose the same three members, so `cldist.train.loop` never knows which
one it drives.
"""
from __future__ import annotations

from typing import Iterable, Protocol

import torch
from torch import nn

from ..choices import OPTIMIZERS


class StepEngine(Protocol):
    """One optimiser back-end driving one phase of training (a fixed trainable set)."""

    module: nn.Module

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Back-propagate `loss`, update the trainable parameters, clear the gradients."""

    def lr(self) -> float:
        """The learning rate in force for the next step."""

    def finish(self) -> None:
        """Release optimiser state; after this `module` holds the trained (gathered) weights."""


SGD_MOMENTUM = 0.9  # SD-LoRA's official code: SGD, momentum 0.9


def make_optimizer(name: str, params: list[nn.Parameter], lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """The optimiser every engine builds: `adamw` (torch AdamW, the default) or `sgd` (SGD with
    momentum 0.9, the SD-LoRA authors' code). They differ in more than speed: AdamW moves every
    parameter by about lr per step whatever its gradient, SGD in proportion to its gradient -
    so a scalar shared by many layers (SD-LoRA's magnitudes) moves far more under SGD."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r} is not known; choose one of {', '.join(OPTIMIZERS)} "
                     f"(method.optimizer)")


class TorchStepEngine:
    """A plain torch optimiser (`make_optimizer`) with a cosine schedule over `total_steps`
    (the inline runner's engine)."""

    def __init__(self, module: nn.Module, params: Iterable[nn.Parameter], lr: float,
                 weight_decay: float, total_steps: int, optimizer: str = "adamw"):
        self.module = module
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("TorchStepEngine: no trainable parameters were given")
        self.optimizer = make_optimizer(optimizer, self.params, lr, weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(1, total_steps))

    def backward_and_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def finish(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer = None  # type: ignore[assignment]
