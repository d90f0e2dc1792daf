"""Fault injection: a stream survives (a) a killed training worker, (b) a killed evaluator
actor, (c) a killed driver followed by `cldist resume`, (d) a node leaving a 2-node cluster,
(e) a driver killed while a packed Ray Train job runs, followed by `cldist resume`.

Each run must end with every task committed exactly once and the same accuracy matrix as an
uninterrupted run: bit-identical for (c) (inline runner, CPU), and within MATRIX_TOL
percentage points for the Ray runs, which train with a DeepSpeed engine instead of torch's
AdamW (tests/system/test_stream.py measures that difference without faults; 60 test images per task,
1.67 pp each).

The stream is PEARL on the first three digits tasks: task 0 trains the reference, tasks 1 and
2 are independent and, with `trainer.tasks_per_job=2`, one Ray Train job learns both.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import faults
from tests.conftest import first_tasks, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
MATRIX_TOL = 3.4  # two test images
N_TASKS = 3
# long enough for the reference (task 0) to learn its classes, so the matrices compared
# are not all chance-level
LEARN = ("method.reference_epochs=15", "trainer.batch_size=16")


@pytest.fixture(scope="module")
def three_tasks(digits_dir, tmp_path_factory) -> Path:
    return first_tasks(digits_dir, tmp_path_factory.mktemp("digits3") / "data", N_TASKS)


@pytest.fixture(scope="module")
def uninterrupted(three_tasks, tmp_path_factory) -> dict:
    """The reference: the same stream, inline, nothing killed."""
    from cldist.config.compose import compose
    from cldist.stream import run_stream
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    return run_stream(compose(tiny_overrides(three_tasks, run_dir, "runner=inline", *LEARN)))


def _check_complete(run_dir: Path, metrics: dict, reference: dict, tol: float) -> dict:
    """Every task once, nothing half-written, the reference's accuracy matrix; returns state."""
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "finished"
    assert state["completed_tasks"] == list(range(N_TASKS))
    assert sorted(p.name for p in (run_dir / "tasks").iterdir()) == \
        [f"{t:03d}" for t in range(N_TASKS)]  # no staging left, no duplicate
    assert [len(r) for r in metrics["accuracy_matrix"]] == list(range(1, N_TASKS + 1))
    for row, ref in zip(metrics["accuracy_matrix"], reference["accuracy_matrix"]):
        if tol == 0:
            assert row == ref
        else:
            assert row == pytest.approx(ref, abs=tol), \
                (metrics["accuracy_matrix"], reference["accuracy_matrix"])
    return state


def _ray_stream(three_tasks: Path, run_dir: Path, *extra: str) -> dict:
    from cldist.config.compose import compose
    from cldist.stream import run_stream
    return run_stream(compose(tiny_overrides(three_tasks, run_dir, "runner=ray",
                                             "trainer.tasks_per_job=2", *LEARN, *extra)))


@pytest.mark.slow
def test_a_killed_training_worker_is_retried_from_its_last_checkpoint(
        three_tasks, uninterrupted, tmp_path, ray_cluster, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    # rank 0 SIGKILLs itself after its first epoch of task 2, the second task of the job
    # learning tasks 1 and 2, i.e. after the job had reported task 1
    faults.kill_worker_learning(monkeypatch, 2)
    metrics = _ray_stream(three_tasks, run_dir, "trainer.max_failures=1",
                          "trainer.max_concurrent_tasks=1")  # one job learns tasks 1 and 2

    assert (run_dir / ".faults" / "kill-worker-002.done").exists(), "the fault never fired"
    state = _check_complete(run_dir, metrics, uninterrupted, MATRIX_TOL)
    meta = state["task_meta"]
    assert meta["1"]["job_group"] == [1, 2] and meta["2"]["job_group"] == [1, 2]
    assert meta["2"]["job_attempts"] == 2  # the group's worker group was started twice
    out = capsys.readouterr().out
    assert "[retry] job task-001-002" in out
    # the retry resumed after task 1 instead of learning it again: task 1's epochs were
    # announced once each (task 2's first epoch twice, unless the kill beat its event)
    task1_epochs = re.findall(r"^\[task 001 \| \w+ \| epoch ", out, flags=re.M)
    assert len(task1_epochs) == sum(fit["epochs"] for fit in meta["1"]["fits"]), out


@pytest.mark.slow
def test_b_killed_evaluator_actor_is_restarted(three_tasks, uninterrupted, tmp_path,
                                               ray_cluster, monkeypatch):
    import ray

    from cldist.eval.stream_evaluator import StreamEvaluator
    killed = []
    original = StreamEvaluator.tasks_finished

    def kill_then_score(self, tasks):
        # before the second scoring request, kill the evaluator holding sub-network 0
        if self.finished and not killed and getattr(self.runner, "_evaluators", None):
            actor = self.runner.evaluators[0]
            ray.kill(actor, no_restart=False)
            killed.append(actor)
        return original(self, tasks)

    monkeypatch.setattr(StreamEvaluator, "tasks_finished", kill_then_score)
    run_dir = tmp_path / "run"
    metrics = _ray_stream(three_tasks, run_dir)
    assert killed, "no evaluator was killed"
    _check_complete(run_dir, metrics, uninterrupted, MATRIX_TOL)


def _kill_driver_once(run_dir: Path, overrides: list[str], committed, timeout: float) -> dict:
    """Start `cldist run OVERRIDES` in its own process group (with an embedded Ray cluster of
    its own where it uses Ray), SIGKILL the group once `committed(completed_tasks)` holds for
    state.json, and return state.json as the kill left it."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["OMP_NUM_THREADS"] = "1"
    driver = subprocess.Popen([sys.executable, "-m", "cldist.cli", "run", *overrides],
                              cwd=str(REPO), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    state_file = run_dir / "state.json"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            try:
                if committed(json.loads(state_file.read_text()).get("completed_tasks", [])):
                    break
            except (OSError, ValueError):
                pass  # not written yet
            time.sleep(0.05)
        assert driver.poll() is None, "the driver ended before it could be killed"
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    return json.loads(state_file.read_text())


def test_c_killed_driver_then_resume(three_tasks, uninterrupted, tmp_path):
    """SIGKILL the driver process once a task is committed; `cldist resume` finishes the run
    bit-identically to the uninterrupted run (inline runner, CPU)."""
    from cldist.cli import main
    run_dir = tmp_path / "run"
    state = _kill_driver_once(run_dir, tiny_overrides(three_tasks, run_dir, "runner=inline", *LEARN),
                              lambda done: bool(done), timeout=300)
    killed_at = state["completed_tasks"]
    assert 1 <= len(killed_at) < N_TASKS, killed_at

    assert main(["resume", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    _check_complete(run_dir, metrics, uninterrupted, tol=0)


# A two-node cluster in a subprocess (as tests/system/test_multinode.py), whose worker node is
# removed while a Train worker runs on it. Prints one RESULT line of JSON.
NODE_LOSS_SCRIPT = r"""
import json, sys, threading, time
import ray
from ray.cluster_utils import Cluster

overrides = json.loads(sys.argv[1])
node_args = dict(num_cpus=1, object_store_memory=200 * 1024 * 1024,
                 dashboard_agent_listen_port=None)
cluster = Cluster(initialize_head=True, head_node_args=dict(node_args, include_dashboard=False))
try:
    worker_node = cluster.add_node(**node_args)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    doomed = worker_node.node_id
    removed = {}
    learning = set()  # tasks that reported an epoch: their workers are past start-up

    from cldist.report.progress import Progress
    epoch = Progress.epoch

    def record_epoch(self, task_id, *args, **kwargs):
        learning.add(task_id)
        return epoch(self, task_id, *args, **kwargs)

    Progress.epoch = record_epoch

    def remove_when_busy():
        # tasks 1 and 2 learn side by side, one per node: once both are learning, the
        # worker node (and the job on it) goes away
        while not removed:
            on_doomed = any("RayTrainWorker" in a.get("ActorClassName", "")
                            and a["State"] == "ALIVE" and a["Address"]["NodeID"] == doomed
                            for a in ray._private.state.actors().values())
            if on_doomed and {1, 2} <= learning:
                cluster.remove_node(worker_node, allow_graceful=False)
                removed["at"] = time.time()
                return
            time.sleep(0.2)

    threading.Thread(target=remove_when_busy, daemon=True).start()
    from cldist.config.compose import compose
    from cldist.stream import run_stream
    metrics = run_stream(compose(overrides))
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print("RESULT " + json.dumps({"metrics": metrics, "removed": bool(removed),
                                  "doomed": doomed, "alive": alive}), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.fixture(scope="module")
def uninterrupted_long(three_tasks, tmp_path_factory) -> dict:
    from cldist.config.compose import compose
    from cldist.stream import run_stream
    run_dir = tmp_path_factory.mktemp("clean_long") / "run"
    return run_stream(compose(tiny_overrides(three_tasks, run_dir, "runner=inline", *LEARN,
                                             *LONG_TASKS)))


LONG_TASKS = ("method.epochs=30",)  # seconds per task: the node goes mid-task


@pytest.mark.slow
def test_d_lost_node_jobs_move_to_the_survivor(three_tasks, uninterrupted_long, tmp_path):
    uninterrupted = uninterrupted_long
    from tests.system.test_multinode import _run_two_node_cluster
    run_dir = tmp_path / "run"
    # tasks 1 and 2 run as two 1-worker jobs side by side, one per 1-CPU node
    result = _run_two_node_cluster(
        tiny_overrides(three_tasks, run_dir, "runner=ray", "trainer.max_failures=2",
                       "trainer.max_concurrent_tasks=2", *LEARN, *LONG_TASKS),
        script=NODE_LOSS_SCRIPT)
    assert result["removed"], "no Train worker ever ran on the worker node"
    assert result["doomed"] not in result["alive"]
    state = _check_complete(run_dir, result["metrics"], uninterrupted, MATRIX_TOL)
    # every task's final files came from the surviving node
    assert all(m["node_id"] != result["doomed"] for m in state["task_meta"].values()
               if m.get("job_attempts", 1) > 1)
    assert any(m.get("job_attempts", 1) > 1 for m in state["task_meta"].values())


@pytest.mark.slow
def test_e_killed_driver_keeps_the_tasks_its_packed_job_reported(
        three_tasks, uninterrupted_long, tmp_path, ray_cluster, capsys):
    """SIGKILL a Ray driver (and its embedded cluster) while one packed job learns tasks 1 and
    2, once task 1 is committed: the job's rank 0 committed task 1 as soon as it was reported,
    so `cldist resume` learns task 2 only and keeps task 1's files untouched."""
    from cldist.cli import main
    run_dir = tmp_path / "run"
    state = _kill_driver_once(
        run_dir, tiny_overrides(three_tasks, run_dir, "runner=ray", "cluster.num_cpus=1",
                                "trainer.tasks_per_job=2", *LEARN, *LONG_TASKS),
        lambda done: 1 in done, timeout=400)
    assert state["completed_tasks"] == [0, 1], state["completed_tasks"]  # task 2 was learning
    assert state["task_meta"]["1"]["job_group"] == [1, 2]
    task1 = {p.name: p.read_bytes() for p in (run_dir / "tasks" / "001").iterdir()}

    capsys.readouterr()
    assert main(["resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"^\[task 001 ", out, flags=re.M), out  # not learnt again
    assert re.search(r"^\[task 002 ", out, flags=re.M), out
    assert {p.name: p.read_bytes() for p in (run_dir / "tasks" / "001").iterdir()} == task1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    _check_complete(run_dir, metrics, uninterrupted_long, MATRIX_TOL)


@pytest.mark.slow
def test_f_killed_slot_worker_relearns_only_the_task_it_held(
        three_tasks, uninterrupted, tmp_path, ray_cluster, capsys, monkeypatch):
    """Job slots (`trainer.tasks_per_job=auto`), one slot: it learns tasks 0, 1 and 2 in turn
    and its rank 0 is SIGKILLed in task 2's first epoch. Ray Train restarts the slot; task 2 is
    back in the queue and learnt again, tasks 0 and 1 - committed - are not."""
    from cldist import stream
    from cldist.config.compose import compose
    run_dir = tmp_path / "run"
    faults.kill_worker_learning(monkeypatch, 2)
    metrics = stream.run_stream(compose(tiny_overrides(
        three_tasks, run_dir, "runner=ray", "trainer.tasks_per_job=auto",
        "trainer.max_failures=1", "trainer.max_concurrent_tasks=1", *LEARN)))

    assert (run_dir / ".faults" / "kill-worker-002.done").exists(), "the fault never fired"
    state = _check_complete(run_dir, metrics, uninterrupted, MATRIX_TOL)
    meta = state["task_meta"]
    assert len({m["job_slot"] for m in meta.values()}) == 1  # one slot learnt them all
    assert [meta[str(t)]["job_attempts"] for t in range(N_TASKS)] == [1, 1, 2]
    out = capsys.readouterr().out
    assert "[retry] job slot slot-" in out
    for t in (0, 1):  # each epoch of the committed tasks announced once: not learnt again
        epochs = re.findall(rf"^\[task {t:03d} \| \w+ \| epoch ", out, flags=re.M)
        assert len(epochs) == sum(fit["epochs"] for fit in meta[str(t)]["fits"]), out
