"""Class-IL scoring of a run's models on test data (both runners call these).

Sub-network methods (PEARL): every test image goes through every task sub-network; the
prediction after task t is the argmax of the logits of sub-networks 0..t concatenated. Because
sub-networks never change once trained, a block (sub-network i, test set j) is scored once and
reduced to two numbers per image - its best logit and the stream label of that logit - and
any row of the accuracy matrix follows from those blocks:

    pred_t(x) = label of max_{i <= t} best_i(x)

Single-model methods: after task t, one model over all seen classes scores test sets 0..t.

Beside the Class-IL accuracy, each score also gives the task-incremental (Task-IL) accuracy:
the same logits, but the argmax taken only over the true task's classes (the task id given).
Task-IL >= Class-IL image by image; the gap is cross-task confusion, and Task-IL forgetting is
what a method loses in its features and heads, whatever the calibration between tasks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..config.schema import RunConfig
from ..coordinator.store import load_run_manifest, load_task_tensors
from ..data.loader import load_task_tensors as load_test_tensors
from ..models.continual import ContinualClassifier
from ..train.task import build_model, make_method, transforms


# test set j -> (Class-IL accuracy %, Task-IL accuracy %) of a single model
SingleScores = dict[int, tuple[float, float]]


@dataclass
class Block:
    """Sub-network `subnet` on test set `test`: best logit and its stream label per image."""

    subnet: int
    test: int
    best: np.ndarray
    label: np.ndarray


class Scorer:
    """Holds one model with every finished task's state and scores test sets with it."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, device: str = "cpu"):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = torch.device(device)
        self.manifest = load_run_manifest(self.run_dir)
        self.method = make_method(cfg)
        self._new_model()
        self._test_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        _, self.test_tf = transforms(cfg, self.manifest)

    def _new_model(self) -> None:
        self.model: ContinualClassifier = build_model(self.cfg, self.method, self.manifest,
                                                      self.run_dir)
        self.model.to(self.device).eval()
        self.loaded: set[int] = set()

    def load_tasks(self, task_ids: Sequence[int]) -> None:
        for t in task_ids:
            if t not in self.loaded:
                self.method.load_task_state(self.model, t, load_task_tensors(self.run_dir, t))
                self.model.to(self.device).eval()
                self.loaded.add(t)

    def test_set(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if j not in self._test_cache:
            self._test_cache[j] = load_test_tensors(self.manifest, j, "test", self.test_tf)
        return self._test_cache[j]

    @torch.no_grad()
    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        bs = self.cfg.trainer.eval_batch_size
        out = [self.model(images[i:i + bs].to(self.device)).float().cpu()
               for i in range(0, images.shape[0], bs)]
        return torch.cat(out) if out else torch.empty(0)

    def score_blocks(self, pairs: Sequence[tuple[int, int]]) -> list[Block]:
        """Blocks (sub-network i, test set j) for a sub-network method.

        Each sub-network is activated once and scores all its test sets in one pass over
        their concatenation: after a group of tasks finishes, an old sub-network meets every
        new test set at once instead of one small forward per set."""
        offsets = self.manifest.class_offsets()
        subnets = sorted({i for i, _ in pairs})
        self.load_tasks(subnets)
        blocks = []
        for i in subnets:
            tests = sorted({j for ii, j in pairs if ii == i})
            self.method.activate_subnetwork(self.model, i)
            sets = [self.test_set(j)[0] for j in tests]
            images = torch.cat(sets)
            if images.shape[0] == 0:
                blocks += [Block(i, j, np.empty(0, np.float32), np.empty(0, np.int64)) for j in tests]
                continue
            best, idx = self._logits(images).max(dim=1)
            label = idx + offsets[i]
            start = 0
            for j, images in zip(tests, sets):
                end = start + images.shape[0]
                blocks.append(Block(i, j, best[start:end].numpy(), label[start:end].numpy()))
                start = end
        return blocks

    def score_single(self, upto_task: int, tests: Sequence[int]) -> SingleScores:
        """(Class-IL, Task-IL) accuracy (%) of the model after `upto_task` on each test set."""
        # a single-model method's weights change every task: the model must hold exactly the
        # state after `upto_task`, so rebuild it (the decoded test sets stay cached)
        self._new_model()
        self.load_tasks(self.method.state_dependencies(upto_task) + [upto_task])
        self.method.activate_model(self.model, upto_task)
        offsets = self.manifest.class_offsets()
        out = {}
        for j in tests:
            images, labels = self.test_set(j)
            if not len(labels):
                out[j] = (0.0, 0.0)
                continue
            logits = self._logits(images)
            n_j = len(self.manifest.tasks[j].classes)
            own = logits[:, offsets[j]:offsets[j] + n_j].argmax(dim=1) + offsets[j]
            out[j] = (100.0 * float((logits.argmax(dim=1) == labels).float().mean()),
                      100.0 * float((own == labels).float().mean()))
        return out

    def test_labels(self, j: int) -> np.ndarray:
        return self.test_set(j)[1].numpy()


def task_il_from_blocks(j: int, blocks: dict[tuple[int, int], Block],
                        labels: dict[int, np.ndarray]) -> float:
    """Task-IL accuracy (%) on test set j: sub-network j alone (frozen, so the same after every
    later task)."""
    if not len(labels[j]):
        return 0.0
    return 100.0 * float((blocks[(j, j)].label == labels[j]).mean())


def row_from_blocks(t: int, blocks: dict[tuple[int, int], Block],
                    labels: dict[int, np.ndarray]) -> list[float]:
    """Accuracy row t (% per test set j <= t) from the blocks of sub-networks 0..t."""
    row = []
    for j in range(t + 1):
        best = np.stack([blocks[(i, j)].best for i in range(t + 1)])
        label = np.stack([blocks[(i, j)].label for i in range(t + 1)])
        pred = label[best.argmax(axis=0), np.arange(best.shape[1])]
        row.append(100.0 * float((pred == labels[j]).mean()) if len(labels[j]) else 0.0)
    return row
