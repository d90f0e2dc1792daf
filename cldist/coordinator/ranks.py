"""PEARL's rank allocation: task vector -> SVD -> dynamic threshold -> rank.

For a target layer with reference weight W_r and stage-1 fine-tuned weight W_t:

    dW = W_t - W_r = U S V^T                                (task vector, Eq. 2)
    d  = ||W_t - W_r||_F^2 / ||W_r||_F^2                    (normalised squared distance)
    T  = threshold_rule(d)  in [0, 1]                       (dynamic threshold, Eq. 3)
    k  = min { k : sum_{i<=k} s_i^2 / sum_i s_i^2 >= T }    (cumulative explained variance, Eq. 4)
    k  = clamp(k, min_rank, max_rank)
    B  = U[:, :k] sqrt(S_k),  A = sqrt(S_k) V_k^T           (SVD initialisation, Eq. 5)

The paper only fixes that T grows with the distance between W_t and W_r (far from the
reference -> more rank). The rules here are pluggable (`THRESHOLD_RULES`):

- `squashed` (default): T = t_min + (t_max - t_min) * d / (d + c). With c the distance at which
  the threshold is halfway; t_min/t_max keep a layer that barely moved at the floor rank and
  stop one that moved a lot from taking the full rank.
- `linear`: T = clamp(d / c, t_min, t_max).
- `fixed`: T = t_max whatever the distance (a fixed explained-variance target; ablation).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

ThresholdRule = Callable[[float, dict], float]


def _squashed(d: float, p: dict) -> float:
    c = float(p.get("scale", 1e-3))
    lo, hi = float(p.get("t_min", 0.5)), float(p.get("t_max", 0.95))
    return lo + (hi - lo) * d / (d + c)


def _linear(d: float, p: dict) -> float:
    c = float(p.get("scale", 1e-3))
    lo, hi = float(p.get("t_min", 0.5)), float(p.get("t_max", 0.95))
    return min(hi, max(lo, d / c))


def _fixed(d: float, p: dict) -> float:
    return float(p.get("t_max", 0.95))


THRESHOLD_RULES: dict[str, ThresholdRule] = {"squashed": _squashed, "linear": _linear,
                                             "fixed": _fixed}


@dataclass
class RankDecision:
    rank: int
    threshold: float
    distance: float
    explained: float  # variance fraction the chosen rank explains

    def to_dict(self) -> dict:
        return asdict(self)


def rank_for_threshold(singular_values: torch.Tensor, threshold: float,
                       min_rank: int = 1, max_rank: int | None = None) -> int:
    """Smallest k whose cumulative explained variance reaches `threshold`, clamped."""
    s2 = singular_values.double().pow(2)
    total = float(s2.sum())
    full = int(singular_values.numel())
    upper = full if max_rank is None else min(full, max_rank)
    lower = max(1, min(min_rank, upper))
    if total <= 0.0:
        return lower
    cumulative = torch.cumsum(s2, 0) / total
    # first index where the cumulative fraction reaches the threshold (tolerate round-off)
    reached = torch.nonzero(cumulative >= threshold - 1e-12)
    k = int(reached[0]) + 1 if reached.numel() else full
    return max(lower, min(upper, k))


def normalized_distance(w_ref: torch.Tensor, w_task: torch.Tensor) -> float:
    ref = float(w_ref.double().pow(2).sum())
    diff = float((w_task.double() - w_ref.double()).pow(2).sum())
    return diff / ref if ref > 0 else diff


def task_vector_svd(w_ref: torch.Tensor, w_task: torch.Tensor, max_rank: int | None = None,
                    lowrank_oversample: int = 8):
    """SVD of the task vector seen as an (out, fan_in) matrix: full, or randomised when a
    small `max_rank` makes the full decomposition wasteful."""
    dw = (w_task - w_ref).reshape(w_ref.shape[0], -1).double()
    full_rank = min(dw.shape)
    if max_rank is not None and max_rank + lowrank_oversample < full_rank // 2:
        q = min(full_rank, max_rank + lowrank_oversample)
        # svd_lowrank draws its random projection from the global RNG: seed it privately so
        # the ranks do not depend on which process ran the SVD or what it ran before, and so
        # the caller's RNG (data augmentation) is left untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            U, S, V = torch.svd_lowrank(dw, q=q, niter=4)
        # the explained-variance denominator must be the whole spectrum, not the top q
        rest = max(float(dw.pow(2).sum()) - float(S.pow(2).sum()), 0.0)
        return U, S, V.T, rest
    U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
    return U, S, Vh, 0.0


def lora_product_svd(B: torch.Tensor, A: torch.Tensor):
    """Thin SVD of dW = B A (B: out x r, A: r x in) without forming dW:

        B = Q_B R_B,  A^T = Q_A R_A  (QR)   =>   dW = Q_B (R_B R_A^T) Q_A^T
        R_B R_A^T = U_r S V_r^T  (r x r SVD)  =>   dW = (Q_B U_r) S (Q_A V_r)^T

    O((out + in) r^2) instead of O(out * in * min(out, in)): the exact spectrum of a task
    vector that is a LoRA product, for the price of two thin QRs and an r x r SVD."""
    B, A = B.double(), A.reshape(A.shape[0], -1).double()
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.T)
    U_r, S, Vh_r = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ U_r, S, Vh_r @ q_a.T


def allocate_rank(w_ref: torch.Tensor, w_task: torch.Tensor, rule: str = "squashed",
                  rule_params: dict | None = None, min_rank: int = 1,
                  max_rank: int | None = None, return_factors: bool = False):
    """Rank decision for one layer; with `return_factors`, also (B, A) of Eq. 5."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose from {sorted(THRESHOLD_RULES)}")
    d = normalized_distance(w_ref, w_task)
    threshold = THRESHOLD_RULES[rule](d, rule_params or {})
    U, S, Vh, rest = task_vector_svd(w_ref, w_task, max_rank)
    if rest > 0:
        # randomised SVD: fold the unseen tail into the total as one extra "value"
        S_eff = torch.cat([S.double(), torch.tensor([rest ** 0.5], dtype=torch.float64)])
    else:
        S_eff = S
    k = rank_for_threshold(S_eff, threshold, min_rank, max_rank)
    k = min(k, S.numel())
    s2 = S_eff.double().pow(2)
    explained = float(s2[:k].sum() / s2.sum()) if float(s2.sum()) > 0 else 1.0
    decision = RankDecision(rank=k, threshold=threshold, distance=d, explained=explained)
    if not return_factors:
        return decision
    root = S[:k].sqrt().to(w_ref.dtype)
    B = U[:, :k].to(w_ref.dtype) * root
    A = root[:, None] * Vh[:k].to(w_ref.dtype)
    return decision, B, A
