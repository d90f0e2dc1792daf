"""The runners package: one protocol both runners satisfy, one ready order, one make_runner
that imports Ray only for runner=ray (no Ray is started here)."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from cldist.runners import (RUNNERS, Coordinator, Runner, done_before, make_runner,
                            ready_order, runner_class)

REPO = Path(__file__).resolve().parents[3]


def _members(protocol) -> tuple[list[str], list[str]]:
    """(methods, data attributes) a protocol declares."""
    methods = [n for n, v in vars(protocol).items() if not n.startswith("_") and callable(v)]
    return methods, [n for n in protocol.__annotations__ if not n.startswith("_")]


def _problems(cls, protocol) -> list[str]:
    """How `cls` departs from `protocol`: a missing method or attribute, or a method whose
    parameters (names, kinds, defaults) differ."""
    methods, attributes = _members(protocol)
    out = []
    for name in methods:
        if not callable(getattr(cls, name, None)):
            out.append(f"{cls.__name__}.{name} is missing")
            continue
        want = [(p.name, p.kind, p.default) for p in
                inspect.signature(getattr(protocol, name)).parameters.values()]
        have = [(p.name, p.kind, p.default) for p in
                inspect.signature(getattr(cls, name)).parameters.values()]
        if want != have:
            out.append(f"{cls.__name__}.{name}{have} != {protocol.__name__}.{name}{want}")
    for name in attributes:  # set per instance: each runner declares it on its class
        if not hasattr(cls, name) and name not in getattr(cls, "__annotations__", {}):
            out.append(f"{cls.__name__}.{name} is not declared")
    return out


def test_the_protocol_names_what_the_driver_and_the_evaluator_use():
    methods, attributes = _members(Runner)
    assert set(methods) == {"run_tasks", "score_blocks", "score_single", "test_labels",
                            "reference_features", "task_statistics", "close"}
    assert set(attributes) == {"name", "coordinator"}
    assert "started" in inspect.signature(Runner.run_tasks).parameters


def test_both_runners_satisfy_the_protocol():
    from cldist.coordinator.run_coordinator import RunCoordinator
    from cldist.distributed.actors import CoordinatorProxy
    from cldist.distributed.runner import RayRunner
    from cldist.runners.inline import InlineRunner
    for cls in (InlineRunner, RayRunner):
        assert _problems(cls, Runner) == []
        assert isinstance(cls.name, str) and runner_class(cls.name) is cls
        # the constructor make_runner calls
        assert {"progress", "job_slots"} <= set(inspect.signature(cls).parameters)
    for cls in (RunCoordinator, CoordinatorProxy):
        assert _problems(cls, Coordinator) == []
    assert InlineRunner.__annotations__["coordinator"] == "RunCoordinator"
    assert RayRunner.__annotations__["coordinator"] == "CoordinatorProxy"


def test_every_runner_the_config_accepts_is_built():
    """Each `runner=` name config validation accepts (cldist.choices) imports as a Runner."""
    for name in RUNNERS:
        assert isinstance(runner_class(name), type) and runner_class(name).name == name
    with pytest.raises(ValueError, match="runner=spark: choose one of inline, ray"):
        runner_class("spark")


def test_ready_order():
    deps = {0: [], 1: [0], 2: [0], 3: [1, 2]}
    assert ready_order([0, 1, 2, 3], deps, set()) == [0]
    assert ready_order([1, 2, 3], deps, {0}) == [1, 2]
    assert ready_order([3], deps, {0, 1}) == []
    assert ready_order([3], deps, {0, 1, 2}) == [3]
    assert done_before({2: None, 3: None}, deps) == {0, 1}  # a resumed run's committed tasks


def test_the_inline_runner_never_imports_ray():
    code = ("import sys, cldist.stream, cldist.cli, cldist.runners, cldist.eval; "
            "import cldist.eval.stream_evaluator; from cldist.runners import runner_class; "
            "runner_class('inline'); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed') "
            "or m.startswith('cldist.distributed')); print(bad); assert not bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_make_runner_builds_the_inline_runner_with_progress(tmp_path, monkeypatch):
    from cldist.runners import inline
    built = {}

    class Fake(inline.InlineRunner):
        def __init__(self, cfg, run_dir, on_epoch=None, *, progress=None, job_slots=None):
            built.update(cfg=cfg, run_dir=run_dir, progress=progress, job_slots=job_slots)

    monkeypatch.setattr(inline, "InlineRunner", Fake)
    runner = make_runner("inline", "CFG", tmp_path, progress="P", job_slots="S")
    assert isinstance(runner, Fake)
    assert built == {"cfg": "CFG", "run_dir": tmp_path, "progress": "P", "job_slots": "S"}


def test_production_workers_inject_no_faults():
    """Workers call only the epoch hooks the driver sends: none unless a test installs one
    (tests/faults.py)."""
    from cldist.distributed import runner
    assert runner.WORKER_EPOCH_HOOKS == ()
    assert "kill-worker" not in inspect.getsource(runner)  # the markers are tests/faults.py's
