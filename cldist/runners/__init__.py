"""Runners: where task jobs and scoring run. `inline` here; `ray` in cldist.distributed."""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

from ..eval.scoring import Block, SingleScores
from ..train.task import TaskJob

# called with the (task, meta) pairs that finished together (one packed job), in task order;
# a meta with `staging_dir` is committed from there, one without was committed by the runner
OnTaskDone = Callable[[list[tuple[int, dict]]], None]


class Runner(Protocol):
    """Executes a stream's task graph and scores models; the stream driver owns the rest."""

    name: str

    def run_tasks(self, jobs: dict[int, TaskJob], deps: dict[int, list[int]],
                  on_done: OnTaskDone) -> None:
        """Run every job once its dependencies are done; call on_done([(task, meta), ...])
        for the tasks that finished together."""

    def score_blocks(self, pairs: Sequence[tuple[int, int]]) -> list[Block]: ...

    def score_single(self, upto_task: int, tests: Sequence[int]) -> SingleScores: ...

    def test_labels(self, j: int): ...

    def reference_features(self, tests: Sequence[int]) -> dict:
        """{test set: router features (n, d) of its images through the reference network}."""

    def task_statistics(self, tasks: Sequence[int]) -> dict:
        """{task: its reference-network ClassStatistics} (saved with the task, else collected)."""

    def close(self) -> None: ...


def ready_order(pending: Sequence[int], deps: dict[int, list[int]], done: set[int]) -> list[int]:
    """Pending tasks whose dependencies are all done, in task order."""
    return [t for t in pending if all(d in done for d in deps[t])]
