"""cldist.runners.inline.InlineRunner directly: the order it trains tasks in (a task only
after its dependencies, `started` before `on_done`), a task graph that cannot finish, tasks
already done, and a real two-task run whose tasks are committed and recorded."""
from __future__ import annotations

import pytest

import cldist.runners.inline as inline
from cldist.rundir import RunDir
from cldist.assemble import TaskJob


@pytest.fixture
def runner(new_run, monkeypatch):
    """An InlineRunner whose train_task only records what it was asked to train."""
    cfg, run_dir = new_run
    trained = []

    def fake_train_task(job, on_epoch=None, device=None, allocate_ranks=None):
        trained.append((job.task_id, device, allocate_ranks))
        return {"task_id": job.task_id}

    monkeypatch.setattr(inline, "train_task", fake_train_task)
    r = inline.InlineRunner(cfg, run_dir)
    r.trained = trained
    r.job = lambda t: TaskJob(str(run_dir), cfg.to_dict(), t)
    return r


def test_tasks_run_after_their_dependencies_started_before_done(runner):
    events = []
    jobs = {t: runner.job(t) for t in (0, 1, 2, 3)}
    # 1 waits for 2, 2 for 0, 3 for 1: the only order is 0, 2, 1, 3
    runner.run_tasks(jobs, {0: [], 1: [2], 2: [0], 3: [1]},
                     on_done=lambda finished: events.append(("done", finished)),
                     started=lambda t: events.append(("started", t)))
    assert [t for t, _, _ in runner.trained] == [0, 2, 1, 3]
    assert events == [e for t in (0, 2, 1, 3)
                      for e in (("started", t), ("done", [(t, {"task_id": t})]))]
    assert all(device == "cpu" for _, device, _ in runner.trained)
    assert all(alloc == runner.coordinator.allocate_ranks for _, _, alloc in runner.trained)


def test_tasks_done_before_are_not_trained_again(runner):
    # jobs hold only what is left (a resumed run): tasks of the graph without a job are done
    runner.run_tasks({2: runner.job(2), 3: runner.job(3)}, {0: [], 1: [0], 2: [0, 1], 3: [2]},
                     on_done=lambda finished: None)
    assert [t for t, _, _ in runner.trained] == [2, 3]


def test_a_graph_that_cannot_finish_is_refused_before_training(runner):
    started = []
    with pytest.raises(RuntimeError, match=r"task graph is stuck: pending \[0, 1\]"):
        runner.run_tasks({0: runner.job(0), 1: runner.job(1)}, {0: [1], 1: [0]},
                         on_done=lambda finished: None, started=started.append)
    assert runner.trained == [] and started == []


def test_a_real_run_commits_each_task_in_order(inline_run):
    cfg, run_dir, events = inline_run
    assert events == [("started", 0), ("done", 0), ("started", 1), ("done", 1)]
    run = RunDir(run_dir)
    assert run.state().completed == [0, 1]
    for t in (0, 1):
        assert run.read_task_weights(t)["head"]  # each task's own classifier head
    assert not list(run.tasks_path.glob(".staging-*"))
    assert run.read_reference() is not None  # PEARL's task 0 trains the reference
