"""The linear discriminant of class statistics: the `slda` classifier and the router's class
posterior (cldist.eval.routing).

LinearDiscriminant is Gaussian classes with one shared, shrunk covariance on the reference
network's features (SLDA; SimpleCIL/APER, RanPAC and FeCAM keep the same statistics):

    Sigma   = scatter / max(N - C, 1)                       pooled within-class covariance
    Sigma_s = Sigma + s * mean(diag Sigma) * I               shrinkage s (`router.shrinkage`)
    g_c(x)  = mu_c^T Sigma_s^{-1} x - 1/2 mu_c^T Sigma_s^{-1} mu_c     (equal class priors)
    log P(c | x) = log_softmax_c g(x)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .statistics import ClassStatistics

NEG_INF = float("-inf")


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
