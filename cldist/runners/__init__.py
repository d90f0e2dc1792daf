"""Runners: where task jobs and scoring run - the `Runner` protocol every runner satisfies,
the ready order of a task graph, and `make_runner`.

`inline` lives here (runners/inline.py); `ray` in cldist.distributed.runner, imported only
when a run asks for it by name (only cldist.distributed imports ray or deepspeed). The stream
driver (cldist.stream) and the stream evaluator (cldist.eval.stream_evaluator) use a runner
through this protocol and nothing else.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

from ..assemble import TaskJob
from ..choices import RUNNERS
from ..eval.scoring import Block, SingleScores

# called with the (task, meta) pairs that finished together (one packed job), in task order;
# a meta with `staging_dir` is committed from there, one without was committed by the runner
OnTaskDone = Callable[[list[tuple[int, dict]]], None]
# called with a task as its training starts (the progress line's "learning" set)
OnTaskStarted = Callable[[int], None]


@runtime_checkable
class Coordinator(Protocol):
    """The one owner of a run's state.json, as the driver sees it: RunCoordinator in this
    process (inline), CoordinatorProxy in front of the coordinator actor (Ray)."""

    def allocate_ranks(self, task_vectors: dict, params: dict) -> dict: ...

    def commit(self, task_id: int, staging: str, meta: dict) -> None:
        """Move a staged task into place, then record it (state.json last)."""

    def set_rows(self, rows: list[list[float]]) -> None: ...

    def set(self, key: str, value) -> None: ...

    def snapshot(self) -> dict: ...


@runtime_checkable
class Runner(Protocol):
    """Executes a stream's task graph and scores models; the stream driver owns the rest.

    Every runner is built as `Runner(cfg, run_dir, progress=None, job_slots=None)`
    (make_runner)."""

    name: str
    coordinator: Coordinator

    def run_tasks(self, jobs: dict[int, TaskJob], deps: dict[int, list[int]],
                  on_done: OnTaskDone, started: OnTaskStarted | None = None) -> None:
        """Run every job once its dependencies are done (`ready_order`); call
        started(task) as a task starts and on_done([(task, meta), ...]) for the tasks that
        finished together. A dependency that is not a job is done already."""

    def score_blocks(self, pairs: Sequence[tuple[int, int]]) -> list[Block]: ...

    def score_single(self, upto_task: int, tests: Sequence[int]) -> SingleScores: ...

    def test_labels(self, j: int): ...

    def reference_features(self, tests: Sequence[int]) -> dict:
        """{test set: router features (n, d) of its images through the reference network}."""

    def task_statistics(self, tasks: Sequence[int]) -> dict:
        """{task: its reference-network ClassStatistics} (saved with the task, else collected)."""

    def close(self) -> None: ...


def ready_order(pending: Sequence[int], deps: dict[int, list[int]], done: set[int]) -> list[int]:
    """Pending tasks whose dependencies are all done, in task order: the one rule of which
    task may start next (the inline runner takes the first, the Ray runner packs them into
    jobs, the job-slot queue hands them out)."""
    return [t for t in pending if all(d in done for d in deps[t])]


def done_before(jobs: dict[int, TaskJob], deps: dict[int, list[int]]) -> set[int]:
    """The tasks of the graph `deps` that need no job: committed before (a resumed run)."""
    return {t for t in deps if t not in jobs}


def runner_class(name: str) -> type:
    """The class of runner `name` (importing its module now)."""
    if name not in RUNNERS:
        raise ValueError(f"runner={name}: choose one of {', '.join(RUNNERS)}")
    module, _, attr = RUNNERS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def make_runner(name: str, cfg, run_dir: str | Path, *, progress=None,
                job_slots=None) -> Runner:
    """Runner `name` ("inline" or "ray") for the run in `run_dir` with config `cfg`
    (a RunConfig). `progress` (cldist.report.progress.Progress) gets epoch lines and retry
    messages; `job_slots`, a semaphore a sweep's runs share, bounds their Ray jobs together
    (the inline runner trains in its caller's thread and needs none)."""
    return runner_class(name)(cfg, run_dir, progress=progress, job_slots=job_slots)
