"""Evaluation: continual-learning metrics over the accuracy matrix (and batched scoring)."""
from cldist.eval.metrics import (
    accuracy_after,
    accuracy_from_predictions,
    backward_transfer,
    forgetting_per_task,
    summarize,
    validate_matrix,
)

__all__ = [
    "accuracy_after",
    "accuracy_from_predictions",
    "backward_transfer",
    "forgetting_per_task",
    "summarize",
    "validate_matrix",
]
