"""Class statistics: what a rehearsal-free router keeps instead of samples.

For the classes c of a task, with n_c feature vectors x_{c,i} in R^d:

    counts[c]  = n_c
    sums[c]    = sum_i x_{c,i}
    scatter    = sum_c sum_i (x_{c,i} - mu_c)(x_{c,i} - mu_c)^T,     mu_c = sums[c] / n_c

(the pooled within-class scatter), all in float64. Two sets merge by summation, with Chan et
al.'s correction for a class that both have seen:

    scatter = S_a + S_b + sum_{c in both} n_a n_b / (n_a + n_b) (mu_a - mu_b)(mu_a - mu_b)^T

which is exact, associative and commutative: tasks finish and merge in any order, on any node,
and a data-parallel job's ranks reduce plain sums (`from_moments`). Nothing per sample is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

# the tensor names of a statistics group in a task's stats.safetensors
FIELDS = ("classes", "counts", "sums", "scatter")


@dataclass
class ClassStatistics:
    classes: torch.Tensor  # int64 (C,), stream labels, ascending
    counts: torch.Tensor   # float64 (C,)
    sums: torch.Tensor     # float64 (C, d)
    scatter: torch.Tensor  # float64 (d, d)

    @property
    def dim(self) -> int:
        return int(self.sums.shape[1])

    @property
    def n(self) -> float:
        return float(self.counts.sum())

    @property
    def means(self) -> torch.Tensor:
        """Class means (C, d); a class without samples has a zero mean (and a zero count)."""
        return self.sums / self.counts.clamp_min(1.0)[:, None]

    @staticmethod
    def empty(classes: Sequence[int], dim: int) -> "ClassStatistics":
        c = len(classes)
        return ClassStatistics(torch.as_tensor(sorted(classes), dtype=torch.int64),
                               torch.zeros(c, dtype=torch.float64),
                               torch.zeros(c, dim, dtype=torch.float64),
                               torch.zeros(dim, dim, dtype=torch.float64))

    @staticmethod
    def from_features(features: torch.Tensor, labels: torch.Tensor,
                      classes: Sequence[int]) -> "ClassStatistics":
        """Exact statistics of one batch, over `classes` (labels outside them are an error)."""
        classes = sorted(int(c) for c in classes)
        labels = labels.to(torch.int64).cpu()
        unknown = sorted(set(labels.tolist()) - set(classes))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the classes {classes}")
        x = features.detach().to("cpu", torch.float64).reshape(len(labels), -1)
        out = ClassStatistics.empty(classes, x.shape[1])
        for i, c in enumerate(classes):
            xc = x[labels == c]
            if len(xc):
                out.counts[i] = len(xc)
                out.sums[i] = xc.sum(0)
                centred = xc - xc.mean(0)
                out.scatter += centred.T @ centred
        return out

    def moments(self) -> dict[str, torch.Tensor]:
        """counts, sums and the uncentred second moment sum x x^T: plain sums that data-parallel
        ranks all-reduce before `from_moments` turns them back into statistics."""
        second = self.scatter + self.sums.T @ (self.sums / self.counts.clamp_min(1.0)[:, None])
        return {"counts": self.counts, "sums": self.sums, "second": second}

    @staticmethod
    def from_moments(classes: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor,
                     second: torch.Tensor) -> "ClassStatistics":
        counts, sums = counts.to(torch.float64), sums.to(torch.float64)
        scatter = second.to(torch.float64) - sums.T @ (sums / counts.clamp_min(1.0)[:, None])
        return ClassStatistics(classes.to(torch.int64), counts, sums, (scatter + scatter.T) / 2)

    def merge(self, other: "ClassStatistics") -> "ClassStatistics":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of {self.dim} and {other.dim} dimensions")
        classes = sorted(set(self.classes.tolist()) | set(other.classes.tolist()))
        out = ClassStatistics.empty(classes, self.dim)
        out.scatter = self.scatter + other.scatter
        index = {c: i for i, c in enumerate(classes)}
        for part in (self, other):
            for i, c in enumerate(part.classes.tolist()):
                j = index[c]
                n_a, n_b = out.counts[j], part.counts[i]
                if n_a > 0 and n_b > 0:  # the same class on both sides: Chan's correction
                    delta = part.sums[i] / n_b - out.sums[j] / n_a
                    out.scatter += (n_a * n_b / (n_a + n_b)) * torch.outer(delta, delta)
                out.counts[j] += n_b
                out.sums[j] += part.sums[i]
        return out

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}{k}": getattr(self, k).contiguous() for k in FIELDS}

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], prefix: str = "",
                     origin: str = "statistics") -> "ClassStatistics":
        """Statistics from a safetensors group; a wrong name or shape is a ValueError naming
        `origin` (the file), never a silent mis-merge."""
        missing = [f"{prefix}{k}" for k in FIELDS if f"{prefix}{k}" not in tensors]
        if missing:
            raise ValueError(f"{origin} lacks {missing}")
        classes, counts, sums, scatter = (tensors[f"{prefix}{k}"] for k in FIELDS)
        c = classes.shape[0] if classes.dim() == 1 else -1
        if c < 0 or counts.shape != (c,) or sums.dim() != 2 or sums.shape[0] != c or \
                scatter.shape != (sums.shape[1], sums.shape[1]):
            raise ValueError(f"{origin}: inconsistent shapes classes {tuple(classes.shape)}, counts "
                             f"{tuple(counts.shape)}, sums {tuple(sums.shape)}, scatter "
                             f"{tuple(scatter.shape)}")
        return ClassStatistics(classes.to(torch.int64), counts.to(torch.float64),
                               sums.to(torch.float64), scatter.to(torch.float64))


def merge_all(parts: Iterable[ClassStatistics]) -> ClassStatistics:
    """The statistics of every part together (any order gives the same result)."""
    merged = None
    for part in parts:
        merged = part if merged is None else merged.merge(part)
    if merged is None:
        raise ValueError("no statistics to merge")
    return merged
