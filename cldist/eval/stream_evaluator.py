"""The stream evaluator: finished tasks -> accuracy-matrix rows, as soon as each row can be
computed (the run's driver, cldist.stream, and `cldist eval` both use it;
`cldist.assemble.stream_evaluator` builds it with the run's settings).

It asks a runner (cldist.runners) for the scores - blocks of sub-network x test set, or one
model's scores - and turns them into the Class-IL rows (ensemble and routed), the Task-IL rows
and metrics.json's keys of both (cldist.eval.scoring does the maths).
"""
from __future__ import annotations

import time

from .metrics import accuracy_after, summarize
from .scoring import fit_router, routed_row_from_blocks, row_from_blocks, task_il_from_blocks


class StreamEvaluator:
    """Turns finished tasks into accuracy-matrix rows as soon as each row can be computed.

    Sub-network methods get two matrices from the same blocks (cldist.eval.scoring): the
    ensemble (the paper's protocol) and routed (the reference network's task posterior picks
    `top_k` sub-networks, decided by `combine`; the router is the LDA with `shrinkage` on the
    merged class statistics of tasks 0..t). `rows` is the one `class_il` names; streams whose
    tasks share classes (domain-incremental: `classes_per_task` None) have no task to route to,
    so they are scored by the ensemble only.
    """

    def __init__(self, prediction: str, runner, n_tasks: int, n_test: list[int],
                 classes_per_task: list[int] | None = None, class_il: str = "routed",
                 top_k: int = 2, combine: str = "lda_head", shrinkage: float = 0.1):
        self.prediction, self.runner, self.n_tasks, self.n_test = prediction, runner, n_tasks, n_test
        self.routing = prediction == "subnetworks" and classes_per_task is not None
        self.classes_per_task = classes_per_task
        self.top_k, self.combine, self.shrinkage = top_k, combine, shrinkage
        self.class_il = class_il if self.routing else "ensemble"
        self.finished: set[int] = set()
        self.blocks: dict = {}
        self.labels: dict = {}
        self.features: dict = {}  # test set -> reference (router) features
        self.task_stats: list = []  # reference statistics of tasks 0, 1, ... in order
        self.rows_ensemble: list[list[float]] = []
        self.rows_routed: list[list[float]] = []
        self.routed_scores: list = []  # RoutedScores per routed row
        self.single_rows: list[list[float]] = []
        if prediction != "subnetworks":
            self.rows = self.single_rows
        else:
            self.rows = self.rows_routed if self.class_il == "routed" else self.rows_ensemble
        self.task_il_rows: list[list[float]] = []  # the same rows with the task id given
        self.eval_seconds: list[float] = []
        self.eval_tasks_seen: list[int] = []  # tasks covered by each eval_seconds entry

    def task_finished(self, t: int) -> list[int]:
        return self.tasks_finished([t])

    def tasks_finished(self, tasks: list[int]) -> list[int]:
        """Record finished tasks; returns the indices of rows that became available.

        Tasks that finish together (a packed Ray Train job) are scored together: every
        sub-network meets all new test sets in one request."""
        new = set(tasks) - self.finished
        self.finished |= new
        start = time.perf_counter()
        if self.prediction == "subnetworks" and new:
            pairs = sorted({(t, j) for t in new for j in self.finished}
                           | {(i, t) for t in new for i in self.finished})
            for b in self.runner.score_blocks(pairs):
                self.blocks[(b.subnet, b.test)] = b
        ready = []
        while len(self.task_il_rows) + len(ready) < self.n_tasks and \
                all(i in self.finished for i in range(len(self.task_il_rows) + len(ready) + 1)):
            ready.append(len(self.task_il_rows) + len(ready))
        if ready and self.prediction == "subnetworks":
            self._fetch(ready)
        for r in ready:
            if self.prediction == "subnetworks":
                self._subnetwork_row(r)
            else:
                scores = self.runner.score_single(r, list(range(r + 1)))
                self.single_rows.append([scores[j][0] for j in range(r + 1)])
                self.task_il_rows.append([scores[j][1] for j in range(r + 1)])
        elapsed = time.perf_counter() - start
        if ready:
            images = sum(self.n_test[: ready[-1] + 1])
            self.eval_seconds.append(elapsed / max(1, images))
            self.eval_tasks_seen.append(ready[-1] + 1)
        return ready

    def _fetch(self, rows: list[int]) -> None:
        """What rows `rows` need beyond the blocks, in one request each: test labels, and for
        routing the new test sets' reference features and the new tasks' statistics."""
        tests = [j for j in range(rows[-1] + 1) if j not in self.labels]
        for j in tests:
            self.labels[j] = self.runner.test_labels(j)
        if self.routing:
            self.features.update(self.runner.reference_features(
                [j for j in range(rows[-1] + 1) if j not in self.features]))
            new = list(range(len(self.task_stats), rows[-1] + 1))
            stats = self.runner.task_statistics(new) if new else {}
            self.task_stats += [stats[t] for t in new]

    def _subnetwork_row(self, r: int) -> None:
        self.rows_ensemble.append(row_from_blocks(r, self.blocks, self.labels))
        if self.routing:
            lda = fit_router(self.task_stats[:r + 1], self.shrinkage,
                             sum(self.classes_per_task[:r + 1]))
            scores = routed_row_from_blocks(r, self.blocks, self.labels, self.features, lda,
                                            self.classes_per_task, self.top_k, self.combine)
            self.routed_scores.append(scores)
            self.rows_routed.append(scores.row)
        # a frozen sub-network's Task-IL never changes: extend the previous row
        self.task_il_rows.append((self.task_il_rows[-1] if self.task_il_rows else [])
                                 + [task_il_from_blocks(r, self.blocks, self.labels)])

    def rule_rows(self) -> dict[str, list[list[float]]]:
        """{rule: its rows so far} for the Class-IL rules this stream is scored by."""
        if self.prediction != "subnetworks":
            return {}
        out = {"ensemble": self.rows_ensemble}
        if self.routing:
            out["routed"] = self.rows_routed
        return out

    def class_il_metrics(self) -> dict:
        """metrics.json's keys of the Class-IL decision (sub-network methods; {} otherwise):
        both rules' final accuracy and matrix, the router's task-id accuracy and the network
        forwards per image of each rule, over the final row's test images."""
        if self.prediction != "subnetworks":
            return {}
        n = len(self.rows_ensemble)
        out = {"class_il_rule": self.class_il,
               "acc_ensemble": accuracy_after(self.rows_ensemble[-1], self.n_test),
               "accuracy_matrix_ensemble": self.rows_ensemble}
        if not self.routing:
            return {**out, "forwards_per_image": {"ensemble": n}}
        last = self.routed_scores[-1]
        return {**out, "acc_routed": accuracy_after(self.rows_routed[-1], self.n_test),
                "accuracy_matrix_routed": self.rows_routed, "task_id_acc": last.task_id_acc,
                "forwards_per_image": {"routed": 1 + min(self.top_k, n), "ensemble": n},
                "routing": {"top_k": self.top_k, "combine": self.combine,
                            "shrinkage": self.shrinkage}}


def task_il_metrics(task_il_rows: list[list[float]], n_test: list[int]) -> dict:
    """metrics.json's Task-IL keys: the final accuracy and forgetting with the task id given,
    and their matrix (cldist.eval.scoring)."""
    s = summarize(task_il_rows, n_test)
    return {"task_il_acc": s["acc"], "task_il_forgetting": s["forgetting"],
            "task_il_accuracy_matrix": task_il_rows}
