"""The inline runner: the whole stream in this process, no Ray, no DeepSpeed.

It calls the same pure functions as the Ray runner (`train_task` on `task_setup(job)`, a Scorer
from `make_scorer`), in task order, with plain torch AdamW, on this machine's GPU with
`trainer.use_gpu=true`. For debugging, unit tests and single-GPU runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from ..assemble import TaskJob, make_scorer, task_setup
from ..config.schema import RunConfig
from ..coordinator.run_coordinator import RunCoordinator
from ..eval.scoring import Block, Scorer, SingleScores
from ..train.task import train_task
from . import OnTaskDone, OnTaskStarted, done_before, ready_order


class InlineRunner:
    name = "inline"
    coordinator: RunCoordinator

    def __init__(self, cfg: RunConfig, run_dir: str | Path, on_epoch: Callable | None = None,
                 *, progress=None, job_slots=None):
        """`on_epoch(task, phase, epoch, n_epochs, loss, lr)` after every epoch (default:
        `progress`'s epoch line); `job_slots` (a sweep's bound on Ray jobs) is not needed:
        this runner trains in its caller's thread."""
        if on_epoch is None and progress is not None:
            on_epoch = _epoch_printer(progress)
        self.cfg, self.run_dir, self.on_epoch = cfg, Path(run_dir), on_epoch
        # a run's pre-flight refuses use_gpu without a GPU; re-scoring it elsewhere
        # (`cldist eval`) may use the CPU
        self.device = "cuda" if cfg.trainer.use_gpu and torch.cuda.is_available() else "cpu"
        self._scorer: Scorer | None = None
        self.coordinator = RunCoordinator(run_dir)

    def run_tasks(self, jobs: dict[int, TaskJob], deps: dict[int, list[int]],
                  on_done: OnTaskDone, started: OnTaskStarted | None = None) -> None:
        pending = sorted(jobs)
        done = done_before(jobs, deps)
        while pending:
            ready = ready_order(pending, deps, done)
            if not ready:
                raise RuntimeError(f"task graph is stuck: pending {pending}, done {sorted(done)}")
            t = ready[0]
            if started:
                started(t)
            meta = train_task(task_setup(jobs[t]), on_epoch=self.on_epoch, device=self.device,
                              allocate_ranks=self.coordinator.allocate_ranks)
            on_done([(t, meta)])
            done.add(t)
            pending.remove(t)

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            self._scorer = make_scorer(self.cfg, self.run_dir, device=self.device)
        return self._scorer

    def score_blocks(self, pairs: Sequence[tuple[int, int]]) -> list[Block]:
        return self.scorer.score_blocks(pairs)

    def score_single(self, upto_task: int, tests: Sequence[int]) -> SingleScores:
        return self.scorer.score_single(upto_task, tests)

    def test_labels(self, j: int):
        return self.scorer.test_labels(j)

    def reference_features(self, tests: Sequence[int]) -> dict:
        return self.scorer.reference_features(tests)

    def task_statistics(self, tasks: Sequence[int]) -> dict:
        return self.scorer.task_statistics(tasks)

    def close(self) -> None:
        self._scorer = None


def _epoch_printer(progress):
    def on_epoch(task_id, phase, epoch, n_epochs, loss, lr):
        progress.epoch(task_id, phase, epoch + 1, n_epochs, loss, lr)
    return on_epoch
