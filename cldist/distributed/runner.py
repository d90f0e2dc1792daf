"""The Ray runner: task jobs as Ray Train jobs, scheduled by the method's task graph.

Each task is one `TorchTrainer` job with `trainer.num_workers` workers. Every worker runs
`cldist.train.task.train_task` on its share of the task's shards with a DeepSpeed engine per
training phase; rank 0 asks the coordinator actor for rank decisions (broadcast to the other
ranks) and reports the task's files as the job's checkpoint, which the driver commits through
the coordinator.

Scheduling: tasks whose dependencies are done start at once, up to as many concurrent jobs as
the cluster has room for (`trainer.max_concurrent_tasks`, default: cluster CPUs divided by the
CPUs one job needs). PEARL's tasks after the reference are independent and run side by side;
chain methods run one job at a time, each data-parallel. The driver holds no tensors of any
task: jobs read their inputs from the run directory and return file paths.
"""
from __future__ import annotations

import json
import tempfile
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Sequence

import ray
import ray.train

from ..config.schema import RunConfig
from ..eval.scoring import Block
from ..runners import OnTaskDone, ready_order
from ..train.task import TaskJob
from .actors import CoordinatorActor, CoordinatorProxy, EvaluatorActor
from .cluster import connect
from .train_job import run_train_job


def task_worker(config: dict) -> None:
    """Ray Train worker function: learn one task on this worker's share of the data."""
    import torch

    from ..train.task import train_task
    from .deepspeed_engine import DeepSpeedStepEngine
    from .train_job import broadcast_object, worker_context

    rank, world_size, device = worker_context()
    job = TaskJob(**config["job"])
    cfg = job.cfg
    torch.set_num_threads(max(1, int(cfg.trainer.torch_threads or cfg.trainer.cpus_per_worker)))
    coordinator = ray.get_actor(config["coordinator"], namespace=config["namespace"])

    def make_engine(module, params, lr, weight_decay, total_steps):
        return DeepSpeedStepEngine(module, params, lr, weight_decay, total_steps,
                                   zero_stage=cfg.trainer.zero_stage,
                                   micro_batch_size=cfg.trainer.batch_size)

    def allocate_ranks(task_vectors, params):
        # rank 0 holds the gathered task vectors after finish(); one request, then broadcast
        decisions = ray.get(coordinator.allocate_ranks.remote(task_vectors, params)) \
            if rank == 0 else None
        return broadcast_object(decisions, src=0)

    def on_epoch(task_id, phase, epoch, n_epochs, loss, lr):
        # fire and forget: the driver drains these and prints one line per epoch
        coordinator.post_event.remote({"task": task_id, "phase": phase, "epoch": epoch,
                                       "n_epochs": n_epochs, "loss": loss, "lr": lr})

    with tempfile.TemporaryDirectory(prefix="cldist-task-") as tmp:
        meta = train_task(job, rank=rank, world_size=world_size, make_engine=make_engine,
                          allocate_ranks=allocate_ranks, on_epoch=on_epoch, device=device,
                          staging_root=tmp)
        # every rank's node, so a run can show that a job spanned nodes
        node_id = ray.get_runtime_context().get_node_id()
        node_ids = [node_id]
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            node_ids = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(node_ids, node_id)
        meta["node_id"], meta["node_ids"] = node_id, node_ids
        staging = meta.pop("staging_dir", None)
        metrics = {"meta_json": json.dumps(meta, default=float)}
        # every rank reports (a barrier in Train V2); rank 0's task files are the checkpoint,
        # which Ray Train copies to the run's storage for the driver to commit
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging)
                         if rank == 0 else None)


class RayRunner:
    name = "ray"

    def __init__(self, cfg: RunConfig, run_dir: str | Path, progress=None):
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir).resolve(), progress
        self.info = connect(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.num_gpus)
        self.namespace = ray.get_runtime_context().namespace
        self.coordinator_name = f"cldist-coordinator-{uuid.uuid4().hex[:8]}"
        self._coordinator = CoordinatorActor.options(
            name=self.coordinator_name, namespace=self.namespace).remote(
                str(self.run_dir), float(cfg.cluster.svd_task_cpus),
                max(1, int(self.info["cpus"])))
        self.coordinator = CoordinatorProxy(self._coordinator)
        self._evaluators: list | None = None
        self.job_nodes: dict[int, str] = {}

    # -- training --------------------------------------------------------------------------
    def _concurrency(self) -> int:
        if self.cfg.trainer.max_concurrent_tasks:
            return int(self.cfg.trainer.max_concurrent_tasks)
        per_job = self.cfg.trainer.num_workers * self.cfg.trainer.cpus_per_worker
        n = int(self.info["cpus"] // max(per_job, 1e-9))
        if self.cfg.trainer.use_gpu:
            n = min(n, int(self.info["gpus"] // self.cfg.trainer.num_workers))
        return max(1, n)

    def _run_job(self, job: TaskJob) -> dict:
        config = {"job": {"run_dir": str(self.run_dir), "config": job.config, "task_id": job.task_id},
                  "coordinator": self.coordinator_name, "namespace": self.namespace}
        result = run_train_job(task_worker, config, num_workers=self.cfg.trainer.num_workers,
                               use_gpu=self.cfg.trainer.use_gpu,
                               storage_path=str(self.run_dir / "ray_train"),
                               name=f"task-{job.task_id:03d}-{uuid.uuid4().hex[:6]}",
                               cpus_per_worker=self.cfg.trainer.cpus_per_worker,
                               max_failures=self.cfg.trainer.max_failures)
        meta = json.loads(result.metrics["meta_json"])
        if not result.checkpoint_dir:
            raise RuntimeError(f"task {job.task_id}: the training job reported no checkpoint")
        meta["staging_dir"] = result.checkpoint_dir
        return meta

    def run_tasks(self, jobs: dict[int, TaskJob], deps: dict[int, list[int]],
                  on_done: OnTaskDone, started: Callable[[int], None] | None = None) -> None:
        pending = sorted(jobs)
        done = {t for t in deps if t not in jobs}
        running: dict[Future, int] = {}
        with ThreadPoolExecutor(max_workers=self._concurrency(),
                                thread_name_prefix="cldist-task") as pool:
            while pending or running:
                for t in ready_order(pending, deps, done):
                    if len(running) >= self._concurrency():
                        break
                    pending.remove(t)
                    if started:
                        started(t)
                    running[pool.submit(self._run_job, jobs[t])] = t
                if not running:
                    raise RuntimeError(f"task graph is stuck: pending {pending}, done {sorted(done)}")
                finished, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
                self._print_events()
                for fut in finished:
                    t = running.pop(fut)
                    meta = fut.result()  # a failed job (after its retries) stops the stream
                    self._print_events()
                    self.job_nodes[t] = meta.get("node_id", "")
                    on_done(t, meta)
                    done.add(t)

    def _print_events(self) -> None:
        if self.progress is None:
            return
        for e in self.coordinator.drain_events():
            self.progress.epoch(e["task"], e["phase"], e["epoch"] + 1, e["n_epochs"], e["loss"], e["lr"])

    # -- evaluation ------------------------------------------------------------------------
    @property
    def evaluators(self) -> list:
        if self._evaluators is None:
            n = max(1, int(self.cfg.cluster.eval_actors))
            self._evaluators = [EvaluatorActor.remote(self.cfg.to_dict(), str(self.run_dir))
                                for _ in range(n)]
        return self._evaluators

    def score_blocks(self, pairs: Sequence[tuple[int, int]]) -> list[Block]:
        # shard by sub-network: actor k keeps the adapters of sub-networks i = k mod n
        n = len(self.evaluators)
        shards: dict[int, list] = {}
        for i, j in pairs:
            shards.setdefault(i % n, []).append((i, j))
        refs = [self.evaluators[k].score_blocks.remote(p) for k, p in shards.items()]
        return [b for part in ray.get(refs) for b in part]

    def score_single(self, upto_task: int, tests: Sequence[int]) -> dict[int, float]:
        # shard the test sets across actors; each scores the same model on its share
        n = len(self.evaluators)
        parts = [list(tests)[k::n] for k in range(n)]
        refs = [self.evaluators[k].score_single.remote(upto_task, p) for k, p in enumerate(parts) if p]
        out: dict[int, float] = {}
        for part in ray.get(refs):
            out.update(part)
        return out

    def test_labels(self, j: int):
        return ray.get(self.evaluators[j % len(self.evaluators)].test_labels.remote(j))

    def close(self) -> None:
        """Stop this run's actors (the cluster itself stays up: it may be shared)."""
        for actor in (self._evaluators or []) + [self._coordinator]:
            ray.kill(actor)
        self._evaluators = None
