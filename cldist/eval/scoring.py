"""Class-IL scoring of a run's models on test data (both runners call these).

Sub-network methods (PEARL, linear probe) are scored two ways, both always recorded
(docs: DESIGN.md "Class-IL decision"):

- ensemble (the paper's protocol): every test image goes through every task sub-network; the
  prediction after task t is the argmax of the logits of sub-networks 0..t concatenated.
- routed: one forward of the reference network gives the image's router features; the LDA on
  the merged class statistics of tasks 0..t gives a posterior over tasks; only the top-k tasks'
  sub-networks run, and the decision combines the posterior with their log-softmax
  (cldist.eval.routing).

Sub-networks never change once trained, so a block (sub-network i, test set j) is scored once
and kept as its per-image best logit with that logit's stream label (the ensemble) and its
log-softmax over its own classes (the routed heads). Every row of either rule's accuracy matrix
follows from the blocks plus the reference features of each test set:

    ensemble_t(x) = label of max_{i <= t} best_i(x)
    routed_t(x)   = routed_decision over the top-k tasks of P_t(task | x), heads from blocks

During a stream the ensemble needs every block anyway, so both rules come from them.
`Scorer.score_routed` is the true routed execution (`cldist eval`, `cldist bench routing`):
the reference plus each image's top-k sub-networks only, images grouped by routed task so each
sub-network runs once per group - 1 + k network forwards per image instead of T.

Single-model methods: after task t, one model over all seen classes scores test sets 0..t.

Beside the Class-IL accuracy, each score also gives the task-incremental (Task-IL) accuracy:
the same logits, but the argmax taken only over the true task's classes (the task id given).
Task-IL >= Class-IL image by image for the ensemble and the single models (the same logits);
the gap is cross-task confusion, and Task-IL forgetting is what a method loses in its features
and heads, whatever the calibration between tasks. Routed Class-IL with `lda_head` also weighs
the class statistics' posterior, so it can beat the heads' own Task-IL.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from ..coordinator.discriminant import LinearDiscriminant
from ..coordinator.statistics import (STATS_STEM, ClassStatistics, merge_all, router_features,
                                      router_projection, statistics_from_tensors,
                                      statistics_pass)
from ..data import TaskReader
from ..data.manifest import Manifest
from ..errors import UserError
from ..methods.base import ContinualMethod
from ..models.continual import ContinualClassifier
from ..rundir import RunDir
from .routing import (class_log_posterior, class_task_index, routed_decision,
                      task_log_posterior, top_tasks)


# test set j -> (Class-IL accuracy %, Task-IL accuracy %) of a single model
SingleScores = dict[int, tuple[float, float]]


@dataclass
class Block:
    """Sub-network `subnet` on test set `test`, per image: its best logit and that logit's
    stream label (the ensemble), and its log-softmax over its own classes (routed heads)."""

    subnet: int
    test: int
    best: np.ndarray       # float32 (n,)
    label: np.ndarray      # int64 (n,)
    log_probs: np.ndarray  # float32 (n, classes of `subnet`)


@dataclass
class RoutedScores:
    """One routed accuracy-matrix row and how well the router found the task, over the row's
    test images (test sets 0..t)."""

    row: list[float]           # accuracy (%) per test set j <= t
    task_top1: int             # images whose most probable task is their own
    task_topk: int             # images whose own task is among the k routed
    images: int
    k: int                     # sub-networks run per image: min(top_k, t + 1)
    forwards_per_image: float  # network forwards per image: the reference + k sub-networks

    @property
    def task_id_acc(self) -> dict:
        n = max(self.images, 1)
        return {"top1": 100.0 * self.task_top1 / n, "top_k": 100.0 * self.task_topk / n,
                "k": self.k}


def saved_task_statistics(run_dir, task_id: int) -> ClassStatistics | None:
    """The reference-network class statistics a task's job saved (tasks/TTT/stats.safetensors,
    group "ref"); None for a run made before jobs saved them."""
    path = RunDir(run_dir).task_dir(task_id) / f"{STATS_STEM}.safetensors"
    if not path.is_file():
        return None
    hint = (f"delete {path} and `cldist eval {run_dir}` collects the statistics again from the "
            f"task's training shards")
    try:
        groups = statistics_from_tensors(load_file(str(path)), str(path))
    except ValueError as e:
        raise UserError(f"{e}; {hint}") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"{path} is not a readable safetensors file ({e}); {hint}") from None
    if "ref" not in groups:
        raise UserError(f"{path} holds no reference statistics (ref.*); {hint}")
    return groups["ref"]


def fit_router(stats: Sequence[ClassStatistics], shrinkage: float,
               n_classes: int) -> LinearDiscriminant:
    """The LDA over the merged statistics of tasks 0..t, its columns the stream labels
    0..n_classes-1 (tasks lay their classes out in order)."""
    lda = LinearDiscriminant.fit(merge_all(stats), shrinkage)
    if not torch.equal(lda.classes, torch.arange(n_classes)):
        raise ValueError(f"router statistics cover the classes {lda.classes.tolist()}, not the "
                         f"stream labels 0..{n_classes - 1} of the tasks scored")
    return lda


def routed_predict(class_log_post: torch.Tensor, head_log_probs: torch.Tensor,
                   class_task: torch.Tensor, n_tasks: int, top_k: int,
                   combine: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(decided column = stream label (N,), routed tasks (N, k) best first) - the one routed
    decision both the block path and the routed execution take."""
    task_post = task_log_posterior(class_log_post, class_task, n_tasks)
    routed = top_tasks(task_post, top_k)
    pred = routed_decision(combine, class_log_post, task_post, head_log_probs, class_task,
                           routed)
    return pred, routed


def _routed_scores(pred: torch.Tensor, routed: torch.Tensor, labels: torch.Tensor,
                   true_task: torch.Tensor, sizes: Sequence[int],
                   forwards_per_image: float) -> RoutedScores:
    correct = (pred == labels).double()
    row, start = [], 0
    for n in sizes:
        row.append(100.0 * float(correct[start:start + n].mean()) if n else 0.0)
        start += n
    return RoutedScores(row, int((routed[:, 0] == true_task).sum()),
                        int((routed == true_task[:, None]).any(dim=1).sum()), len(labels),
                        int(routed.shape[1]), forwards_per_image)


def routed_row_from_blocks(t: int, blocks: dict[tuple[int, int], Block],
                           labels: dict[int, np.ndarray], features: dict[int, np.ndarray],
                           lda: LinearDiscriminant, classes_per_task: Sequence[int],
                           top_k: int, combine: str) -> RoutedScores:
    """Routed row t from the blocks of sub-networks 0..t and the test sets' reference
    features; `lda` is the router fitted on tasks 0..t. What `Scorer.score_routed` computes
    by running only the routed sub-networks."""
    class_task = class_task_index(classes_per_task[:t + 1])
    tests = list(range(t + 1))
    feats = torch.from_numpy(np.concatenate([features[j] for j in tests]))
    head = torch.from_numpy(np.concatenate(
        [np.concatenate([blocks[(i, j)].log_probs for i in tests], axis=1) for j in tests]))
    y = torch.from_numpy(np.concatenate([labels[j] for j in tests]))
    true_task = class_task[y] if len(y) else y
    pred, routed = routed_predict(class_log_posterior(lda, feats), head, class_task, t + 1,
                                  top_k, combine)
    return _routed_scores(pred, routed, y, true_task, [len(labels[j]) for j in tests],
                          1.0 + routed.shape[1])


@dataclass
class ScoringSetup:
    """A run's scoring as the objects `Scorer` needs (cldist.assemble.make_scorer builds it
    from the run's config): `new_model()` returns the method's model with the run's reference
    weights and no task loaded; `test_transform` is the run's evaluation transform; the router
    projection is drawn from (`router_projection_dim`, `seed`) as the task jobs drew it."""

    manifest: Manifest
    method: ContinualMethod
    new_model: Callable[[], ContinualClassifier]
    test_transform: Callable
    router_projection_dim: int
    seed: int
    eval_batch_size: int


class Scorer:
    """Holds one model with every finished task's state and scores test sets with it."""

    def __init__(self, setup: ScoringSetup, run_dir: str | Path, device: str = "cpu"):
        self.setup, self.run_dir = setup, Path(run_dir)
        self.run = RunDir(self.run_dir)
        self.device = torch.device(device)
        self.manifest, self.method = setup.manifest, setup.method
        self.eval_batch_size = setup.eval_batch_size
        self._new_model()
        self._test_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._feature_cache: dict[int, np.ndarray] = {}
        self._stats_cache: dict[int, ClassStatistics] = {}
        self.test_tf = setup.test_transform
        # the run's fixed router projection (RanPAC), the one its task jobs used
        self.projection = router_projection(setup.router_projection_dim,
                                            self.model.feature_dim, setup.seed)

    def _new_model(self) -> None:
        self.model: ContinualClassifier = self.setup.new_model()
        self.model.to(self.device).eval()
        self.loaded: set[int] = set()

    def load_tasks(self, task_ids: Sequence[int]) -> None:
        for t in task_ids:
            if t not in self.loaded:
                self.run.load_task_into(self.method, self.model, t)  # names a misfit file
                self.model.to(self.device).eval()
                self.loaded.add(t)

    def test_set(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if j not in self._test_cache:
            self._test_cache[j] = TaskReader(self.manifest, j, "test", self.test_tf).tensors()
        return self._test_cache[j]

    @torch.no_grad()
    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        bs = self.eval_batch_size
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
            n_i = len(self.manifest.tasks[i].classes)
            self.method.activate_subnetwork(self.model, i)
            sets = [self.test_set(j)[0] for j in tests]
            images = torch.cat(sets)
            if images.shape[0] == 0:
                blocks += [Block(i, j, np.empty(0, np.float32), np.empty(0, np.int64),
                                 np.empty((0, n_i), np.float32)) for j in tests]
                continue
            logits = self._logits(images)
            best, idx = logits.max(dim=1)
            label = idx + offsets[i]
            log_probs = torch.log_softmax(logits, dim=1)
            start = 0
            for j, images in zip(tests, sets):
                end = start + images.shape[0]
                blocks.append(Block(i, j, best[start:end].numpy(), label[start:end].numpy(),
                                    log_probs[start:end].numpy()))
                start = end
        return blocks

    # -- routing ---------------------------------------------------------------------------
    @torch.no_grad()
    def _reference(self, images: torch.Tensor) -> torch.Tensor:
        """Router features of `images`: the reference network (no task's adapter or head)."""
        self.model.activate([], [])
        bs = self.eval_batch_size
        out = [router_features(self.model.features(images[i:i + bs].to(self.device)).cpu(),
                               self.projection) for i in range(0, images.shape[0], bs)]
        dim = self.projection.shape[1] if self.projection is not None else self.model.feature_dim
        return torch.cat(out) if out else torch.empty(0, dim)

    def reference_features(self, tests: Sequence[int]) -> dict[int, np.ndarray]:
        """Router features (float32 (n_j, d)) of test sets `tests`, computed once per set."""
        for j in tests:
            if j not in self._feature_cache:
                self._feature_cache[j] = self._reference(self.test_set(j)[0]).numpy()
        return {j: self._feature_cache[j] for j in tests}

    def forget_features(self) -> None:
        """Drop the cached reference features (a benchmark times their forward again)."""
        self._feature_cache.clear()

    def task_statistics(self, tasks: Sequence[int]) -> dict[int, ClassStatistics]:
        """The reference-network class statistics of each task's training split: what its job
        saved, else (a run made before jobs saved them) one pass over its training shards with
        the test-time transform, kept in memory only."""
        for t in tasks:
            if t in self._stats_cache:
                continue
            stats = saved_task_statistics(self.run_dir, t)
            if stats is None:
                self.model.eval()
                self.model.activate([], [])
                classes = self.manifest.task_stream_labels(t)
                dim = (self.projection.shape[1] if self.projection is not None
                       else self.model.feature_dim)
                stats = statistics_pass(
                    self.model.features,
                    TaskReader(self.manifest, t, "train", self.test_tf).batches(
                        self.eval_batch_size),
                    classes, dim, self.device, self.projection)
            self._stats_cache[t] = stats
        return {t: self._stats_cache[t] for t in tasks}

    def score_routed(self, upto_task: int, tests: Sequence[int], top_k: int, combine: str,
                     shrinkage: float) -> RoutedScores:
        """Routed Class-IL after `upto_task` on test sets `tests` (ascending), by running only
        what routing needs: the reference on every image, then each sub-network once on the
        images routed to it (top `top_k` tasks of the LDA fitted on tasks 0..upto_task with
        `shrinkage`), decided by `combine` (cldist.eval.routing)."""
        tasks = list(range(upto_task + 1))
        classes_per_task = [len(self.manifest.tasks[i].classes) for i in tasks]
        class_task = class_task_index(classes_per_task)
        offsets = np.cumsum([0] + classes_per_task)
        self.load_tasks(tasks)
        stats = self.task_statistics(tasks)
        lda = fit_router([stats[i] for i in tasks], shrinkage, int(offsets[-1]))
        feats = self.reference_features(tests)
        x = torch.from_numpy(np.concatenate([feats[j] for j in tests]))
        class_post = class_log_posterior(lda, x)
        routed = top_tasks(task_log_posterior(class_post, class_task, len(tasks)), top_k)
        images = torch.cat([self.test_set(j)[0] for j in tests])
        # the heads of tasks an image was not routed to never run on it: -inf, as
        # routed_decision expects
        head = torch.full((len(x), int(offsets[-1])), float("-inf"))
        runs = len(x)  # the reference forward of every image
        for i in tasks:  # one grouped forward per routed task, not one per image
            rows = (routed == i).any(dim=1).nonzero().flatten()
            if not len(rows):
                continue
            self.method.activate_subnetwork(self.model, i)
            head[rows[:, None], torch.arange(offsets[i], offsets[i + 1])[None, :]] = \
                torch.log_softmax(self._logits(images[rows]), dim=1)
            runs += len(rows)
        pred, routed_again = routed_predict(class_post, head, class_task, len(tasks), top_k,
                                            combine)
        labels = torch.cat([self.test_set(j)[1] for j in tests])
        true_task = class_task[labels] if len(labels) else labels
        return _routed_scores(pred, routed_again, labels, true_task,
                              [len(self.test_set(j)[1]) for j in tests],
                              runs / max(len(x), 1))

    def score_single(self, upto_task: int, tests: Sequence[int]) -> SingleScores:
        """(Class-IL, Task-IL) accuracy (%) of the model after `upto_task` on each test set."""
        # a single-model method's weights change every task: the model must hold exactly the
        # state after `upto_task`, so rebuild it (the decoded test sets stay cached)
        self._new_model()
        self.load_tasks(self.method.prediction_dependencies(upto_task))
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
    """Ensemble accuracy row t (% per test set j <= t) from the blocks of sub-networks 0..t."""
    row = []
    for j in range(t + 1):
        best = np.stack([blocks[(i, j)].best for i in range(t + 1)])
        label = np.stack([blocks[(i, j)].label for i in range(t + 1)])
        pred = label[best.argmax(axis=0), np.arange(best.shape[1])]
        row.append(100.0 * float((pred == labels[j]).mean()) if len(labels[j]) else 0.0)
    return row
