"""The coordinator actor: SVD fan-out under concurrency, and the run state it owns."""
from __future__ import annotations

import threading

import pytest
import torch

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("inline_max", [0, None], ids=["fanned-out", "inline"])
def test_concurrent_rank_requests_do_not_deadlock(tmp_path, ray_cluster, inline_max):
    import ray

    from cldist.config.schema import ClusterConfig
    from cldist.distributed.actors import CoordinatorActor, CoordinatorProxy

    # 2 SVDs in flight at most; inline_max=0 sends even these small layers to Ray tasks
    actor = CoordinatorActor.remote(str(tmp_path), 0.0, 2,
                                    ClusterConfig.svd_inline_max_flops if inline_max is None
                                    else inline_max)
    proxy = CoordinatorProxy(actor)
    torch.manual_seed(0)
    vectors = {f"layer{i}": (torch.randn(24, 16), torch.randn(24, 16)) for i in range(6)}
    params = {"rule": "fixed", "rule_params": {"t_max": 0.9}, "min_rank": 1, "max_rank": None}
    results: dict = {}

    def ask(key):
        results[key] = proxy.allocate_ranks(vectors, params)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "rank requests deadlocked"
    from cldist.coordinator.run_coordinator import allocate_ranks_locally
    local = allocate_ranks_locally(vectors, params)
    for k in range(3):
        assert {n: d["rank"] for n, d in results[k].items()} == {n: d["rank"] for n, d in local.items()}
    ray.kill(actor)


def test_a_reported_task_is_committed_as_a_copy_once(tmp_path, ray_cluster):
    """A packed job's rank 0 has each reported task committed from its Ray Train checkpoint
    while the job runs: the checkpoint stays intact (a retry of the job resumes from it), and
    the driver's commit when the job ends finds the task done and only drops its files."""
    import json

    import ray
    import ray.train

    from cldist.distributed.actors import CoordinatorActor, CoordinatorProxy

    run_dir = tmp_path / "run"
    checkpoint_dir = tmp_path / "ray_train" / "checkpoint_000001"
    checkpoint_dir.mkdir(parents=True)
    files = {"adapter.safetensors": b"tensors", "meta.json": json.dumps({"task_id": 1}).encode()}
    for name, data in files.items():
        (checkpoint_dir / name).write_bytes(data)
    meta = {"task_id": 1, "params_added": 7}
    actor = CoordinatorActor.remote(str(run_dir))
    proxy = CoordinatorProxy(actor)
    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir))

    assert ray.get(actor.commit_reported.remote(1, checkpoint, meta)) is True
    final = run_dir / "tasks" / "001"
    assert {p.name: p.read_bytes() for p in final.iterdir()} == files
    assert {p.name: p.read_bytes() for p in checkpoint_dir.iterdir()} == files  # kept for retries
    state = proxy.snapshot()
    assert state["completed_tasks"] == [1] and state["params_per_task"] == {"1": 7}

    assert ray.get(actor.commit_reported.remote(1, checkpoint, meta)) is False  # a retry's report
    proxy.commit(1, str(checkpoint_dir), {**meta, "staging_dir": str(checkpoint_dir)})  # job end
    assert not checkpoint_dir.exists()
    assert {p.name: p.read_bytes() for p in final.iterdir()} == files
    assert sorted(p.name for p in (run_dir / "tasks").iterdir()) == ["001"]  # no staging left
    assert proxy.snapshot()["completed_tasks"] == [1]
    ray.kill(actor)
