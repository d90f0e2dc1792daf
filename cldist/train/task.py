"""Train one task of a stream: the pure function both runners call.

`train_task(setup, ...)` builds the method's model (`setup.new_model`), loads what the task
depends on (earlier tasks' state), runs the method's phases through `cldist.train.loop.fit`,
and - on rank 0 - writes the task's tensors and meta into a staging directory. Committing that
directory into the run directory is the coordinator's job.

Everything it receives is objects and plain values - a `TaskSetup` (cldist.assemble builds it
from a run's config; nothing here reads one) - plus the callables the runner supplies:
`make_engine` (torch AdamW or DeepSpeed), `allocate_ranks` (local SVDs, or the coordinator
actor fanning them out) and `on_epoch` (progress).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..coordinator.run_coordinator import allocate_ranks_locally
from ..coordinator.statistics import STATS_STEM, router_projection, statistics_tensors
from ..data import TaskReader
from ..data.manifest import Manifest
from ..methods.base import ContinualMethod, FitRequest, TaskContext
from ..models.continual import ContinualClassifier
from ..rundir import RunDir
from . import loop
from .engine import TorchStepEngine
from .statistics import collect_task_statistics


@dataclass(frozen=True)
class RunDefaults:
    """The run's shared optimiser keys: what a FitRequest gets for every field its method
    leaves to the run (None). `options` is the method's options by key - a request's `lr_key`
    names the one its learning rate comes from - and `method` names the method in errors."""

    method: str
    optimizer: str
    weight_decay: float
    epochs: int
    options: Mapping[str, Any]


@dataclass
class TaskSetup:
    """Task `task_id` of the run in `run_dir`, as the objects `train_task` needs.

    `new_model()` returns the method's model on the run's backbone with the run's reference
    weights and no task loaded (it is called once, inside the timed set-up);
    `train_transform` augments the training images, `test_transform` is the evaluation one
    the class statistics use (the router scores test images with it)."""

    run_dir: str
    task_id: int
    manifest: Manifest
    method: ContinualMethod
    new_model: Callable[[], ContinualClassifier]
    train_transform: Callable
    test_transform: Callable
    seed: int
    batch_size: int
    eval_batch_size: int
    loader_workers: int
    defaults: RunDefaults
    router_projection_dim: int


def task_seeds(seed: int, task_id: int) -> dict[str, int]:
    """The seeds task `task_id` derives from the run's seed (recorded in RUN/seeds.json)."""
    return {"init": seed, "method_generator": seed * 1_000_003 + task_id * 7919,
            "data_order": seed * 1_000_003 + task_id}


def task_generator(seed: int, task_id: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(task_seeds(seed, task_id)["method_generator"] + salt)


def kernels(device: torch.device) -> str:
    """Which kernels computed a task: the same code, data and seed give bit-identical numbers
    only on the same ones (AVX2 and AVX-512 CPU kernels round differently, and training
    amplifies it). ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA pick older CPU kernels."""
    if device.type == "cuda":
        where = f"cuda {torch.cuda.get_device_name(device)}"
    else:
        where = f"cpu {torch.backends.cpu.get_cpu_capability()}"
        if os.environ.get("ONEDNN_MAX_CPU_ISA"):
            where += f", oneDNN max {os.environ['ONEDNN_MAX_CPU_ISA']}"
    return f"torch {torch.__version__}, {where}"


def with_run_defaults(request: FitRequest, defaults: RunDefaults) -> FitRequest:
    """`request` with the run's shared optimiser keys wherever the method left them to the run
    (None): the optimizer, the weight decay, the learning rate from the options key the
    request names (`lr_key`), and the run's main epochs."""
    changes = {}
    if request.optimizer is None:
        changes["optimizer"] = defaults.optimizer
    if request.weight_decay is None:
        changes["weight_decay"] = float(defaults.weight_decay)
    if request.lr is None:
        if request.lr_key not in defaults.options:
            raise ValueError(f"phase {request.phase!r} names lr_key {request.lr_key!r}, which "
                             f"method {defaults.method} has no key for")
        changes["lr"] = float(defaults.options[request.lr_key])
    if request.epochs is None:
        changes["epochs"] = int(defaults.epochs)
    return dataclasses.replace(request, **changes) if changes else request


def torch_engine(module, params, lr, weight_decay, total_steps, optimizer="adamw"):
    return TorchStepEngine(module, params, lr, weight_decay, total_steps, optimizer)


def train_task(setup: TaskSetup, rank: int = 0, world_size: int = 1,
               make_engine: Callable = torch_engine,
               allocate_ranks: Callable = allocate_ranks_locally,
               on_epoch: Callable | None = None,
               device: torch.device | str = "cpu",
               staging_root: str | Path | None = None,
               reduce_mean: Callable | None = None) -> dict:
    """Learn task `setup.task_id`; returns its meta (and `staging_dir` on rank 0)."""
    start = time.perf_counter()
    started_at = time.time()  # wall clock: when tasks of concurrent runs overlapped
    device = torch.device(device)
    run = RunDir(setup.run_dir)
    manifest, method, t = setup.manifest, setup.method, setup.task_id
    model = setup.new_model()
    for dep in method.state_dependencies(t):
        run.load_task_into(method, model, dep)
    model.to(device)
    setup_seconds = time.perf_counter() - start  # building the model, loading dependencies
    train_tf = setup.train_transform
    bs = setup.batch_size
    # every rank must take the same number of steps (collectives); the sample split gives
    # ranks at most one sample more or less, so the shortest share sets the step count
    def steps_for(share: int) -> int:
        return max(1, -(-share // bs))

    steps = steps_for(manifest.tasks[t].n_train // world_size)
    seen_share = sum(manifest.tasks[s_].n_train for s_ in range(t + 1)) // world_size
    seen_steps = steps_for(seen_share)
    data_seed = task_seeds(setup.seed, t)["data_order"]
    reader = TaskReader(manifest, t, "train", train_tf, shuffle=True, seed=data_seed,
                        rank=rank, world_size=world_size)

    def batches(epoch: int):
        if setup.loader_workers:
            # worker processes decode the next batches while this one steps; each keeps its
            # own slice of the rank's seeded stream (reader.dataset), so every sample is seen once
            it = iter(torch.utils.data.DataLoader(
                reader.dataset(epoch), batch_size=bs, num_workers=setup.loader_workers,
                pin_memory=device.type == "cuda"))
        else:
            it = reader.batches(bs, epoch)
        for i, batch in enumerate(it):
            if i >= steps:
                break
            yield batch

    def seen_batches(epoch: int):
        # tasks 0..t mixed at sample level (in memory: meant for the joint upper bound on
        # benchmark-sized streams), reshuffled every epoch, same step count on every rank
        xs, ys = [], []
        for s_ in range(t + 1):
            for x, y in TaskReader(manifest, s_, "train", train_tf, shuffle=True,
                                   seed=data_seed + s_, rank=rank,
                                   world_size=world_size).batches(bs, epoch):
                xs.append(x)
                ys.append(y)
        x_all, y_all = torch.cat(xs), torch.cat(ys)
        g = torch.Generator().manual_seed(data_seed * 31 + epoch)
        order = torch.randperm(len(y_all), generator=g)
        for i in range(0, min(len(order), seen_share), bs):
            idx = order[i:i + bs]
            yield x_all[idx], y_all[idx]

    def fit(model_, request):
        def report(phase, epoch, n_epochs, loss_value, lr):
            if on_epoch is not None and rank == 0:
                on_epoch(t, phase, epoch, n_epochs, loss_value, lr)
        source, n_steps = (seen_batches, seen_steps) if request.data == "seen" else (batches, steps)
        # the key is named only when the rate came from it (not a method's own float)
        key = f"method.{request.lr_key}" if request.lr is None else None
        request = with_run_defaults(request, setup.defaults)
        return loop.fit(model_, request, source, n_steps, make_engine, device, report, task_id=t,
                        lr_key=key)

    allocation_seconds = [0.0]

    def timed_allocate_ranks(task_vectors, params):
        # measured for docs/BENCHMARKS.md: rank allocation's share of a task's time
        begin = time.perf_counter()
        try:
            return allocate_ranks(task_vectors, params)
        finally:
            allocation_seconds[0] += time.perf_counter() - begin

    ctx = TaskContext(task_id=t, n_tasks=manifest.n_tasks,
                      classes_per_task=[len(x.classes) for x in manifest.tasks],
                      class_offsets=manifest.class_offsets(), fit=fit,
                      allocate_ranks=timed_allocate_ranks, train_batches=batches,
                      generator=task_generator(setup.seed, t), device=device,
                      seen_train_batches=seen_batches,
                      reduce_mean=reduce_mean or distributed_mean(world_size, device),
                      steps_per_epoch=steps)
    meta = method.learn_task(model, ctx)
    stats_tensors = None
    if method.class_statistics:
        begin = time.perf_counter()
        stats = task_statistics(setup, model, device, rank, world_size, ctx.reduce_mean)
        stats_tensors = statistics_tensors(stats)
        meta["statistics_seconds"] = time.perf_counter() - begin
        meta["statistics_dims"] = {group: s.dim for group, s in stats.items()}
    model.to("cpu")
    meta.update({"task_id": t, "classes": list(manifest.tasks[t].classes),
                 "params_added": method.params_added(model, t),
                 "train_seconds": time.perf_counter() - start, "world_size": world_size,
                 "setup_seconds": setup_seconds, "rank_allocation_seconds": allocation_seconds[0],
                 "seed": setup.seed, "data_seed": data_seed, "seeds": task_seeds(setup.seed, t),
                 "kernels": kernels(device), "started_at": started_at,
                 "finished_at": time.time()})
    if rank == 0:
        staging = run.staging_dir(t, root=staging_root)
        # a method that trains its own reference does so on task 0 (PEARL without pre-training)
        tensors = method.task_state(model, t)
        if stats_tensors is not None:  # committed with the task, in the same staged directory
            tensors = {**tensors, STATS_STEM: stats_tensors}
        RunDir.write_task_files(staging, tensors, json_safe(meta),
                                reference=method.reference_state(model) if t == 0 else None)
        meta["staging_dir"] = str(staging)
    return meta


def distributed_mean(world_size: int, device: torch.device) -> Callable:
    """The mean of a tensor over the job's data-parallel ranks: an all-reduce over the
    torch.distributed group the job's workers share (Ray Train's), the identity with one rank.
    Statistics passes (InfLoRA's Gram matrices, the class statistics) use it to see the whole
    task, not this rank's share."""
    import torch.distributed as dist

    if world_size == 1:
        return lambda x: x
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"a task job of {world_size} ranks has no torch.distributed group to "
                           f"reduce statistics over; the runner must pass reduce_mean")

    def mean(x: torch.Tensor) -> torch.Tensor:
        # NCCL reduces device tensors only; gloo reduces float64 on the host as it is
        on = x.to(device) if dist.get_backend() == "nccl" else x.clone()
        dist.all_reduce(on)
        return (on / world_size).to(x.device)

    return mean


def task_statistics(setup: TaskSetup, model, device: torch.device, rank: int, world_size: int,
                    reduce_mean: Callable) -> dict:
    """The finished task's class statistics (cldist.train.statistics) over its whole training
    split: every rank passes its share once, in stream order, with the test-time transform
    (the router scores test images), no shuffling, no augmentation. It runs after learning,
    and the projection comes from its own seeded generator: nothing training draws changes
    (a packed job's next task reseeds in new_model anyway)."""
    manifest, task_id = setup.manifest, setup.task_id
    classes = [manifest.stream_label(c) for c in manifest.tasks[task_id].classes]
    projection = router_projection(setup.router_projection_dim, model.feature_dim, setup.seed)

    def batches():
        return TaskReader(manifest, task_id, "train", setup.test_transform, shuffle=False,
                          rank=rank, world_size=world_size).batches(setup.eval_batch_size)

    return collect_task_statistics(model, setup.method, task_id, classes, batches, device,
                                   projection=projection, reduce_mean=reduce_mean,
                                   world_size=world_size)


def json_safe(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=float))
