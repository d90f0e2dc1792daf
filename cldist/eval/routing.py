"""Class-IL from class statistics: the `slda` classifier and the task router.

LinearDiscriminant is Gaussian classes with one shared, shrunk covariance on the reference
network's features (SLDA; SimpleCIL/APER, RanPAC and FeCAM keep the same statistics):

    Sigma   = scatter / max(N - C, 1)                       pooled within-class covariance
    Sigma_s = Sigma + s * mean(diag Sigma) * I               shrinkage s (`router.shrinkage`)
    g_c(x)  = mu_c^T Sigma_s^{-1} x - 1/2 mu_c^T Sigma_s^{-1} mu_c     (equal class priors)
    log P(c | x) = log_softmax_c g(x)

The router sums that posterior over each task's classes, log P(t | x) = logsumexp_{c in t}
log P(c | x), and only the top-k tasks' sub-networks run on x. The routed decision combines it
with what those sub-networks say, over the routed tasks' classes only (`eval.combine`):

    posterior_head  argmax_c  log P(t(c) | x) + log softmax_{t(c)}(head_{t(c)}(x))_c
    lda_head        argmax_c  log P(c | x)    + log softmax_{t(c)}(head_{t(c)}(x))_c
    top1            argmax_c  over the top-1 task's classes of its head

With k = T, posterior_head is the posterior-weighted ensemble P(c|x) = P(t|x) P(c|x,t).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..coordinator.statistics import ClassStatistics

NEG_INF = float("-inf")


def random_projection(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """RanPAC's fixed projection (in_dim, out_dim), drawn from N(0, 1) on the CPU generator:
    every node and every later evaluation draws the same matrix from the run's seed."""
    g = torch.Generator().manual_seed(int(seed) * 7_777_777 + 17)
    return torch.randn(in_dim, out_dim, generator=g, dtype=torch.float32)


def router_features(features: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """The features statistics are taken on: as they are, or ReLU(x W) with the projection."""
    x = features.detach().float().reshape(features.shape[0], -1)
    if projection is None:
        return x
    return torch.relu(x @ projection.to(x.device))


@dataclass
class LinearDiscriminant:
    """Scores g(x) = x W + b over `classes` (see the module docstring for the maths)."""

    classes: torch.Tensor  # int64 (C,) stream labels
    weight: torch.Tensor   # float64 (d, C)
    bias: torch.Tensor     # float64 (C,)

    @staticmethod
    def fit(stats: ClassStatistics, shrinkage: float) -> "LinearDiscriminant":
        present = stats.counts > 0
        n_classes = int(present.sum())
        if n_classes == 0:
            raise ValueError("no class has samples: nothing to classify")
        sigma = stats.scatter / max(stats.n - n_classes, 1.0)
        mean_var = float(torch.diagonal(sigma).mean())
        # a singular scatter (more dimensions than samples, one sample a class) is made
        # invertible by the ridge; with no variance at all, a unit ridge keeps g finite
        ridge = shrinkage * mean_var if mean_var > 0 else 1.0
        sigma_s = sigma + ridge * torch.eye(stats.dim, dtype=torch.float64)
        means = stats.means
        chol, info = torch.linalg.cholesky_ex(sigma_s)
        if int(info) == 0:
            solved = torch.cholesky_solve(means.T, chol)  # Sigma_s^{-1} mu, (d, C)
        else:  # shrinkage 0 on a singular scatter: the pseudo-inverse's minimum-norm solution
            solved = torch.linalg.pinv(sigma_s, hermitian=True) @ means.T
        bias = -0.5 * (means * solved.T).sum(1)
        bias[~present] = NEG_INF  # a class never seen cannot be predicted
        return LinearDiscriminant(stats.classes.clone(), solved, bias)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """g(x) for every class, float64 (N, C)."""
        return features.to(torch.float64) @ self.weight + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Stream labels of the argmax class."""
        return self.classes[self.scores(features).argmax(dim=1)]


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
