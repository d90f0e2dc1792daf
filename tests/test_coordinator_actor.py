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
