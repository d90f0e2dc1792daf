"""The Ray runner: task jobs as Ray Train jobs, scheduled by the method's task graph.

A job is one `TorchTrainer` with `trainer.num_workers` workers that learns one task, or up to
`trainer.tasks_per_job` independent tasks back to back (packing amortises a job's start-up,
10-20 s, over many short tasks of a long stream). Every worker runs
`cldist.train.task.train_task` on its share of the task's shards with a DeepSpeed engine per
training phase; rank 0 asks the coordinator actor for rank decisions (broadcast to the other
ranks) and reports each task's files as a checkpoint. The driver commits them through the
coordinator once the job ends; in a packed job, rank 0 has each task but the last committed
(as a copy) as soon as Ray Train has registered its report, so a driver that dies mid-job
loses only the task in progress.

Scheduling: tasks whose dependencies are done start at once, up to as many concurrent jobs as
the cluster has room for (`trainer.max_concurrent_tasks`, default: cluster CPUs divided by the
CPUs one job needs). PEARL's tasks after the reference are independent and run side by side;
chain methods run one job at a time, each data-parallel. The driver holds no tensors of any
task: jobs read their inputs from the run directory and return file paths.

Job slots (`trainer.tasks_per_job=auto`): instead of jobs of fixed groups, up to that many
long-lived jobs ("slots") each pull the next ready task from a queue in the coordinator actor
(cldist.runners.slots), learn it, have it committed - which makes its dependents ready - and
pull again until nothing is ready; the driver scores each task as soon as it is committed. A
stream pays the job start-up once per slot: a chain runs in one slot, PEARL's reference in one
and its independent tasks in as many as fit.

Failures: a job whose worker or node dies is restarted by Ray Train (`trainer.max_failures`)
on whatever nodes remain; it skips the tasks it had already reported (a restarted slot: the
task it held is back in the queue, committed ones never are), and the driver prints which job
was retried. Evaluator actors restart themselves (`max_restarts`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Sequence

import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..assemble import TaskJob
from ..config.schema import RunConfig, gpu_shares
from ..eval.scoring import Block, SingleScores, saved_task_statistics
from ..rundir import RunDir
from ..runners import OnTaskDone, OnTaskStarted, done_before, ready_order
from .actors import CoordinatorActor, CoordinatorProxy, EvaluatorActor
from .cluster import connect
from .train_job import run_train_job

logger = logging.getLogger(__name__)

# Callables every training worker calls at the end of each epoch, as
# hook(run_dir, task_id, phase=..., epoch=..., rank=...): none in a run; a test installs its
# own (tests/faults.py kills a worker this way). The driver sends them with each job, so
# they must pickle (a module workers cannot import: ship it by value, train_job).
WORKER_EPOCH_HOOKS: tuple = ()


class _Worker:
    """What every worker of a task job needs: its rank and device, the coordinator, and the
    hooks `train_task` calls (DeepSpeed engines, rank allocation, epoch events)."""

    def __init__(self, run_dir: str, config: dict, coordinator: str, namespace: str,
                 epoch_hooks: Sequence = ()):
        import torch

        from .train_job import worker_context

        self.rank, self.world_size, self.device = worker_context()
        self.run_dir, self.config = run_dir, config
        self.epoch_hooks = tuple(epoch_hooks)
        self.cfg = RunConfig.from_dict(config)
        torch.set_num_threads(max(1, int(self.cfg.trainer.torch_threads
                                         or self.cfg.trainer.cpus_per_worker)))
        self.coordinator = ray.get_actor(coordinator, namespace=namespace)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ids = [self.node_id]
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            self.node_ids = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(self.node_ids, self.node_id)  # a job across nodes

    def make_engine(self, module, params, lr, weight_decay, total_steps, optimizer="adamw"):
        from .deepspeed_engine import DeepSpeedStepEngine
        return DeepSpeedStepEngine(module, params, lr, weight_decay, total_steps,
                                   zero_stage=self.cfg.trainer.zero_stage,
                                   micro_batch_size=self.cfg.trainer.batch_size,
                                   optimizer=optimizer)

    def allocate_ranks(self, task_vectors, params):
        from .train_job import broadcast_object
        # rank 0 holds the gathered task vectors after finish(); one request, then broadcast.
        # They travel on the host: the coordinator holds no GPU and could not unpickle CUDA
        # tensors (a GPU worker's weights are on its device)
        host = {n: tuple(w.detach().cpu() for w in pair) for n, pair in task_vectors.items()}
        decisions = ray.get(self.coordinator.allocate_ranks.remote(host, params)) \
            if self.rank == 0 else None
        return broadcast_object(decisions, src=0)

    def on_epoch(self, task_id, phase, epoch, n_epochs, loss, lr):
        # fire and forget: the driver drains these and prints one line per epoch
        self.coordinator.post_event.remote({"kind": "epoch", "task": task_id, "phase": phase,
                                            "epoch": epoch, "n_epochs": n_epochs, "loss": loss,
                                            "lr": lr})
        for hook in self.epoch_hooks:
            hook(self.run_dir, task_id, phase=phase, epoch=epoch, rank=self.rank)

    def learn_and_report(self, task_id: int, **extra) -> None:
        """Learn one task and report it (every rank: a barrier); rank 0's task files are the
        report's checkpoint, its meta (with `extra`) the report's metrics."""
        from ..assemble import task_setup
        from ..train.task import train_task
        job = TaskJob(self.run_dir, self.config, task_id)
        with tempfile.TemporaryDirectory(prefix="cldist-task-") as tmp:
            meta = train_task(task_setup(job), rank=self.rank, world_size=self.world_size,
                              make_engine=self.make_engine, allocate_ranks=self.allocate_ranks,
                              on_epoch=self.on_epoch, device=self.device, staging_root=tmp)
            meta["node_id"], meta["node_ids"] = self.node_id, self.node_ids
            meta.update(extra)
            staging = meta.pop("staging_dir", None)
            metrics = {"task_id": task_id, "meta_json": json.dumps(meta, default=float)}
            # rank 0's task files are the checkpoint; Ray Train copies them to the run's storage
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging)
                             if self.rank == 0 else None)


def task_worker(config: dict) -> None:
    """Ray Train worker function: learn a group of independent tasks, one after the other.

    After each task every rank reports (a barrier in Train V2), rank 0 attaches the task's
    files as a checkpoint, and the workers wait until the controller has registered the
    report before the next task; rank 0 then has the coordinator commit that task. When Ray
    Train restarts the worker group after a failure (`FailureConfig`), `get_checkpoint()` is
    the last task reported before it, so the retry carries on with the next task of the group
    instead of starting the group again.
    """
    jobs = [TaskJob(**j) for j in config["jobs"]]
    w = _Worker(jobs[0].run_dir, jobs[0].config, config["coordinator"], config["namespace"],
                config.get("epoch_hooks", ()))
    if w.rank == 0:  # the driver counts attempts per job to report retries
        ray.get(w.coordinator.post_event.remote({"kind": "attempt", "job": config["job_name"]}))

    group = [job.task_id for job in jobs]
    done_in_group = _tasks_reported_before(ray.train.get_checkpoint(), group)
    for job in jobs:
        if job.task_id in done_in_group:
            continue
        w.learn_and_report(job.task_id, job_group=group)
        if job is not jobs[-1]:
            reported = _wait_until_report_registered()
            if w.rank == 0:
                _commit_reported(w.coordinator, job.task_id, reported)


def slot_worker(config: dict) -> None:
    """Ray Train worker function of a job slot (`trainer.tasks_per_job=auto`): learn the task
    the coordinator's queue hands out next, until it has none ready.

    Rank 0 claims (broadcast: every rank learns the same task); every rank reports the task
    and waits until Ray Train has registered the report, as in a packed job; then rank 0 has
    the coordinator commit it - which marks it done in the queue in the same call, making its
    dependents ready - and claims again. When Ray Train restarts the slot after a failure,
    the task it was learning is ready again in the queue (`slot_started`), and a task it had
    reported but not yet committed is committed from its checkpoint; committed tasks are never
    handed out again, so a retry never learns one of them.
    """
    from .train_job import broadcast_object

    w = _Worker(config["run_dir"], config["config"], config["coordinator"], config["namespace"],
                config.get("epoch_hooks", ()))
    slot = config["job_name"]
    attempt = ray.get(w.coordinator.slot_started.remote(slot)) if w.rank == 0 else 0
    checkpoint = ray.train.get_checkpoint()
    if w.rank == 0 and checkpoint is not None:  # a retry: what the last attempt reported last
        with checkpoint.as_directory() as d:
            meta = json.loads((Path(d) / "meta.json").read_text())
        meta["job_slot"] = slot
        ray.get(w.coordinator.commit_slot_task.remote(int(meta["task_id"]), checkpoint, meta))
    while True:
        task = broadcast_object(ray.get(w.coordinator.claim.remote(slot)) if w.rank == 0
                                else None, src=0)
        if task is None:
            return
        w.learn_and_report(task, job_slot=slot)
        reported = _wait_until_report_registered()
        if w.rank == 0:
            entry = next((e for e in reversed(reported) if e.metrics.get("task_id") == task), None)
            if entry is None:
                raise RuntimeError(f"slot {slot}: Ray Train registered no report of task {task}")
            meta = json.loads(entry.metrics["meta_json"])
            meta["job_attempts"] = attempt
            # synchronous: the next claim must see this task done (a chain's next task)
            ray.get(w.coordinator.commit_slot_task.remote(task, entry.checkpoint, meta))


def _wait_until_report_registered() -> list:
    """Block until the Train controller has registered this worker's latest report.

    A report sits in the worker's queue until the controller polls it (every couple of
    seconds); a worker killed in between takes it along, and the retry's `get_checkpoint()`
    would not know the task was done and learn it again. Waiting before the next task of a
    packed job makes "reported" mean "kept". The last task of a job needs no wait: the job
    only ends once the controller has collected every report.
    """
    return ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def _commit_reported(coordinator, task_id: int, reported: list) -> None:
    """Have the coordinator commit `task_id` now, from its registered checkpoint, instead of
    when the packed job ends: a driver killed meanwhile (the job dies with it) then loses
    only the task in progress, and `cldist resume` keeps the others. Best effort: the driver
    commits every task of the job when it ends, whatever happened here."""
    entry = next((e for e in reversed(reported) if e.metrics.get("task_id") == task_id), None)
    if entry is None:
        return
    try:
        ray.get(coordinator.commit_reported.remote(
            task_id, entry.checkpoint, json.loads(entry.metrics["meta_json"])))
    except Exception as e:  # noqa: BLE001 - the job-end commit still follows
        logger.warning("task %d: early commit failed (%s: %s); it is committed when its job "
                       "ends", task_id, type(e).__name__, e)


class FailureReporter(ray.train.UserCallback):
    """Runs in a job's Train controller: tells the coordinator when the job's workers fail
    (an exception, a killed process, a lost node), so the driver can say what was retried."""

    def __init__(self, coordinator: str, namespace: str, job: str):
        self.coordinator, self.namespace, self.job = coordinator, namespace, job

    def after_exception(self, run_context, worker_exceptions) -> None:
        errors = {int(rank): f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                  for rank, e in worker_exceptions.items()}
        actor = ray.get_actor(self.coordinator, namespace=self.namespace)
        actor.post_event.remote({"kind": "failure", "job": self.job, "errors": errors})


def _tasks_reported_before(checkpoint, group: list[int]) -> set[int]:
    """Tasks of `group` an earlier attempt already reported: the group is learnt in order, so
    every task up to the one in the latest checkpoint."""
    if checkpoint is None:
        return set()
    with checkpoint.as_directory() as d:
        last = int(json.loads((Path(d) / "meta.json").read_text())["task_id"])
    return set(group[: group.index(last) + 1])


EVALUATOR_ATTEMPTS = 3  # tries of one scoring request, each with lost evaluators replaced


class RayRunner:
    name = "ray"
    coordinator: CoordinatorProxy

    def __init__(self, cfg: RunConfig, run_dir: str | Path, progress=None, job_slots=None):
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir).resolve(), progress
        # a sweep's runs share one bound on their jobs (cldist.sweep): a semaphore that each
        # job holds while it trains; None = this run's own concurrency only
        self.job_slots = job_slots if job_slots is not None else contextlib.nullcontext()
        self.info = connect(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.num_gpus)
        self.namespace = ray.get_runtime_context().namespace
        self.coordinator_name = f"cldist-coordinator-{uuid.uuid4().hex[:8]}"
        # the coordinator writes state.json into the run directory: keep it on the driver's
        # node (where the run directory is), which also outlives any worker node
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._coordinator = CoordinatorActor.options(
            name=self.coordinator_name, namespace=self.namespace,
            scheduling_strategy=here).remote(
                str(self.run_dir), float(cfg.cluster.svd_task_cpus),
                max(1, int(self.info["cpus"])), int(cfg.cluster.svd_inline_max_flops))
        self.coordinator = CoordinatorProxy(self._coordinator)
        self._evaluators: list | None = None
        self.job_nodes: dict[int, str] = {}
        self.attempts: dict[str, int] = {}  # worker-group starts per job name
        self.failures: dict[str, list] = {}  # worker failures per job name (FailureReporter)
        self._events_lock = threading.Lock()
        self._slot_starts: list[int] = []  # job slots: tasks claimed / committed, not yet
        self._slot_commits: list[tuple[int, dict]] = []  # handed to the stream

    # -- training --------------------------------------------------------------------------
    def _concurrency(self) -> int:
        if self.cfg.trainer.max_concurrent_tasks:
            return int(self.cfg.trainer.max_concurrent_tasks)
        per_job = self.cfg.trainer.num_workers * self.cfg.trainer.cpus_per_worker
        n = int(self.info["cpus"] // max(per_job, 1e-9))
        if self.cfg.trainer.use_gpu:
            n = min(n, int(self.info["gpus"] // self.cfg.trainer.num_workers))
        return max(1, n)

    def _run_job(self, group: list[TaskJob]) -> list[dict]:
        """Learn `group` (independent tasks) in one Ray Train job; each task's meta, in order."""
        config = {"jobs": [{"run_dir": str(self.run_dir), "config": j.config, "task_id": j.task_id}
                           for j in group],
                  "coordinator": self.coordinator_name, "namespace": self.namespace,
                  "epoch_hooks": WORKER_EPOCH_HOOKS}
        ids = [j.task_id for j in group]
        name = f"task-{ids[0]:03d}" + (f"-{ids[-1]:03d}" if len(ids) > 1 else "") + \
            f"-{uuid.uuid4().hex[:6]}"
        config["job_name"] = name
        with self.job_slots:
            result = run_train_job(task_worker, config, num_workers=self.cfg.trainer.num_workers,
                                   use_gpu=self.cfg.trainer.use_gpu,
                                   storage_path=str(self.run_dir / "ray_train"),
                                   name=name,
                                   cpus_per_worker=self.cfg.trainer.cpus_per_worker,
                                   max_failures=self.cfg.trainer.max_failures,
                                   callbacks=(FailureReporter(self.coordinator_name, self.namespace,
                                                              name),),
                                   poll_interval_s=self.cfg.trainer.poll_interval_s,
                                   gpus_per_worker=gpu_shares(self.cfg)[0])
        metas: dict[int, dict] = {}
        for metrics, checkpoint_dir in result.reports:
            meta = json.loads(metrics["meta_json"])
            meta["staging_dir"] = checkpoint_dir
            metas[int(meta["task_id"])] = meta  # a retried task's later report wins
        missing = [t for t in ids if t not in metas]
        if missing:
            raise RuntimeError(f"tasks {missing}: the training job {name!r} reported no checkpoint")
        self._print_events()
        attempts = self.attempts.pop(name, 1)
        failures = self.failures.pop(name, [])
        retries = max(attempts - 1, len(failures))
        if retries and self.progress is not None:
            what = "; ".join(f"rank {r}: {e}" for f in failures for r, e in f.items()) or \
                "its workers were lost"
            self.progress.message(f"[retry] job {name} (tasks {ids}) was restarted {retries}x "
                                  f"({what}); tasks it had reported were kept")
        for t in ids:
            metas[t]["job_attempts"] = 1 + retries
        return [metas[t] for t in ids]

    def _groups(self, ready: list[int], free_slots: int) -> list[list[int]]:
        """Pack ready tasks into at most `free_slots` jobs of at most `tasks_per_job` tasks,
        spreading them evenly so no slot idles while another job holds a long queue."""
        if not ready or free_slots < 1:
            return []
        size = min(int(self.cfg.trainer.tasks_per_job), -(-len(ready) // free_slots))
        groups = [ready[i:i + size] for i in range(0, len(ready), size)]
        return groups[:free_slots]

    def run_tasks(self, jobs: dict[int, TaskJob], deps: dict[int, list[int]],
                  on_done: OnTaskDone, started: OnTaskStarted | None = None) -> None:
        if self.cfg.trainer.tasks_per_job == "auto":
            return self._run_slots(jobs, deps, on_done, started)
        pending = sorted(jobs)
        done = done_before(jobs, deps)
        running: dict[Future, list[int]] = {}
        slots = self._concurrency()
        with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="cldist-task") as pool:
            while pending or running:
                # ready tasks depend only on finished ones, so they are independent of each other
                for group in self._groups(ready_order(pending, deps, done), slots - len(running)):
                    for t in group:
                        pending.remove(t)
                        if started:
                            started(t)
                    running[pool.submit(self._run_job, [jobs[t] for t in group])] = group
                if not running:
                    raise RuntimeError(f"task graph is stuck: pending {pending}, done {sorted(done)}")
                finished, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
                self._print_events()
                for fut in finished:
                    running.pop(fut)
                    metas = fut.result()  # a failed job (after its retries) stops the stream
                    self._print_events()
                    for meta in metas:
                        self.job_nodes[int(meta["task_id"])] = meta.get("node_id", "")
                    on_done([(int(meta["task_id"]), meta) for meta in metas])
                    done.update(int(meta["task_id"]) for meta in metas)

    # -- job slots (trainer.tasks_per_job=auto) ---------------------------------------------
    def _run_slots(self, jobs: dict[int, TaskJob], deps: dict[int, list[int]],
                   on_done: OnTaskDone, started: OnTaskStarted | None) -> None:
        """Up to `_concurrency()` long-lived job slots pull ready tasks from the coordinator's
        queue (cldist.runners.slots) until none is ready; each slot commits every task it
        learns, and the driver hands each commit to `on_done` as soon as it sees it (tasks
        seen together, together). A slot is started only for a ready task no running slot will
        take: a chain runs in one slot, PEARL's independent tasks in as many as fit."""
        ray.get(self._coordinator.open_queue.remote(
            sorted(jobs), {t: list(deps[t]) for t in jobs}, sorted(done_before(jobs, deps))))
        config = {"run_dir": str(self.run_dir), "config": next(iter(jobs.values())).config,
                  "coordinator": self.coordinator_name, "namespace": self.namespace,
                  "epoch_hooks": WORKER_EPOCH_HOOKS}
        limit = self._concurrency()
        running: dict[Future, str] = {}
        delivered: set[int] = set()
        with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="cldist-slot") as pool:
            try:
                while True:
                    status = ray.get(self._coordinator.queue_status.remote())
                    self._deliver(on_done, started, delivered)
                    if not status["left"] and not running:
                        break
                    # running slots that hold no task are starting up (they will claim one)
                    idle = len(running) - status["holding"]
                    for _ in range(min(limit - len(running), status["ready"] - idle)):
                        name = f"slot-{uuid.uuid4().hex[:8]}"
                        running[pool.submit(self._run_slot, config, name)] = name
                    if not running:
                        raise RuntimeError(f"task graph is stuck: {status}")
                    finished, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        running.pop(fut)
                        fut.result()  # a slot that failed (after its retries) stops the stream
            except BaseException:
                # hand out nothing more: the other slots end after the task they hold
                try:
                    ray.get(self._coordinator.close_queue.remote())
                except Exception:  # noqa: BLE001 - the failure itself is the news
                    pass
                raise
        self._deliver(on_done, started, delivered)
        missing = sorted(set(jobs) - delivered)
        if missing:
            raise RuntimeError(f"tasks {missing}: no job slot committed them")

    def _run_slot(self, config: dict, name: str) -> None:
        """One job slot as a Ray Train job, until the queue has no ready task for it."""
        try:
            with self.job_slots:
                result = run_train_job(
                    slot_worker, {**config, "job_name": name},
                    num_workers=self.cfg.trainer.num_workers, use_gpu=self.cfg.trainer.use_gpu,
                    storage_path=str(self.run_dir / "ray_train"), name=name,
                    cpus_per_worker=self.cfg.trainer.cpus_per_worker,
                    max_failures=self.cfg.trainer.max_failures,
                    callbacks=(FailureReporter(self.coordinator_name, self.namespace, name),),
                    poll_interval_s=self.cfg.trainer.poll_interval_s,
                    gpus_per_worker=gpu_shares(self.cfg)[0])
        finally:  # a slot that failed for good: its task is ready again
            ray.get(self._coordinator.release_slot.remote(name))
        # every report of a finished slot was committed as a copy: drop the originals, as the
        # driver's commit does for the other jobs' reports
        for metrics, checkpoint_dir in result.reports:
            if RunDir(self.run_dir).has_task(int(metrics["task_id"])):
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
        self._print_events()
        retries = max(self.attempts.pop(name, 1) - 1, len(self.failures.get(name, [])))
        failures = self.failures.pop(name, [])
        if retries and self.progress is not None:
            what = "; ".join(f"rank {r}: {e}" for f in failures for r, e in f.items()) or \
                "its workers were lost"
            self.progress.message(f"[retry] job slot {name} was restarted {retries}x ({what}); "
                                  f"the tasks it had committed were kept")

    def _deliver(self, on_done: OnTaskDone, started: OnTaskStarted | None,
                 delivered: set[int]) -> None:
        """Hand the slots' claims to `started` and their commits to `on_done`."""
        self._print_events()
        with self._events_lock:
            starts, commits = self._slot_starts, self._slot_commits
            self._slot_starts, self._slot_commits = [], []
        for t in starts:
            if started:
                started(t)
        if not commits:
            return
        finished = sorted((int(t), meta) for t, meta in commits)
        for t, meta in finished:
            self.job_nodes[t] = meta.get("node_id", "")
            delivered.add(t)
        on_done(finished)  # no staging_dir: each slot committed its tasks itself

    def _print_events(self) -> None:
        with self._events_lock:  # job threads and the scheduler both drain
            for e in self.coordinator.drain_events():
                if e.get("kind") == "attempt":
                    self.attempts[e["job"]] = self.attempts.get(e["job"], 0) + 1
                elif e.get("kind") == "failure":
                    self.failures.setdefault(e["job"], []).append(e["errors"])
                elif e.get("kind") == "started":
                    self._slot_starts.append(e["task"])
                elif e.get("kind") == "committed":
                    self._slot_commits.append((e["task"], e["meta"]))
                elif self.progress is not None:
                    self.progress.epoch(e["task"], e["phase"], e["epoch"] + 1, e["n_epochs"],
                                        e["loss"], e["lr"])

    # -- evaluation ------------------------------------------------------------------------
    @property
    def evaluators(self) -> list:
        if self._evaluators is None:
            n = max(1, int(self.cfg.cluster.eval_actors))
            self._evaluators = [self._new_evaluator() for _ in range(n)]
        return self._evaluators

    def _new_evaluator(self):
        eval_gpus = gpu_shares(self.cfg)[1]
        return EvaluatorActor.options(num_gpus=eval_gpus).remote(
            self.cfg.to_dict(), str(self.run_dir), on_gpu=eval_gpus > 0)

    def _on_evaluators(self, calls: dict[int, tuple[str, tuple]]) -> dict[int, object]:
        """Run `calls` ({actor index: (method, args)}) and wait for all of them.

        Evaluators hold only caches, so one that is lost - killed, or on a node that left -
        is replaced by a fresh actor and its call repeated (Ray's own restart covers a dead
        process, not an actor that is unreachable while its node is being declared dead)."""
        results: dict[int, object] = {}
        for attempt in range(EVALUATOR_ATTEMPTS):
            refs = {k: getattr(self.evaluators[k], method).remote(*args)
                    for k, (method, args) in calls.items() if k not in results}
            lost = []
            for k, ref in refs.items():
                try:
                    results[k] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    lost.append((k, e))
            if not lost:
                return results
            for k, e in lost:
                if self.progress is not None:
                    self.progress.message(f"[retry] evaluator {k} was lost ({type(e).__name__}); "
                                          f"replaced by a new one (attempt {attempt + 2})")
                ray.kill(self._evaluators[k], no_restart=True)
                self._evaluators[k] = self._new_evaluator()
        raise RuntimeError(f"evaluators {[k for k, _ in lost]} failed {EVALUATOR_ATTEMPTS} times; "
                           f"last error: {lost[-1][1]}")

    def score_blocks(self, pairs: Sequence[tuple[int, int]]) -> list[Block]:
        # shard by sub-network: actor k keeps the adapters of sub-networks i = k mod n
        n = len(self.evaluators)
        shards: dict[int, list] = {}
        for i, j in pairs:
            shards.setdefault(i % n, []).append((i, j))
        parts = self._on_evaluators({k: ("score_blocks", (p,)) for k, p in shards.items()})
        return [b for k in sorted(parts) for b in parts[k]]

    def score_single(self, upto_task: int, tests: Sequence[int]) -> SingleScores:
        # shard the test sets across actors; each scores the same model on its share
        n = len(self.evaluators)
        parts = {k: list(tests)[k::n] for k in range(n)}
        scores = self._on_evaluators({k: ("score_single", (upto_task, p))
                                      for k, p in parts.items() if p})
        out: SingleScores = {}
        for part in scores.values():
            out.update(part)
        return out

    def test_labels(self, j: int):
        k = j % len(self.evaluators)
        return self._on_evaluators({k: ("test_labels", (j,))})[k]

    def reference_features(self, tests: Sequence[int]) -> dict:
        # test set j on actor j mod n, the one that already decoded it for its labels
        n = len(self.evaluators)
        shards: dict[int, list[int]] = {}
        for j in tests:
            shards.setdefault(j % n, []).append(j)
        parts = self._on_evaluators({k: ("reference_features", (p,)) for k, p in shards.items()})
        return {j: f for part in parts.values() for j, f in part.items()}

    def task_statistics(self, tasks: Sequence[int]) -> dict:
        # the driver sits beside the run directory: saved statistics are read here, and only a
        # run made before tasks saved them has evaluators collect them (one pass per task)
        out = {t: saved_task_statistics(self.run_dir, t) for t in tasks}
        missing = [t for t, s in out.items() if s is None]
        n = len(self.evaluators) if missing else 1
        shards: dict[int, list[int]] = {}
        for t in missing:
            shards.setdefault(t % n, []).append(t)
        parts = self._on_evaluators({k: ("task_statistics", (p,)) for k, p in shards.items()})
        for part in parts.values():
            out.update(part)
        return out

    def close(self) -> None:
        """Stop this run's actors (the cluster itself stays up: it may be shared)."""
        for actor in (self._evaluators or []) + [self._coordinator]:
            ray.kill(actor)
        self._evaluators = None
