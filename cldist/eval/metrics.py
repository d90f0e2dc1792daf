"""Continual-learning metrics over an accuracy matrix (pure python + numpy).

The accuracy matrix is lower-triangular and stored as a list of rows:
``R[t][j]`` is the accuracy (percent) on task ``j``'s test data after training task ``t``,
defined for ``j <= t``, so row ``t`` has ``t + 1`` entries. With ``T`` tasks:

- accuracy after task t   A_t  = sum_{j<=t} n_j R[t][j] / sum_{j<=t} n_j
                                 (sample-weighted by the tasks' test sizes n_j, so it equals
                                 the accuracy over all seen classes' pooled test data)
- Acc  (final accuracy)        = A_{T-1}
- AAA  (average anytime acc.)  = (1/T) sum_{t<T} A_t
- forgetting_j                 = max_{j<=t<T-1} R[t][j] - R[T-1][j]      for j < T-1
- forgetting                   = mean_{j<T-1} forgetting_j               (0 when T == 1)
- BWT  (backward transfer)     = mean_{j<T-1} (R[T-1][j] - R[j][j])     (0 when T == 1)

Forgetting is usually >= 0 and BWT usually negative (old tasks lose accuracy); an old task that
ends above its best earlier accuracy makes its forgetting negative (it gained).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..rundir.state import AccuracyMatrix, validate_matrix  # noqa: F401  (the run format's check)


def _weights(n_entries: int, n_test: Sequence[int] | None) -> np.ndarray:
    """Per-task weights for the first ``n_entries`` tasks; equal weights when n_test is None."""
    if n_test is None:
        return np.ones(n_entries)
    if len(n_test) < n_entries:
        raise ValueError(
            f"n_test has {len(n_test)} test sizes but {n_entries} tasks need one each"
        )
    weights = np.asarray(n_test[:n_entries], dtype=float)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"n_test must be non-negative with a positive sum, got {list(n_test)}")
    return weights


def accuracy_after(row: Sequence[float], n_test: Sequence[int] | None = None) -> float:
    """Accuracy over all seen classes' test data after one task.

    ``A_t = sum_j n_j * row[j] / sum_j n_j`` over the row's tasks ``j``; ``n_test`` holds the
    per-task test sizes (only the first ``len(row)`` are used). ``None`` = equal weights,
    i.e. the plain mean of the row.
    """
    if len(row) == 0:
        raise ValueError("accuracy row is empty")
    values = np.asarray(row, dtype=float)
    weights = _weights(len(values), n_test)
    return float((values * weights).sum() / weights.sum())


def forgetting_per_task(R: AccuracyMatrix) -> list[float]:
    """``forgetting_j = max_{j<=t<T-1} R[t][j] - R[T-1][j]`` for every old task ``j < T-1``."""
    rows = validate_matrix(R)
    last = len(rows) - 1
    return [max(rows[t][j] for t in range(j, last)) - rows[last][j] for j in range(last)]


def backward_transfer(R: AccuracyMatrix) -> float:
    """``BWT = mean_{j<T-1} (R[T-1][j] - R[j][j])``; 0 for a single task."""
    rows = validate_matrix(R)
    last = len(rows) - 1
    if last == 0:
        return 0.0
    return float(np.mean([rows[last][j] - rows[j][j] for j in range(last)]))


def summarize(R: AccuracyMatrix, n_test: Sequence[int] | None = None) -> dict:
    """All the stream-level metrics of an accuracy matrix.

    Returns a dict with
    ``acc`` = A_{T-1}; ``aaa`` = mean_t A_t; ``forgetting`` = mean_j forgetting_j (0 for T=1);
    ``bwt`` = mean_j (R[T-1][j] - R[j][j]) (0 for T=1); ``avg_acc_curve`` = [A_0, ..., A_{T-1}];
    ``forgetting_per_task`` = [forgetting_0, ..., forgetting_{T-2}] (see the module docstring).
    """
    rows = validate_matrix(R)
    if n_test is not None and len(n_test) < len(rows):
        raise ValueError(
            f"n_test has {len(n_test)} test sizes but the matrix has {len(rows)} tasks"
        )
    curve = [accuracy_after(row, n_test) for row in rows]
    per_task_forgetting = forgetting_per_task(rows)
    return {
        "acc": curve[-1],
        "aaa": float(np.mean(curve)),
        "forgetting": float(np.mean(per_task_forgetting)) if per_task_forgetting else 0.0,
        "bwt": backward_transfer(rows),
        "avg_acc_curve": curve,
        "forgetting_per_task": per_task_forgetting,
    }


def accuracy_from_predictions(pred, target) -> float:
    """Top-1 accuracy in percent: ``100 * mean(pred == target)``.

    Accepts lists, numpy arrays or CPU/GPU torch tensors of equal length; an empty input
    scores 0.0.
    """
    pred_arr = _as_numpy(pred).reshape(-1)
    target_arr = _as_numpy(target).reshape(-1)
    if pred_arr.shape != target_arr.shape:
        raise ValueError(
            f"predictions and targets differ in length: {pred_arr.shape[0]} vs {target_arr.shape[0]}"
        )
    if pred_arr.size == 0:
        return 0.0
    return float(100.0 * (pred_arr == target_arr).mean())


def _as_numpy(values) -> np.ndarray:
    # torch tensors are converted via their own API so this module need not import torch.
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)
