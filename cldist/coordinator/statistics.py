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

Also here, shared by the task jobs (cldist.train.statistics), the methods that are made of
statistics (slda) and the evaluator (cldist.eval): the features statistics are taken on
(`router_features`: as they are, or ReLU(x W) with the run's fixed random projection W,
`router_projection`), the pass that gathers them over batches (`statistics_pass`), and the
file form of a task's statistics groups (tasks/TTT/stats.safetensors: `statistics_tensors`,
`statistics_from_tensors`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

# the tensor names of a statistics group in a task's stats.safetensors
FIELDS = ("classes", "counts", "sums", "scatter")
STATS_STEM = "stats"  # tasks/TTT/stats.safetensors
GROUPS = ("ref", "own")


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
