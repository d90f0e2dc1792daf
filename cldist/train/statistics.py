"""The statistics pass of a task job: class statistics of a task's training split.

One no-grad pass over this rank's share of the task's training images, with the *test-time*
transform (no augmentation: the router scores test images), through

    "ref"  the reference network - the backbone with no task's adapter or norms - whose
           features every task shares, so the merged statistics of all tasks are one
           classifier (the slda baseline, the router's task posterior);
    "own"  (sub-network methods) the task's own sub-network, over its own classes: the
           evidence a re-ranker can weigh against the reference.

Ranks reduce plain moments (cldist.coordinator.statistics), so the saved statistics are the
whole task's whatever the number of workers. Only sums are kept: no image or per-sample
feature leaves this function.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..coordinator.statistics import ClassStatistics
from ..eval.routing import random_projection, router_features

STATS_STEM = "stats"  # tasks/TTT/stats.safetensors
GROUPS = ("ref", "own")


def router_projection(projection_dim: int, feature_dim: int, seed: int) -> torch.Tensor | None:
    """The run's fixed random projection (`router.projection_dim` > 0), else None."""
    return random_projection(feature_dim, projection_dim, seed) if projection_dim > 0 else None


@torch.no_grad()
def statistics_pass(features_of: Callable[[torch.Tensor], torch.Tensor],
                    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], classes: list[int],
                    dim: int, device: torch.device, projection: torch.Tensor | None = None,
                    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    world_size: int = 1) -> ClassStatistics:
    """Statistics of `features_of(images)` over `batches`, reduced over the data-parallel ranks
    (`reduce_mean` averages a tensor over them; the sums are that mean times `world_size`).
    `dim`: the dimension of the features statistics are taken on (after any projection)."""
    total: ClassStatistics | None = None
    for images, labels in batches:
        feats = router_features(features_of(images.to(device)).cpu(), projection)
        part = ClassStatistics.from_features(feats, labels, classes)
        total = part if total is None else total.merge(part)
    if total is None:  # this rank's share was empty: it still takes part in the reduction
        total = ClassStatistics.empty(classes, dim)
    if reduce_mean is None or world_size == 1:
        return total
    moments = {k: reduce_mean(v) * world_size for k, v in total.moments().items()}
    return ClassStatistics.from_moments(total.classes, **moments)


def collect_task_statistics(model, method, task_id: int, classes: list[int],
                            batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                            device: torch.device, projection: torch.Tensor | None = None,
                            reduce_mean=None, world_size: int = 1) -> dict[str, ClassStatistics]:
    """{"ref": ..., "own": ...} for a finished task (`own` for sub-network methods only).

    `batches()` gives a fresh iterator over this rank's training share (test-time transform).
    Leaves the model with no adapter and no head active."""
    model.eval()
    model.activate([], [])
    ref_dim = projection.shape[1] if projection is not None else model.feature_dim
    out = {"ref": statistics_pass(model.features, batches(), classes, ref_dim, device,
                                  projection, reduce_mean, world_size)}
    if method.prediction == "subnetworks":
        method.activate_subnetwork(model, task_id)
        out["own"] = statistics_pass(model.features, batches(), classes, model.feature_dim,
                                     device, None, reduce_mean, world_size)
        model.activate([], [])
    return out


def statistics_tensors(stats: dict[str, ClassStatistics]) -> dict[str, torch.Tensor]:
    """The tensors of tasks/TTT/stats.safetensors: `ref.counts`, `own.scatter`, ..."""
    out: dict[str, torch.Tensor] = {}
    for group, s in stats.items():
        out.update(s.to_tensors(f"{group}."))
    return out


def statistics_from_tensors(tensors: dict[str, torch.Tensor],
                            origin: str) -> dict[str, ClassStatistics]:
    """The groups a task's stats.safetensors holds (ValueError naming `origin` if damaged)."""
    return {g: ClassStatistics.from_tensors(tensors, f"{g}.", origin) for g in GROUPS
            if f"{g}.counts" in tensors}
