"""Ray actors of a run: the coordinator (owns run state, fans SVDs out) and evaluators.

Coordinator: wraps `cldist.coordinator.run_coordinator.RunCoordinator`. Task jobs call
`allocate_ranks` with their task vectors; each large layer's SVD runs as its own Ray task (one
torch thread) so a 12-layer ViT allocates in parallel across the cluster. Small layers (below
`cluster.svd_inline_max_flops`, default 256 x 256) are decomposed in the coordinator itself: their SVD
takes microseconds to milliseconds, far less than a Ray task's round trip. The SVD tasks reserve
`cluster.svd_task_cpus` CPUs (default 0): the jobs asking for ranks hold their workers' CPUs
while they wait, so on a cluster that concurrent jobs fill completely, SVD tasks that reserve
a CPU would wait for those jobs forever. Give them 1 on clusters with CPU headroom.
Finished tasks are committed through it, so `state.json` has exactly one writer: by the driver
when a job ends, and by a packed job's rank 0 as soon as each task but its last is reported.
With job slots (`trainer.tasks_per_job=auto`) it also holds the queue of ready tasks
(cldist.runners.slots): slots claim tasks from it, and a slot's commit marks its task done in
the same call.

Evaluators: each holds the frozen backbone once plus the adapters of the sub-networks it was
given (PEARL: shard by sub-network) or a share of the test sets (single-model methods). For
routed Class-IL they also give the reference network's features of their share of the test sets
and, for runs whose tasks saved none, the class statistics of their share of the tasks.
"""
from __future__ import annotations

from typing import Sequence

import time

import ray
import torch

from ..config.schema import ClusterConfig
from ..coordinator.run_coordinator import RunCoordinator, allocate_layer
from ..runners.slots import SlotQueue


def _svd_flops(w_task) -> int:
    """m * n * min(m, n): the cost of a dense SVD of an m x n task vector, up to a constant,
    compared with `cluster.svd_inline_max_flops` (docs/BENCHMARKS.md)."""
    m = int(w_task.shape[0])
    n = w_task.numel() // max(m, 1)  # a 1x1 conv's (out, in, 1, 1) is an out x in matrix
    return m * n * min(m, n)


@ray.remote(num_cpus=0)
def svd_layer_task(name: str, w_ref, w_task, params: dict):
    torch.set_num_threads(1)  # one core per layer; the fan-out gives the parallelism
    return allocate_layer(name, w_ref, w_task, params)


@ray.remote(num_cpus=0, max_concurrency=16)
class CoordinatorActor:
    def __init__(self, run_dir: str, svd_task_cpus: float = 0.0, max_svd_in_flight: int = 2,
                 inline_svd_max_flops: int = ClusterConfig.svd_inline_max_flops):
        import threading
        torch.set_num_threads(1)  # inline SVDs of small layers: the actor reserves no CPU
        self.inline_svd_max_flops = int(inline_svd_max_flops)
        self.inner = RunCoordinator(run_dir)
        self.events: list[dict] = []
        self.queue: SlotQueue | None = None  # job slots' tasks (open_queue)
        self.queue_lock = threading.Lock()
        self.events_lock = threading.Lock()
        self.svd = svd_layer_task.options(num_cpus=svd_task_cpus)
        # bound the SVD tasks in flight across all concurrent requests: 0-CPU tasks are not
        # limited by Ray's scheduler, and each one in flight needs a worker process
        self.slots = threading.BoundedSemaphore(max(1, int(max_svd_in_flight)))

    def allocate_ranks(self, task_vectors: dict, params: dict) -> dict:
        results: dict = {}
        in_flight: list = []
        large: dict = {}
        for n, (w_ref, w_task) in task_vectors.items():
            if _svd_flops(w_task) <= self.inline_svd_max_flops:  # cheaper here than a Ray task
                results[n] = allocate_layer(n, w_ref, w_task, params)[1]
            else:
                large[n] = (w_ref, w_task)

        def collect(block: bool) -> None:
            nonlocal in_flight
            if not in_flight:
                return
            done, in_flight = ray.wait(in_flight, num_returns=1 if block else len(in_flight),
                                       timeout=None if block else 0)
            for ref in done:
                name, decision = ray.get(ref)
                results[name] = decision
                self.slots.release()

        for n, (w_ref, w_task) in large.items():
            # never block holding slots while our own results could free them (two requests
            # each holding a slot and waiting for another would deadlock)
            while not self.slots.acquire(blocking=False):
                if in_flight:
                    collect(block=True)
                else:
                    time.sleep(0.02)
            in_flight.append(self.svd.remote(n, w_ref, w_task, params))
            collect(block=False)
        while in_flight:
            collect(block=True)
        return results

    def commit(self, task_id: int, staging: str, meta: dict) -> None:
        self.inner.commit(task_id, staging, meta)

    def commit_reported(self, task_id: int, checkpoint, meta: dict) -> bool:
        """Commit a task a running job has reported (a `ray.train.Checkpoint`), as a copy:
        the checkpoint stays for the job's own retries, and the driver's commit when the
        job ends finds the task done."""
        with checkpoint.as_directory() as source:
            return self.inner.commit_copy(task_id, source, meta)

    # -- job slots (trainer.tasks_per_job=auto): the queue of ready tasks, beside the commits
    def open_queue(self, tasks: list[int], deps: dict, done: list[int]) -> None:
        with self.queue_lock:
            self.queue = SlotQueue(tasks, deps, done)

    def slot_started(self, slot: str) -> int:
        """A slot's worker group starts (again); its attempt number. A task the slot held
        before a restart is ready again."""
        with self.queue_lock:
            attempt = self.queue.start(slot)
        self.post_event({"kind": "attempt", "job": slot})
        return attempt

    def claim(self, slot: str) -> int | None:
        """The next ready task for `slot` (None: nothing ready now, the slot ends)."""
        with self.queue_lock:
            task = self.queue.claim(slot)
            if task is not None:
                self.post_event({"kind": "started", "task": task, "job": slot})
            return task

    def commit_slot_task(self, task_id: int, checkpoint, meta: dict) -> None:
        """Commit a task a slot has reported, and mark it done in the queue in the same step
        (so its dependents become ready, and it is never handed out again); the driver learns
        of it from a "committed" event and scores it."""
        with checkpoint.as_directory() as source:
            self.inner.commit_copy(task_id, source, meta)
        with self.queue_lock:
            if self.queue.complete(task_id):
                self.post_event({"kind": "committed", "task": task_id, "meta": meta})

    def release_slot(self, slot: str) -> int | None:
        with self.queue_lock:
            return self.queue.release(slot)

    def close_queue(self) -> None:
        with self.queue_lock:
            self.queue.close()

    def queue_status(self) -> dict:
        with self.queue_lock:
            return self.queue.status()

    # progress events from the jobs' rank-0 workers, drained and printed by the driver
    def post_event(self, event: dict) -> None:
        with self.events_lock:  # the actor is threaded: no event may fall between two drains
            self.events.append(event)

    def drain_events(self) -> list[dict]:
        with self.events_lock:
            out, self.events = self.events, []
        return out

    def set_rows(self, rows) -> None:
        self.inner.set_rows(rows)

    def set(self, key: str, value) -> None:
        self.inner.set(key, value)

    def snapshot(self) -> dict:
        return self.inner.snapshot()


class CoordinatorProxy:
    """The driver's synchronous view of the coordinator actor (same methods as RunCoordinator)."""

    def __init__(self, actor):
        self.actor = actor

    def allocate_ranks(self, task_vectors: dict, params: dict) -> dict:
        return ray.get(self.actor.allocate_ranks.remote(task_vectors, params))

    def commit(self, task_id: int, staging: str, meta: dict) -> None:
        ray.get(self.actor.commit.remote(task_id, staging, meta))

    def set_rows(self, rows) -> None:
        ray.get(self.actor.set_rows.remote(rows))

    def drain_events(self) -> list[dict]:
        return ray.get(self.actor.drain_events.remote())

    def set(self, key: str, value) -> None:
        ray.get(self.actor.set.remote(key, value))

    def snapshot(self) -> dict:
        return ray.get(self.actor.snapshot.remote())


# evaluators run beside training: they take no CPU reservation (scoring is short and
# must not wait for a training job to free a core) and limit themselves to one thread; on GPU
# runs they reserve a share of a GPU (`cluster.eval_gpus`) and score there
@ray.remote(num_cpus=0, max_restarts=2, max_task_retries=2)
class EvaluatorActor:
    def __init__(self, config: dict, run_dir: str, threads: int = 1, on_gpu: bool = False):
        from ..config.schema import RunConfig
        from ..assemble import make_scorer
        torch.set_num_threads(threads)
        self.cfg, self.run_dir = RunConfig.from_dict(config), run_dir
        # Ray shows the actor only the GPU it reserved; a cluster that declares GPUs torch
        # cannot use (a logical GPU, a broken driver) still scores, on the CPU
        device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        if on_gpu and device == "cpu":
            print("[cldist] evaluator: reserved a GPU share but torch sees no CUDA device; "
                  "scoring on the CPU", flush=True)
        self.scorer = make_scorer(self.cfg, run_dir, device=device)

    def score_blocks(self, pairs: Sequence[tuple[int, int]]):
        return self.scorer.score_blocks(pairs)

    def score_single(self, upto_task: int, tests: Sequence[int]):
        return self.scorer.score_single(upto_task, tests)

    def test_labels(self, j: int):
        return self.scorer.test_labels(j)

    def reference_features(self, tests: Sequence[int]):
        return self.scorer.reference_features(tests)

    def task_statistics(self, tasks: Sequence[int]):
        return self.scorer.task_statistics(tasks)

    def score_routed(self, upto_task: int, tests: Sequence[int], top_k: int, combine: str,
                     shrinkage: float):
        return self.scorer.score_routed(upto_task, tests, top_k, combine, shrinkage)
