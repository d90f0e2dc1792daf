"""The distributed layer: DeepSpeed step engine, Ray cluster connection, Ray Train jobs.

The DeepSpeed tests run in this process without Ray (a one-process gloo group); the job tests
share the session's embedded Ray cluster (2 CPUs, `ray_cluster` in conftest.py).
"""
from __future__ import annotations

import copy
import os
import sys
import threading

import pytest
import torch
from torch import nn

from cldist.train.engine import TorchStepEngine

STEPS = 6


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(seed: int = 1, n: int = STEPS):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n)]


def _train(engine, batches) -> list[float]:
    lrs = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(engine.module(x), y)
        engine.backward_and_step(loss)
        lrs.append(engine.lr())
    engine.finish()
    return lrs


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------ DeepSpeed, no Ray

@pytest.mark.parametrize("zero_stage,optimizer", [(0, "adamw"), (2, "adamw"), (3, "adamw"),
                                                   (0, "sgd"), (2, "sgd")])
def test_deepspeed_engine_matches_torch_engine(zero_stage, optimizer):
    from cldist.distributed.deepspeed_engine import DeepSpeedStepEngine

    reference, model = _tiny_model(), _tiny_model()
    reference_lrs = _train(TorchStepEngine(reference, reference.parameters(), lr=1e-2,
                                           weight_decay=0.05, total_steps=STEPS,
                                           optimizer=optimizer), _batches())
    lrs = _train(DeepSpeedStepEngine(model, model.parameters(), lr=1e-2, weight_decay=0.05,
                                     total_steps=STEPS, zero_stage=zero_stage,
                                     optimizer=optimizer), _batches())
    assert lrs == pytest.approx(reference_lrs, abs=1e-12)
    assert _max_diff(model, reference) < 1e-6


def test_sgd_engine_steps_in_proportion_to_the_gradient():
    """`optimizer="sgd"` is SGD with momentum 0.9: the first step is -lr * grad exactly (AdamW's
    would be about -lr * sign(grad)), and unknown names are refused with the choices."""
    from cldist.train.engine import make_optimizer

    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    engine = TorchStepEngine(model, model.parameters(), lr=0.1, weight_decay=0.0,
                             total_steps=STEPS, optimizer="sgd")
    (x, y), = _batches(n=1)
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    engine.backward_and_step(nn.functional.cross_entropy(model(x), y))
    for p, p0, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g)
    assert engine.optimizer.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="adamw, sgd"):
        make_optimizer("lion", list(model.parameters()), 1e-3, 0.0)


def test_zero3_finish_leaves_full_plain_weights_and_a_second_phase_works():
    from cldist.distributed.deepspeed_engine import DeepSpeedStepEngine

    reference, model = _tiny_model(), _tiny_model()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    _train(TorchStepEngine(reference, reference.parameters(), 1e-2, 0.0, STEPS), _batches())
    engine = DeepSpeedStepEngine(model, model.parameters(), 1e-2, 0.0, STEPS, zero_stage=3)
    _train(engine, _batches())

    assert engine.module is model
    for name, p in model.named_parameters():
        assert p.shape == shapes[name] and p.numel() == shapes[name].numel(), name
        assert not [a for a in vars(p) if a.startswith("ds_")], f"{name} keeps ZeRO attributes"
    assert all(type(m._parameters) is dict for m in model.modules())
    assert _max_diff(model, reference) < 1e-6
    # A plain forward needs no DeepSpeed hooks any more.
    assert model(torch.randn(2, 8)).shape == (2, 3)

    # Phase 2 on the same model: another trainable set, a fresh engine.
    for module in (model, reference):
        module[0].requires_grad_(False)
    reference_2 = copy.deepcopy(reference)
    _train(TorchStepEngine(reference_2, reference_2.parameters(), 1e-2, 0.0, STEPS),
           _batches(seed=2))
    _train(DeepSpeedStepEngine(model, model.parameters(), 1e-2, 0.0, STEPS, zero_stage=3),
           _batches(seed=2))
    assert _max_diff(model, reference_2) < 1e-6
    assert torch.equal(model[0].weight, reference[0].weight)  # the frozen layer did not move


def test_deepspeed_engine_rejects_an_empty_trainable_set():
    from cldist.distributed.deepspeed_engine import DeepSpeedStepEngine

    model = _tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        DeepSpeedStepEngine(model, model.parameters(), 1e-2, 0.0, STEPS)


# ------------------------------------------------------------------ cluster

def test_connect_is_idempotent_and_reports_resources(ray_cluster):
    from cldist.distributed.cluster import connect

    info = connect(num_cpus=2)
    assert info == ray_cluster
    assert info["cpus"] == 2 and info["nodes"] == 1
    assert info["address"].startswith("127.0.0.1:")
    assert info["auth"] == "token"


def test_connect_names_an_unreachable_address():
    from cldist.distributed.cluster import ClusterConnectionError, _check_reachable

    with pytest.raises(ClusterConnectionError, match="127.0.0.1:1"):
        _check_reachable("127.0.0.1:1", "127.0.0.1", 1, timeout_s=2)


# ------------------------------------------------------------------ Ray Train jobs

def _zero2_worker(config):
    """Two ranks, different data, ZeRO-2: weights must agree across ranks afterwards."""
    import torch.distributed as dist

    from cldist.distributed.deepspeed_engine import DeepSpeedStepEngine
    from cldist.distributed.train_job import broadcast_object, report, worker_context

    rank, world_size, device = worker_context()
    seed = broadcast_object(config["seed"] if rank == 0 else None)
    model = _tiny_model()
    engine = DeepSpeedStepEngine(model, model.parameters(), lr=1e-2, weight_decay=0.0,
                                 total_steps=config["steps"], zero_stage=config["zero_stage"],
                                 micro_batch_size=4)
    losses = []
    for x, y in _batches(seed=seed + rank, n=config["steps"]):
        loss = nn.functional.cross_entropy(engine.module(x.to(device)), y.to(device))
        engine.backward_and_step(loss)
        losses.append(loss.item())
    engine.finish()
    rank0_state = broadcast_object({k: v.clone() for k, v in model.state_dict().items()})
    spread = torch.tensor(max((v - rank0_state[k]).abs().max().item()
                              for k, v in model.state_dict().items()))
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    report({"first_loss": losses[0], "last_loss": losses[-1], "world_size": world_size,
            "rank_weight_spread": spread.item()},
           tensors={"model": model.state_dict()}, json_files={"meta": {"seed": seed}})


def _small_worker(config):
    from cldist.distributed.train_job import POLL_INTERVAL_ENV, report

    # Ray Train passes the poll interval from the driver to the controller and the workers
    report({"job": config["job"], "poll_interval": os.environ.get(POLL_INTERVAL_ENV)},
           tensors={"head": {"w": torch.full((2,), config["job"])}})


@pytest.fixture(scope="module")
def ship_this_module():
    from cldist.distributed.train_job import ship_module_by_value

    # Workers import train functions by module name; this file may not be importable there.
    ship_module_by_value(sys.modules[__name__])


def test_zero2_job_with_two_workers_returns_metrics_and_a_checkpoint(ray_cluster,
                                                                      ship_this_module,
                                                                      tmp_path):
    from safetensors.torch import load_file

    from cldist.distributed.train_job import run_train_job

    result = run_train_job(_zero2_worker, {"seed": 7, "steps": 4, "zero_stage": 2},
                           num_workers=2, use_gpu=False, storage_path=str(tmp_path),
                           name="zero2")
    assert result.metrics["world_size"] == 2
    assert result.metrics["rank_weight_spread"] < 1e-6
    assert torch.isfinite(torch.tensor(result.metrics["last_loss"]))
    assert result.checkpoint_dir and result.checkpoint_dir.startswith(str(tmp_path / "zero2"))
    files = sorted(os.listdir(result.checkpoint_dir))
    assert "model.safetensors" in files and "meta.json" in files
    state = load_file(os.path.join(result.checkpoint_dir, "model.safetensors"))
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert state["0.weight"].shape == (16, 8)


def test_two_jobs_from_two_threads_both_complete(ray_cluster, ship_this_module, tmp_path):
    from cldist.distributed.train_job import run_train_job

    results, errors = {}, []

    def launch(job: int) -> None:
        try:
            results[job] = run_train_job(_small_worker, {"job": job}, num_workers=1,
                                         use_gpu=False, storage_path=str(tmp_path),
                                         name=f"task-{job}", poll_interval_s=0.25)
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=launch, args=(job,)) for job in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert sorted(results) == [1, 2]
    for job, result in results.items():
        assert result.metrics == {"job": job, "poll_interval": "0.25"}
        assert os.path.isfile(os.path.join(result.checkpoint_dir, "head.safetensors"))
    assert results[1].checkpoint_dir != results[2].checkpoint_dir


def test_job_larger_than_the_cluster_fails_fast(ray_cluster, tmp_path):
    from cldist.distributed.train_job import run_train_job
    from cldist.errors import UserError

    with pytest.raises(UserError, match="can never be scheduled"):
        run_train_job(_small_worker, {"job": 0}, num_workers=3, use_gpu=False,
                      storage_path=str(tmp_path), name="too-big")


def test_worker_helpers_outside_a_worker_are_single_process():
    from cldist.distributed.train_job import broadcast_object, worker_context

    rank, world_size, device = worker_context()
    assert (rank, world_size, device.type) == (0, 1, "cpu")
    assert broadcast_object({"a": 1}) == {"a": 1}


def test_a_user_error_in_a_worker_reaches_the_driver_as_itself():
    """Bad data or a NaN loss inside a Train worker must surface as the user's one-line
    message (exit 2), not as Ray Train's wrapper with a traceback."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    from cldist.distributed.train_job import _user_error_in
    from cldist.errors import UserError
    original = UserError("task 1, phase stage2: the loss became nan at step 2")
    wrapped = WorkerGroupError("Training failed", {0: RuntimeError("rank 0"), 1: original})
    assert _user_error_in(wrapped) is original
    try:
        raise RuntimeError("outer") from wrapped
    except RuntimeError as chained:
        assert _user_error_in(chained) is original
    assert _user_error_in(WorkerGroupError("x", {0: RuntimeError("segfault")})) is None
