"""One task's training as a Ray Train job, and the helpers its workers call.

Driver side: `run_train_job` runs `train_fn(config)` on `num_workers` Ray Train workers
(a `TorchTrainer`; torch.distributed is set up with gloo on CPU, nccl on GPU) and returns the
metrics and checkpoint directory of the last `report()`. It is thread-safe: each call has its
own Train controller actor, so independent tasks can train side by side from driver threads,
bounded by the cluster's free resources (a job waits for its workers' placement group).

Worker side: `worker_context()`, `broadcast_object()` and `report()`.

Ray Train V2 semantics this relies on (Ray 2.60; see docs/notes-distributed.md):
* `Result.metrics` are the rank-0 metrics of the latest *checkpointed* report; a report
  without a checkpoint never reaches the driver. `report()` therefore always attaches one.
* Every worker must call `ray.train.report` the same number of times (it is a barrier);
  only rank 0 writes the checkpoint files here.
* The checkpoint is copied to `STORAGE/NAME/checkpoint_<timestamp>/` (a local path for a
  local `storage_path`).
* A run directory `STORAGE/NAME` that already holds a run is *resumed*: its checkpoints are
  visible through `ray.train.get_checkpoint()`. Give each job a fresh `name`.
"""
from __future__ import annotations

import json
import os
import tempfile
import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from cldist.errors import UserError

POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@dataclass(frozen=True)
class JobResult:
    """What a finished job hands back to the driver."""

    metrics: dict  # rank 0's metrics from the last report()
    checkpoint_dir: str | None  # directory holding that report's files (None: nothing reported)
    # every checkpointed report of the job, in report order: (rank 0's metrics, directory)
    reports: tuple[tuple[dict, str], ...] = ()


class TrainJobError(RuntimeError):
    """A Ray Train job failed (after its retries); the message names the job and its storage."""


def run_train_job(train_fn: Callable[[dict], Any], config: dict, num_workers: int,
                  use_gpu: bool, storage_path: str, name: str, cpus_per_worker: float = 1,
                  max_failures: int = 0, callbacks: tuple = (),
                  poll_interval_s: float | None = None,
                  gpus_per_worker: float = 1.0) -> JobResult:
    """Run `train_fn(config)` on `num_workers` Ray Train workers and wait for it.

    `train_fn` must be importable or picklable (a module-level function) and end with
    `report(...)` on every worker. Starts the embedded Ray cluster when Ray is not connected.
    `callbacks` are `ray.train.UserCallback`s; they run in the job's controller actor.
    `poll_interval_s` sets how often the controller polls the workers (None: Ray's default or
    the RAY_TRAIN_HEALTH_CHECK_INTERVAL_S already set); a report is registered, and the job
    seen to end, only at a poll. With `use_gpu`, each worker reserves `gpus_per_worker` of one
    GPU (below 1 leaves room for evaluator actors on the same GPU).
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cldist.distributed.cluster import connect

    if num_workers < 1:
        raise ValueError(f"run_train_job({name!r}): num_workers={num_workers}; need at least 1")
    if not ray.is_initialized():
        connect()
    _check_fits(name, num_workers, cpus_per_worker, use_gpu)
    storage = storage_path if "://" in storage_path else os.path.abspath(storage_path)
    if poll_interval_s is not None:
        # Ray Train hands this variable from the driver to the controller it starts in fit()
        os.environ[POLL_INTERVAL_ENV] = str(float(poll_interval_s))

    trainer = TorchTrainer(
        train_fn,
        train_loop_config=dict(config),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker,
                                                           **({"GPU": gpus_per_worker}
                                                              if use_gpu else {})}),
        run_config=RunConfig(storage_path=storage, name=name,
                             failure_config=FailureConfig(max_failures=max_failures),
                             callbacks=list(callbacks)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError (WorkerGroupError / ControllerError)
        user_error = _user_error_in(e)
        if user_error is not None:  # bad data, NaN loss, ...: the user's message, not a trace
            raise user_error from None
        raise TrainJobError(
            f"train job {name!r} failed (storage {os.path.join(storage, name)}, "
            f"{num_workers} worker(s), max_failures={max_failures}): {e}") from e
    checkpoint = result.checkpoint
    # CheckpointConfig keeps every checkpoint by default; the list spans retried attempts
    reports = tuple((dict(m or {}), c.path) for c, m in (result.best_checkpoints or []))
    return JobResult(metrics=dict(result.metrics or {}),
                     checkpoint_dir=checkpoint.path if checkpoint is not None else None,
                     reports=reports)


def _user_error_in(error: BaseException) -> UserError | None:
    """The UserError a worker raised, if that is what failed the job.

    Ray Train wraps worker exceptions (WorkerGroupError.worker_failures, a RayTaskError that
    is also an instance of the original class, __cause__ chains); walk all of them."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            cause = getattr(e, "cause", None)  # RayTaskError keeps the original here
            return cause if isinstance(cause, UserError) else e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo += list(getattr(e, "worker_failures", {}).values())
    return None


def _check_fits(name: str, num_workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    # A job larger than the whole cluster would wait for its placement group forever
    # (Train V2 retries worker-group start-up timeouts without limit).
    import ray

    total = ray.cluster_resources()
    need_cpus = num_workers * cpus_per_worker
    problems = []
    if need_cpus > total.get("CPU", 0.0) + 1e-9:
        problems.append(f"{need_cpus:g} CPUs ({num_workers} workers x {cpus_per_worker:g}) "
                        f"but the cluster has {total.get('CPU', 0.0):g}")
    if use_gpu and num_workers > total.get("GPU", 0.0) + 1e-9:
        problems.append(f"{num_workers} GPUs but the cluster has {total.get('GPU', 0.0):g}")
    if problems:
        raise UserError(f"train job {name!r} can never be scheduled: it needs "
                        + "; ".join(problems)
                        + ". Lower num_workers / cpus_per_worker (or use_gpu), or add nodes.")


def ship_module_by_value(module: types.ModuleType) -> None:
    """Send `module`'s functions to Ray workers by value instead of by import path.

    Workers import a `train_fn` by its module name, and they only see the driver's working
    directory and script directory on `sys.path` (plus installed packages). A module they
    cannot import - typically a pytest test file under a `tests/` without `__init__.py` -
    must be shipped by value: call this once before `run_train_job`.
    """
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(module)


# ---------------------------------------------------------------- inside a worker

def worker_context() -> tuple[int, int, torch.device]:
    """(world rank, world size, device) of this worker.

    In a Ray Train worker: Ray Train's view. Elsewhere: the torch.distributed group if one
    exists, else (0, 1, cpu or cuda) - so the same training code runs inline.
    """
    try:
        import ray.train
        context = ray.train.get_context()
        rank, world_size = context.get_world_rank(), context.get_world_size()
        import ray.train.torch
        return rank, world_size, ray.train.torch.get_device()
    except (RuntimeError, ValueError, AttributeError):
        pass  # not inside a Ray Train worker
    import torch.distributed as dist
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (pickled over torch.distributed; only for
    in-job messages between trusted workers, never for files). No group: returns `obj`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    device = None
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    dist.broadcast_object_list(box, src=src, device=device)
    return box[0]


def report(metrics: Mapping[str, Any],
           tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
           json_files: Mapping[str, Any] | None = None) -> None:
    """End a job: report `metrics` with a checkpoint of safetensors (and JSON) files.

    Call on every worker (Ray Train's report is a barrier). Rank 0 writes
    `<name>.safetensors` for each entry of `tensors` and `<name>.json` for each entry of
    `json_files` into a temporary directory that Ray Train copies into the run's storage;
    the other ranks report the same metrics without files. Only rank 0's metrics reach
    the driver.
    """
    import ray.train
    from safetensors.torch import save_file

    metrics = {str(k): _plain(v) for k, v in metrics.items()}
    rank = ray.train.get_context().get_world_rank()
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="cldist-ckpt-") as tmp:
        for file_name, state in (tensors or {}).items():
            # safetensors refuses shared or non-contiguous storage; store plain CPU copies.
            plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
            save_file(plain, os.path.join(tmp, f"{file_name}.safetensors"))
        for file_name, payload in (json_files or {}).items():
            with open(os.path.join(tmp, f"{file_name}.json"), "w") as f:
                json.dump(payload, f, indent=1, sort_keys=True)
        if not os.listdir(tmp):
            # An empty checkpoint still carries the metrics to the driver.
            with open(os.path.join(tmp, "metrics.json"), "w") as f:
                json.dump(metrics, f, sort_keys=True)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _plain(value: Any) -> Any:
    # Metrics travel to the driver and into Ray's JSON snapshot: no tensors.
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value
