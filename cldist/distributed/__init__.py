"""Everything that touches Ray or DeepSpeed (the only package allowed to import them).

* `cluster` - start/join a Ray cluster (`connect`, `shutdown`, `cluster_info`).
* `deepspeed_engine` - `DeepSpeedStepEngine`, the Ray runner's `StepEngine`.
* `train_job` - `run_train_job` (one Ray Train job per task) and the worker-side helpers
  `worker_context`, `broadcast_object`, `report`.

Submodules are imported lazily by their users: importing `cldist.distributed` itself loads
neither Ray nor DeepSpeed.
"""
