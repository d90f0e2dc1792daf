"""A 100-task stream through the Ray runner: scheduling at the scale the system is built for.

200 synthetic classes (cldist.data.synthetic, 16 px), 2 per task, PEARL, timm's test ViT: task 0
trains the reference, tasks 1-99 are independent and run as packed Ray Train jobs
(`trainer.tasks_per_job=25`: 4 jobs, two side by side on the 2-CPU session cluster). What is
checked is the system, not accuracy: every task is committed exactly once, every task's
sub-network is scored, the matrix is complete, and the per-task timings are recorded (their
flatness across the stream is measured in docs/BENCHMARKS.md, not asserted here).
"""
from __future__ import annotations

import json

import pytest

N_TASKS = 100
TASKS_PER_JOB = 25


@pytest.mark.slow
def test_hundred_task_stream_through_ray(tmp_path, ray_cluster):
    from cldist.config.compose import compose
    from cldist.data.build import build_dataset
    from cldist.stream import run_stream
    from cldist.data.synthetic import write_synthetic_tree

    tree = write_synthetic_tree(tmp_path / "tree", n_classes=2 * N_TASKS, train_per_class=8,
                                test_per_class=4, size=16)
    data = tmp_path / "data"
    build_dataset("folder", data, root=tree, n_tasks=N_TASKS, seed=0)
    run_dir = tmp_path / "run"
    metrics = run_stream(compose([
        "scenario=digits_5t", f"scenario.manifest={data}", "backbone=test_vit",
        f"run_dir={run_dir}", "runner=ray", f"trainer.tasks_per_job={TASKS_PER_JOB}",
        "method.epochs=1", "method.stage1_epochs=1", "method.reference_epochs=2",
        "trainer.batch_size=16", "report=false"]))

    assert metrics["n_tasks"] == N_TASKS
    assert [len(r) for r in metrics["accuracy_matrix"]] == list(range(1, N_TASKS + 1))
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "finished"
    assert state["completed_tasks"] == list(range(N_TASKS))
    assert sorted(p.name for p in (run_dir / "tasks").iterdir()) == \
        [f"{t:03d}" for t in range(N_TASKS)]
    # the reference job, then the 99 independent tasks packed into jobs of at most 25
    jobs = sorted(p.name for p in (run_dir / "ray_train").iterdir())
    assert len(jobs) == 1 + -(-(N_TASKS - 1) // TASKS_PER_JOB), jobs
    groups = {tuple(m["job_group"]) for m in state["task_meta"].values()}
    assert sorted(t for g in groups for t in g) == list(range(N_TASKS))
    assert all(len(g) <= TASKS_PER_JOB for g in groups)
    assert all(isinstance(s, float) and s > 0 for s in metrics["train_seconds_per_task"])
