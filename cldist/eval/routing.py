"""Class-IL from class statistics: the task router.

The slda classifier, log P(c | x) = log_softmax_c g(x), is cldist.coordinator.discriminant's
LinearDiscriminant (Gaussian classes with one shared, shrunk covariance on the reference
network's features; the maths are there). The router sums that posterior over each task's
classes, log P(t | x) = logsumexp_{c in t} log P(c | x), and only the top-k tasks'
sub-networks run on x. The routed decision combines it with what those sub-networks say, over
the routed tasks' classes only (`eval.combine`):

    posterior_head  argmax_c  log P(t(c) | x) + log softmax_{t(c)}(head_{t(c)}(x))_c
    lda_head        argmax_c  log P(c | x)    + log softmax_{t(c)}(head_{t(c)}(x))_c
    top1            argmax_c  over the top-1 task's classes of its head

With k = T, posterior_head is the posterior-weighted ensemble P(c|x) = P(t|x) P(c|x,t).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..coordinator.discriminant import NEG_INF, LinearDiscriminant


def class_log_posterior(lda: LinearDiscriminant, features: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(lda.scores(features), dim=1)


def task_log_posterior(class_log_post: torch.Tensor, class_task: torch.Tensor,
                       n_tasks: int) -> torch.Tensor:
    """log P(t | x) (N, T) from log P(c | x) (N, C); class_task[c] = the task of column c."""
    out = torch.full((class_log_post.shape[0], n_tasks), NEG_INF, dtype=class_log_post.dtype)
    for t in range(n_tasks):
        cols = (class_task == t).nonzero().flatten()
        if len(cols):
            out[:, t] = torch.logsumexp(class_log_post[:, cols], dim=1)
    return out


def top_tasks(task_log_post: torch.Tensor, k: int) -> torch.Tensor:
    """The k most probable tasks of every image (N, k), most probable first."""
    k = min(k, task_log_post.shape[1])
    return task_log_post.topk(k, dim=1).indices


def routed_decision(rule: str, class_log_post: torch.Tensor, task_log_post: torch.Tensor,
                    head_log_probs: torch.Tensor, class_task: torch.Tensor,
                    routed: torch.Tensor) -> torch.Tensor:
    """Column index of the decided class per image (N,).

    head_log_probs (N, C): log softmax of each routed task's head over its own classes, placed
    in that task's columns; columns of tasks not routed for an image are ignored (-inf) -
    their sub-networks never ran on it. `routed` (N, k) are the routed tasks, best first.
    """
    n, c = head_log_probs.shape
    allowed = torch.zeros(n, c, dtype=torch.bool)
    tasks = routed[:, :1] if rule == "top1" else routed
    for col in range(tasks.shape[1]):
        allowed |= class_task[None, :] == tasks[:, col:col + 1]
    head = head_log_probs.to(torch.float64)
    if rule == "posterior_head":
        score = task_log_post[:, class_task] + head
    elif rule == "lda_head":
        score = class_log_post + head
    elif rule == "top1":
        score = head
    else:
        raise ValueError(f"unknown routed decision rule {rule!r}; choose posterior_head, "
                         f"lda_head or top1")
    score = torch.where(allowed, score, torch.full_like(score, NEG_INF))
    return score.argmax(dim=1)


def class_task_index(classes_per_task: Sequence[int]) -> torch.Tensor:
    """class_task[c] for the stream labels 0..C-1 of tasks laid out in order."""
    return torch.cat([torch.full((n,), t, dtype=torch.int64)
                      for t, n in enumerate(classes_per_task)])
