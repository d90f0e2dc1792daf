"""Fixtures for the unit tests: a new two-task PEARL run directory on the digits shards, and
the same run once the inline runner has learnt both tasks."""
from __future__ import annotations

import pytest

from tests.conftest import first_tasks, tiny_overrides


def _new_run(digits_dir, base):
    from cldist.config.compose import compose
    from cldist.data import Manifest
    from cldist.rundir import RunDir
    from cldist.stream import prepare_run_dir

    data = first_tasks(digits_dir, base / "data", 2)
    cfg = compose(tiny_overrides(data, base / "run", "runner=inline"))
    run_dir = prepare_run_dir(cfg, Manifest.load(data))
    RunDir(run_dir).release_lock()
    return cfg, run_dir


@pytest.fixture
def new_run(digits_dir, tmp_path):
    """(cfg, run_dir): a created run directory (tasks 0-1 of the digits), nothing trained."""
    return _new_run(digits_dir, tmp_path)


@pytest.fixture(scope="session")
def inline_run(digits_dir, tmp_path_factory):
    """(cfg, run_dir, events): tasks 0 and 1 learnt by `InlineRunner.run_tasks` and committed
    as the stream commits them; `events` is the order of the runner's `started`/`on_done`
    calls."""
    from cldist.runners.inline import InlineRunner
    from cldist.assemble import TaskJob

    cfg, run_dir = _new_run(digits_dir, tmp_path_factory.mktemp("inline"))
    runner = InlineRunner(cfg, run_dir)
    events = []

    def on_done(finished):
        for t, meta in finished:
            events.append(("done", t))
            runner.coordinator.commit(t, meta["staging_dir"], meta)

    jobs = {t: TaskJob(str(run_dir), cfg.to_dict(), t) for t in (0, 1)}
    runner.run_tasks(jobs, {0: [], 1: [0]}, on_done,
                     started=lambda t: events.append(("started", t)))
    return cfg, run_dir, events
