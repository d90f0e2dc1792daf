"""slda: the training-free baseline of pre-trained-model continual learning.

Nothing is trained. The backbone stays as it was built (pre-trained, or the run's seeded
initialisation) and is the only network; each task's job collects the class statistics of its
training split on the backbone's features, f(x) (or, with `router.projection_dim` = P > 0,
ReLU(f(x) W) with the run's fixed random N(0, 1) projection W, d x P, as RanPAC), after the
task's (empty) learning step - the same "ref" statistics every method with class statistics
saves in tasks/TTT/stats.safetensors. The model after task t is the linear discriminant of
the statistics of tasks 0..t merged by summation (SLDA; SimpleCIL/APER, RanPAC and FeCAM keep
the same statistics), over all classes seen so far:

    Sigma   = scatter / max(N - C, 1)                       pooled within-class covariance
    Sigma_s = Sigma + s * mean(diag Sigma) * I               s = `router.shrinkage`
    g_c(x)  = mu_c^T Sigma_s^{-1} x - 1/2 mu_c^T Sigma_s^{-1} mu_c     (equal class priors)
    prediction = argmax_c g_c(x)

(cldist.coordinator.discriminant.LinearDiscriminant). The merge is exact and order-free, so tasks are
independent (task t needs nothing of earlier tasks to collect its statistics) and the model
after task t depends only on which tasks are merged, never on the order they finished in.
No image or per-sample feature is kept: statistics only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..config.schema import MethodOptions, RunConfig, resolve_targets
from ..coordinator.discriminant import LinearDiscriminant
from ..coordinator.statistics import (STATS_STEM, ClassStatistics, merge_all, router_features,
                                      router_projection, statistics_from_tensors)
from ..models.continual import ContinualClassifier
from .base import ContinualMethod, TaskContext, register_method
from .common import freeze_batchnorm_stats

HEAD = "lda"  # the discriminant's key among the model's heads


class DiscriminantHead(nn.Module):
    """g(x) = ReLU(f(x) W) A + b (or f(x) A + b without the projection W), computed in float64:
    the linear discriminant as a head on the backbone's features. Buffers, not parameters:
    nothing here is trained."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor,
                 projection: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.float64))
        self.register_buffer("bias", bias.to(torch.float64))
        self.register_buffer("projection", projection)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # the same features the statistics were taken on (cldist.train.statistics)
        x = router_features(features, self.projection)
        return (x.to(torch.float64) @ self.weight + self.bias).float()


@dataclass
class SLDAOptions(MethodOptions):
    """configs/method/slda.yaml: nothing trains, so only the shared keys, unused; its settings
    are the router's (router.shrinkage, router.projection_dim)."""
    name: str = "slda"
    epochs: int = 1


@register_method
class SLDA(ContinualMethod):
    """Streaming linear discriminant on the frozen backbone (see the module docstring).

    Parameters: none are trained, so params_added is 0 for every task; what a task keeps
    instead is its class statistics in float64, (C_t + d + 1) x d numbers for C_t classes on
    d-dimensional features (d = P with the projection): class sums (C_t x d), the within-class
    scatter (d x d) and C_t counts. Settings: the run's `router.shrinkage`,
    `router.projection_dim` and `seed` (the projection's), which `from_run` passes."""

    name = "slda"
    Options = SLDAOptions
    prediction = "single"
    graph = "independent"
    class_statistics = True

    def __init__(self, options: SLDAOptions, target_patterns: Sequence[str], is_cnn: bool, *,
                 shrinkage: float, projection_dim: int, seed: int):
        super().__init__(options, target_patterns, is_cnn)
        self.shrinkage = float(shrinkage)
        self.projection_dim = int(projection_dim)
        self.seed = int(seed)

    @classmethod
    def from_run(cls, cfg: RunConfig, target_patterns=None, is_cnn=None) -> "SLDA":
        """The statistics classifier is the router's: its settings, and the run's seed draws
        the random projection."""
        return cls(cfg.method, resolve_targets(cfg) if target_patterns is None else target_patterns,
                   cfg.backbone.family == "cnn" if is_cnn is None else is_cnn,
                   shrinkage=cfg.router.shrinkage, projection_dim=cfg.router.projection_dim,
                   seed=cfg.seed)

    # -- scheduling ------------------------------------------------------------------------
    def prediction_dependencies(self, upto_task: int) -> list[int]:
        return list(range(upto_task + 1))  # the statistics of every task seen

    # -- model -----------------------------------------------------------------------------
    def build(self, backbone: nn.Module, feature_dim: int,
              classes_per_task: Sequence[int]) -> ContinualClassifier:
        model = super().build(backbone, feature_dim, classes_per_task)  # frozen, no adapters
        freeze_batchnorm_stats(model)
        model.class_stats = {}  # task id -> its "ref" ClassStatistics, as loaded
        return model

    def learn_task(self, model: ContinualClassifier, ctx: TaskContext) -> dict:
        # nothing to train: the task job's statistics pass is the whole of this method's work
        return {"fits": [], "trained": False}

    def task_state(self, model: ContinualClassifier, task_id: int):
        return {}  # the task's only state is its stats.safetensors, which the task job writes

    def load_task_state(self, model: ContinualClassifier, task_id: int, state) -> None:
        if STATS_STEM not in state:
            raise ValueError(f"task {task_id} has no {STATS_STEM}.safetensors: it was written "
                             f"before tasks kept class statistics, and slda's model is made of "
                             f"nothing else")
        groups = statistics_from_tensors(state[STATS_STEM], f"task {task_id} {STATS_STEM}")
        if "ref" not in groups:
            raise ValueError(f"task {task_id} {STATS_STEM}.safetensors holds no 'ref.*' "
                             f"statistics (groups: {sorted(groups)})")
        model.class_stats[task_id] = groups["ref"]

    def params_added(self, model: ContinualClassifier, task_id: int) -> int:
        return 0  # statistics, not parameters (see the class docstring)

    # -- prediction ------------------------------------------------------------------------
    def merged_statistics(self, model: ContinualClassifier, upto_task: int) -> ClassStatistics:
        missing = [t for t in range(upto_task + 1) if t not in model.class_stats]
        if missing:
            raise ValueError(f"slda after task {upto_task} needs the statistics of tasks "
                             f"0..{upto_task}; tasks {missing} are not loaded (load "
                             f"prediction_dependencies({upto_task}) first)")
        return merge_all(model.class_stats[t] for t in range(upto_task + 1))

    def activate_model(self, model: ContinualClassifier, upto_task: int) -> None:
        stats = self.merged_statistics(model, upto_task)
        projection = router_projection(self.projection_dim, model.feature_dim, self.seed)
        expected = self.projection_dim or model.feature_dim
        if stats.dim != expected:
            raise ValueError(f"the saved statistics have {stats.dim} dimensions but the run's "
                             f"features have {expected} (router.projection_dim="
                             f"{self.projection_dim}): was config.json's router section changed "
                             f"after the tasks were written?")
        lda = LinearDiscriminant.fit(stats, self.shrinkage)
        # the head's column c must be stream label c, as every single-model method's logits
        if lda.classes.tolist() != list(range(len(lda.classes))):
            raise ValueError(f"the statistics of tasks 0..{upto_task} cover the stream labels "
                             f"{lda.classes.tolist()[:8]}..., not 0..{len(lda.classes) - 1}")
        device = next(model.backbone.parameters()).device
        model.heads[HEAD] = DiscriminantHead(lda.weight, lda.bias, projection).to(device)
        model.activate([], [HEAD])
