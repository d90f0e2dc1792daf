"""The contract every continual-learning method honours, and the method registry.

A method owns the maths of one task: which layers get LoRA and of what form, what trains in
which phase, how ranks or subspaces are chosen, what is frozen or merged afterwards, and how
the model predicts. The trainer (`cldist.train.loop.fit`) owns the loop; the runners own where
it runs. A method never touches Ray, DeepSpeed, files or the data pipeline: it receives a
`TaskContext` whose callables do that for it.

Lifecycle for task t (either runner):
    model = method.build(backbone, feature_dim, classes_per_task)
    for s < t that t depends on: method.load_task_state(model, s, saved tensors of s)
    meta = method.learn_task(model, ctx)                # phases via ctx.fit(...)
    tensors = method.task_state(model, t)               # what `tasks/TTT/*.safetensors` hold
Prediction (Class-IL, no task id):
    prediction == "subnetworks": for each task i, method.activate_subnetwork(model, i) gives the
        logits of task i's classes; the evaluator concatenates them over i and takes argmax.
    prediction == "single": method.activate_model(model, t), after loading the tasks
        method.prediction_dependencies(t), gives one model over all classes seen up to t.
Class statistics: for a method with `class_statistics`, the task job follows `learn_task`
with one no-grad pass over the task's training split (test-time transform) and saves the
class statistics it gathers as tasks/TTT/stats.safetensors beside the method's own files
(cldist.train.statistics); `load_task_state` then receives them under the "stats" stem.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
from torch import nn

from ..models.continual import ContinualClassifier, freeze

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class FitRequest:
    """One training phase: what trains, for how long, with which loss."""

    phase: str
    params: list[nn.Parameter]
    epochs: int
    lr: float
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # None: the run's method.weight_decay (the trainer applies the shared optimiser keys, so no
    # method can drop one); a float only where a phase must differ (PEARL's stage 1)
    weight_decay: float | None = None
    # called after every optimiser step (CoDyRA's proximal step) with (step, total_steps)
    after_step: Callable[[int, int], None] | None = None
    # "task": the current task's data; "seen": tasks 0..t mixed (the joint baseline)
    data: str = "task"
    # "adamw" | "sgd" (`cldist.train.engine.make_optimizer`); None: the run's method.optimizer
    optimizer: str | None = None


@dataclass
class TaskContext:
    """Everything a method may use while learning one task."""

    task_id: int
    n_tasks: int
    classes_per_task: list[int]
    class_offsets: list[int]
    fit: Callable[[nn.Module, FitRequest], dict]
    # layer name -> (reference weight, fine-tuned weight) -> layer name -> RankDecision
    allocate_ranks: Callable[[dict[str, tuple[torch.Tensor, torch.Tensor]], dict], dict]
    # epoch -> this rank's training batches; used for no-grad statistics passes
    train_batches: Callable[[int], Iterable[Batch]]
    generator: torch.Generator
    device: torch.device
    # epoch -> this rank's batches drawn from tasks 0..t mixed together (the joint baseline)
    seen_train_batches: Callable[[int], Iterable[Batch]] | None = None
    # mean of a tensor over all data-parallel ranks (identity with one rank): statistics
    # passes such as InfLoRA's Gram matrices must see the whole task, not one rank's share
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    # steps per epoch of `fit` for the current task (schedules that depend on the iteration)
    steps_per_epoch: int = 1
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return self.classes_per_task[self.task_id]

    @property
    def offset(self) -> int:
        return self.class_offsets[self.task_id]


class ContinualMethod:
    """Base class; subclasses register with `@register_method`."""

    name: ClassVar[str] = ""
    prediction: ClassVar[str] = "single"  # "single" | "subnetworks"
    graph: ClassVar[str] = "chain"  # "chain" | "independent" (after an optional reference task)
    # the task job saves class statistics with every task (the routed Class-IL decision of
    # sub-network methods, and slda's whole model); every "subnetworks" method needs them
    class_statistics: ClassVar[bool] = False

    def __init__(self, cfg: dict, target_patterns: Sequence[str], is_cnn: bool):
        self.cfg = dict(cfg)
        self.target_patterns = list(target_patterns)
        self.is_cnn = is_cnn

    @property
    def official(self) -> bool:
        """`variant: official`: the authors' code where it departs from the paper."""
        return self.cfg.get("variant", "paper") == "official"

    # -- scheduling ------------------------------------------------------------------------
    def task_graph(self, n_tasks: int) -> list[list[int]]:
        """deps[t] = tasks that must be finished (and their state loaded) before task t."""
        return [list(range(t)) for t in range(n_tasks)] if self.graph == "chain" else \
            [[] for _ in range(n_tasks)]

    def state_dependencies(self, task_id: int) -> list[int]:
        """Tasks whose saved state must be loaded into the model before learning `task_id`."""
        return self.task_graph(task_id + 1)[task_id]

    def prediction_dependencies(self, upto_task: int) -> list[int]:
        """Tasks whose saved state a single model after `upto_task` is built from."""
        return self.state_dependencies(upto_task) + [upto_task]

    # -- model -----------------------------------------------------------------------------
    def build(self, backbone: nn.Module, feature_dim: int,
              classes_per_task: Sequence[int]) -> ContinualClassifier:
        """The model before any task: by default the frozen backbone, no adapters, no heads."""
        model = ContinualClassifier(backbone, feature_dim)
        freeze(model)
        return model

    def learn_task(self, model: ContinualClassifier, ctx: TaskContext) -> dict:
        raise NotImplementedError

    def task_state(self, model: ContinualClassifier, task_id: int) -> dict[str, dict[str, torch.Tensor]]:
        """{file stem: tensors} saved as tasks/TTT/<stem>.safetensors after `task_id`."""
        raise NotImplementedError

    def load_task_state(self, model: ContinualClassifier, task_id: int,
                        state: dict[str, dict[str, torch.Tensor]]) -> None:
        raise NotImplementedError

    def reference_state(self, model: ContinualClassifier) -> dict[str, torch.Tensor] | None:
        """Weights every later task starts from, when the method trains its own reference."""
        return None

    def load_reference_state(self, model: ContinualClassifier, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def params_added(self, model: ContinualClassifier, task_id: int) -> int:
        """Parameters this task added to what is kept after it (adapters, heads, norms)."""
        return int(sum(t.numel() for f in self.task_state(model, task_id).values()
                       for t in f.values()))

    # -- prediction ------------------------------------------------------------------------
    def activate_subnetwork(self, model: ContinualClassifier, task_id: int) -> None:
        raise NotImplementedError

    def activate_model(self, model: ContinualClassifier, upto_task: int) -> None:
        raise NotImplementedError


METHODS: dict[str, type[ContinualMethod]] = {}


def register_method(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[ContinualMethod]:
    from . import load_all  # noqa: F401  - registration happens on import
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(METHODS)}") from None


def current_task_loss(offset: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy on the current task's logits only; labels shifted to 0..n_t-1."""
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels - offset)
    return loss


def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    out = []
    for p in params:
        p.requires_grad_(True)
        out.append(p)
    return out
