"""The contract every continual-learning method honours, and the method registry.

A method owns the maths of one task: which layers get LoRA and of what form, what trains in
which phase, how ranks or subspaces are chosen, what is frozen or merged afterwards, and how
the model predicts. The trainer (`cldist.train.loop.fit`) owns the loop; the runners own where
it runs. A method never touches Ray, DeepSpeed, files or the data pipeline: it receives a
`TaskContext` whose callables do that for it.

Options: a method declares its keys as a dataclass subclassing
`cldist.config.schema.MethodOptions` (the shared keys: name, targets, epochs, lr, weight_decay,
optimizer, head_init) with its own `problems()`, names it as `Options`, and receives it typed
as `self.options`; `@register_method` registers both. The trainer applies the shared optimiser
keys itself: a `FitRequest` leaves epochs, lr, optimizer and weight_decay to the run, and a
phase with its own learning rate names its options key (`lr_key="stage1_lr"`).

Lifecycle for task t (either runner):
    method = Method.from_run(cfg)                       # cldist.assemble.make_method
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

from ..config.schema import (METHOD_OPTIONS, MethodOptions, RunConfig, register_options,
                             resolve_targets)
from ..models.continual import ContinualClassifier, freeze

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class FitRequest:
    """One training phase: what trains, with which loss; for how long and how fast the trainer
    fills in from the run's options (`cldist.train.task.with_run_defaults`)."""

    phase: str
    params: list[nn.Parameter]
    # None: the run's main epochs (method.epochs, or trainer.epochs when set); an int where a
    # phase has its own epochs key (PEARL's stage1_epochs, reference_epochs)
    epochs: int | None = None
    # None: the trainer reads the options key `lr_key`; a float only outside a run (benchmarks)
    lr: float | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # None: the run's method.weight_decay (the trainer applies the shared optimiser keys, so no
    # method can drop one); a float only where a phase must differ (PEARL's stage 1)
    weight_decay: float | None = None
    # called after every optimiser step (CoDyRA's proximal step) with (step, total_steps)
    after_step: Callable[[int, int], None] | None = None
    # "task": the current task's data; "seen": tasks 0..t mixed (the joint baseline)
    data: str = "task"
    # "adamw" | "sgd" (`cldist.train.engine.make_optimizer`); None: the run's method.optimizer
    optimizer: str | None = None
    # the options key the learning rate comes from: "lr", or e.g. PEARL's "stage1_lr"; the
    # trainer reads it, and names `method.<lr_key>` when the loss becomes NaN
    lr_key: str = "lr"

    def __post_init__(self):
        if self.loss_fn is None:
            raise TypeError(f"FitRequest {self.phase!r}: loss_fn is required")


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
    # the method's options dataclass (a MethodOptions subclass whose `name` defaults to `name`)
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    prediction: ClassVar[str] = "single"  # "single" | "subnetworks"
    graph: ClassVar[str] = "chain"  # "chain" | "independent" (after an optional reference task)
    # the task job saves class statistics with every task (the routed Class-IL decision of
    # sub-network methods, and slda's whole model); every "subnetworks" method needs them
    class_statistics: ClassVar[bool] = False

    def __init__(self, options: MethodOptions, target_patterns: Sequence[str], is_cnn: bool):
        if not isinstance(options, self.Options):
            raise TypeError(f"method {self.name} takes {self.Options.__name__}, not "
                            f"{type(options).__name__}")
        self.options = options
        self.target_patterns = list(target_patterns)
        self.is_cnn = is_cnn

    @classmethod
    def from_run(cls, cfg: RunConfig, target_patterns: Sequence[str] | None = None,
                 is_cnn: bool | None = None) -> "ContinualMethod":
        """The method for a run: its options (`cfg.method`), the module patterns of its target
        roles on the run's backbone, and whether that is a CNN (either may be given instead).
        A method that needs more of the run (PEARL's reference, slda's router) overrides it."""
        return cls(cfg.method, resolve_targets(cfg) if target_patterns is None else target_patterns,
                   cfg.backbone.family == "cnn" if is_cnn is None else is_cnn)

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
    """Register a method and its options class (see `cldist.config.schema.MethodOptions`)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    register_options(cls.name, cls.Options)
    METHODS[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Forget a method (tests that register one of their own)."""
    METHODS.pop(name, None)
    METHOD_OPTIONS.pop(name, None)


def get_method_class(name: str) -> type[ContinualMethod]:
    """A registered method's class (`import cldist.methods` registers the built-in ones)."""
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
