"""Job slots (`trainer.tasks_per_job=auto`): long-lived Ray Train jobs that pull ready tasks.

The queue's rules are checked on their own (cldist.runners.slots, no Ray); the Ray streams
check that slots learn the same tasks to the same numbers as one job per task, that a chain
runs in one slot in the graph's order, and that PEARL's independent tasks spread over the
slots the cluster has room for. tests/system/test_faults.py kills a slot's worker mid-task.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cldist.runners.slots import SlotQueue

from tests.conftest import first_tasks, tiny_overrides

N_TASKS = 3


# ------------------------------------------------------------------ the queue, no Ray

def test_chain_tasks_become_ready_one_at_a_time():
    q = SlotQueue(range(3), {0: [], 1: [0], 2: [1]})
    q.start("a")
    q.start("b")
    assert q.claim("a") == 0
    assert q.claim("b") is None  # task 1 waits for task 0: slot b ends
    assert q.claim("a") == 0  # a slot that still holds a task gets it again
    assert q.complete(0)
    assert q.claim("a") == 1
    assert q.complete(1) and q.claim("a") == 2
    assert q.complete(2)
    assert q.claim("a") is None and q.status()["left"] == 0


def test_independent_tasks_go_to_every_slot_in_task_order():
    q = SlotQueue([1, 2, 3, 4], {0: [], 1: [0], 2: [0], 3: [0], 4: [0]}, done=[0])
    assert [q.claim(s) for s in ("a", "b", "c")] == [1, 2, 3]
    assert q.status() == {"left": 4, "ready": 1, "holding": 3, "closed": False}
    q.close()  # the stream is stopping: nothing more is handed out
    q.complete(1)
    assert q.claim("a") is None and q.status()["ready"] == 0


def test_a_restarted_slot_gives_its_task_back_and_committed_tasks_stay_done():
    q = SlotQueue([1, 2, 3], {1: [0], 2: [0], 3: [0]}, done=[0])
    assert q.start("a") == 1
    assert q.claim("a") == 1
    q.complete(1)
    assert q.claim("a") == 2
    assert q.start("a") == 2  # its worker died: task 2 is ready again, for any slot
    assert q.status()["holding"] == 0
    assert q.claim("b") == 2
    assert q.claim("a") == 3
    assert not q.complete(1)  # a duplicate commit changes nothing
    assert q.release("b") == 2  # slot b failed for good: task 2 is ready again
    assert q.ready() == [2]


def test_a_dependency_on_an_unknown_task_is_refused():
    with pytest.raises(ValueError, match=r"depend on \[7\]"):
        SlotQueue([1], {1: [7]})


def test_tasks_per_job_takes_a_number_or_auto():
    from cldist.config.compose import compose
    from cldist.errors import ConfigError

    assert compose(["trainer.tasks_per_job=auto"]).trainer.tasks_per_job == "auto"
    assert compose(["trainer.tasks_per_job=4"]).trainer.tasks_per_job == 4
    for bad in ("0", "many"):
        with pytest.raises(ConfigError, match="whole number >= 1, or auto"):
            compose([f"trainer.tasks_per_job={bad}"])


# ------------------------------------------------------------------ Ray streams

@pytest.fixture(scope="module")
def three_tasks(digits_dir, tmp_path_factory) -> Path:
    return first_tasks(digits_dir, tmp_path_factory.mktemp("digits3") / "data", N_TASKS)


def _stream(data: Path, run_dir: Path, *extra: str) -> tuple[dict, dict]:
    from cldist.config.compose import compose
    from cldist.stream import run_stream
    metrics = run_stream(compose(tiny_overrides(data, run_dir, "runner=ray", *extra)))
    return metrics, json.loads((run_dir / "state.json").read_text())


def _slot_jobs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "ray_train").iterdir())


def _check_complete(run_dir: Path, state: dict) -> None:
    assert state["status"] == "finished"
    assert state["completed_tasks"] == list(range(N_TASKS))
    assert sorted(p.name for p in (run_dir / "tasks").iterdir()) == \
        [f"{t:03d}" for t in range(N_TASKS)]  # no staging left, no duplicate
    assert all(m["job_attempts"] == 1 for m in state["task_meta"].values())
    slots = _slot_jobs(run_dir)
    assert all(name.startswith("slot-") for name in slots)
    assert {m["job_slot"] for m in state["task_meta"].values()} <= set(slots)
    # the slots' own copies of the committed tasks are gone, as a finished job's are
    assert not list((run_dir / "ray_train").glob("*/checkpoint_*/meta.json"))


@pytest.mark.slow
def test_slots_learn_what_one_job_per_task_learns(three_tasks, tmp_path, ray_cluster):
    """PEARL: the reference in one slot, then the two independent tasks in the slots the
    session cluster's 2 CPUs have room for; the numbers of one Ray Train job per task."""
    one, one_state = _stream(three_tasks, tmp_path / "one", "trainer.tasks_per_job=1")
    auto, state = _stream(three_tasks, tmp_path / "auto", "trainer.tasks_per_job=auto")

    _check_complete(tmp_path / "auto", state)
    assert one_state["completed_tasks"] == state["completed_tasks"]
    for key in ("accuracy_matrix", "task_il_accuracy_matrix", "params_added", "ranks"):
        assert auto[key] == one[key], key
    assert list(state["task_meta"])[0] == "0"  # task_meta is in commit order: the reference
    assert len(_slot_jobs(tmp_path / "auto")) <= 2


@pytest.mark.slow
def test_a_chain_runs_in_one_slot_in_order(three_tasks, tmp_path, ray_cluster):
    """seq_lora's tasks form a chain: task t+1 is handed out only once t is committed, so the
    slot that learnt t takes t+1 at once and no second slot is ever started."""
    metrics, state = _stream(three_tasks, tmp_path / "run", "method=seq_lora",
                             "trainer.tasks_per_job=auto")
    _check_complete(tmp_path / "run", state)
    assert len(_slot_jobs(tmp_path / "run")) == 1
    assert list(state["task_meta"]) == ["0", "1", "2"]  # commit order
    assert [len(r) for r in metrics["accuracy_matrix"]] == list(range(1, N_TASKS + 1))
