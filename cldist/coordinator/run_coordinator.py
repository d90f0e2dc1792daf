"""The run coordinator: the one owner of a run's state.

Task jobs send it task vectors (it answers with rank decisions) and finished tasks (it commits
them atomically and records them in state.json); the stream driver sends it accuracy rows.
The inline runner holds one in-process; the Ray runner wraps it in an actor
(`cldist.distributed.coordinator`) that fans the per-layer SVDs out as Ray tasks. Because one
object owns `state.json`, concurrent task jobs never race on it.
"""
from __future__ import annotations

import threading
from pathlib import Path

from ..rundir import RunDir
from .ranks import allocate_rank


def allocate_layer(name: str, w_ref, w_task, params: dict) -> tuple[str, dict]:
    """One layer's rank decision as a plain dict (+ B, A factors when asked for)."""
    res = allocate_rank(w_ref, w_task, params["rule"], params.get("rule_params"),
                        params["min_rank"], params.get("max_rank"),
                        return_factors=params.get("return_factors", False))
    if isinstance(res, tuple):
        decision, B, A = res
        return name, {**decision.to_dict(), "B": B, "A": A}
    return name, res.to_dict()


def allocate_ranks_locally(task_vectors: dict, params: dict) -> dict:
    """Every layer's rank decision, computed in this process, one layer after another."""
    return dict(allocate_layer(n, w_ref, w_task, params)
                for n, (w_ref, w_task) in task_vectors.items())


class RunCoordinator:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run = RunDir(run_dir)
        self.state = self.run.state()
        self._lock = threading.Lock()

    def allocate_ranks(self, task_vectors: dict, params: dict) -> dict:
        return allocate_ranks_locally(task_vectors, params)

    def commit(self, task_id: int, staging: str, meta: dict) -> None:
        """Move a staged task into place, then record it (state.json is written last)."""
        with self._lock:
            self.run.commit_task(task_id, staging)
            self.state.record_task(task_id, meta)

    def commit_copy(self, task_id: int, source: str, meta: dict) -> bool:
        """Commit a copy of `source` (which stays as it is) unless the task is committed
        already; True when this call committed it."""
        with self._lock:
            if self.run.has_task(task_id):
                return False
            self.run.commit_task(task_id, self.run.stage_copy(task_id, source))
            self.state.record_task(task_id, meta)
            return True

    def set_rows(self, rows: list[list[float]]) -> None:
        with self._lock:
            self.state.set_rows(rows)

    def set(self, key: str, value) -> None:
        with self._lock:
            self.state.set(key, value)

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.state.data)
