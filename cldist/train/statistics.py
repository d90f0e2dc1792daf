"""The statistics pass of a task job: class statistics of a task's training split.

One no-grad pass over this rank's share of the task's training images, with the *test-time*
transform (no augmentation: the router scores test images), through

    "ref"  the reference network - the backbone with no task's adapter or norms - whose
           features every task shares, so the merged statistics of all tasks are one
           classifier (the slda baseline, the router's task posterior);
    "own"  (sub-network methods) the task's own sub-network, over its own classes: the
           evidence a re-ranker can weigh against the reference.

Ranks reduce plain moments (cldist.coordinator.statistics, which also holds the pass over
batches, the router's features and the stats.safetensors form that the methods and the
evaluator share), so the saved statistics are the whole task's whatever the number of
workers. Only sums are kept: no image or per-sample feature leaves this function.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..coordinator.statistics import ClassStatistics, statistics_pass


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
