"""cldist.rundir.RunDir directly: create (marker first, refusal of foreign and finished
directories), require, read_config's checks, committing and reading a task's files, and
prepare_resume bringing a crashed directory back to the boundary state.json records."""
from __future__ import annotations

import json

import pytest
import torch

from cldist.data import Manifest
from cldist.errors import UserError
from cldist.rundir import RunDir

CONFIG = {"method": {"name": "pearl"}, "backbone": {"name": "test_vit"}, "seed": 3}


@pytest.fixture
def run(digits_dir, tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.create(method="pearl", backbone="test_vit", config=CONFIG,
               config_yaml="method:\n  name: pearl\n", seeds={"seed": 3},
               manifest=Manifest.load(digits_dir))
    yield run
    run.release_lock()


def _commit(run: RunDir, task_id: int, value: float) -> None:
    staging = run.staging_dir(task_id)
    run.write_task_files(staging, {"adapter": {"w": torch.full((2, 3), value)}},
                         {"task_id": task_id})
    run.commit_task(task_id, staging)
    run.state().record_task(task_id, {"params_added": 6})


def test_create_writes_a_run_that_require_and_read_config_accept(run):
    state = run.require()
    assert (state["method"], state["backbone"], state["status"]) == (
        "pearl", "test_vit", "starting")
    assert run.is_run()
    assert run.read_config() == CONFIG
    assert run.config_yaml_path.read_text() == "method:\n  name: pearl\n"
    assert json.loads(run.seeds_path.read_text()) == {"seed": 3}


def test_a_directory_with_foreign_files_is_refused_and_left_alone(digits_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    run = RunDir(tmp_path)
    with pytest.raises(UserError, match=r"not empty and holds no cldist run \(notes.txt\)"):
        run.create(method="pearl", backbone="test_vit", config=CONFIG, config_yaml="",
                   seeds={}, manifest=Manifest.load(digits_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert not run.is_run()
    with pytest.raises(UserError):
        run.require()


def test_a_second_run_into_a_finished_one_says_resume(run, digits_dir):
    with pytest.raises(UserError, match="already holds a run; `cldist resume"):
        RunDir(run.path).create(method="pearl", backbone="test_vit", config=CONFIG,
                                config_yaml="", seeds={}, manifest=Manifest.load(digits_dir))


def test_read_config_refuses_interpolation_and_another_method(run):
    data = dict(CONFIG, seed="${oc.env:HOME}")
    run.config_path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"seed holds the interpolation '\$\{oc.env:HOME\}'"):
        run.read_config()
    run.config_path.write_text(json.dumps(dict(CONFIG, method={"name": "slda"})))
    with pytest.raises(UserError, match="method.name is 'slda', but this run's tasks were "
                                        "trained with method=pearl"):
        run.read_config()
    assert run.read_config(checked=False)["method"] == {"name": "slda"}  # reports only


def test_commit_then_read_task_weights_round_trips(run):
    _commit(run, 0, 1.5)
    assert run.has_task(0) and not run.has_task(1)
    weights = run.read_task_weights(0)
    assert list(weights) == ["adapter"]
    assert torch.equal(weights["adapter"]["w"], torch.full((2, 3), 1.5))
    assert not list(run.tasks_path.glob(".staging-*"))  # the staging directory became tasks/000


def test_a_second_commit_of_the_same_task_keeps_the_first(run):
    _commit(run, 0, 1.0)
    staging = run.staging_dir(0)
    run.write_task_files(staging, {"adapter": {"w": torch.full((2, 3), 9.0)}}, {})
    run.commit_task(0, staging)
    assert torch.equal(run.read_task_weights(0)["adapter"]["w"], torch.full((2, 3), 1.0))
    assert not staging.exists()


def test_read_task_weights_refuses_a_pickle_and_a_missing_file(run):
    _commit(run, 0, 1.0)
    (run.task_dir(0) / "adapter.pt").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(UserError, match=r"adapter.pt is not a safetensors file.*never "
                                        r"unpickles"):
        run.read_task_weights(0)
    (run.task_dir(0) / "adapter.pt").unlink()
    (run.task_dir(0) / "adapter.safetensors").unlink()
    with pytest.raises(UserError, match=r"adapter.safetensors is missing"):
        run.read_task_weights(0)


def test_prepare_resume_removes_what_state_json_does_not_list(run):
    _commit(run, 0, 1.0)
    run.state().set_rows([[0.5]])
    # a crash after committing task 1 but before state.json recorded it, and a staging leftover
    staging = run.staging_dir(1)
    run.write_task_files(staging, {"adapter": {"w": torch.zeros(1)}}, {})
    run.commit_task(1, staging)
    run.write_task_files(run.staging_dir(2), {"adapter": {"w": torch.zeros(1)}}, {})
    notes = run.prepare_resume({1: [0], 2: [0]}, n_tasks=3)
    assert run.has_task(0) and not run.has_task(1)
    assert not list(run.tasks_path.glob(".staging-*"))
    assert len(notes) == 2 and notes[0].startswith("removed unfinished task files: .staging-002")
    assert notes[1] == "task 1 was committed but never recorded in state.json: retraining it"
    assert run.state().completed == [0]


def test_prepare_resume_refuses_to_retrain_under_a_finished_dependent(run):
    _commit(run, 0, 1.0)
    _commit(run, 1, 2.0)
    run.state().set_rows([[0.5], [0.5, 0.5]])
    for f in run.task_dir(0).iterdir():
        f.unlink()
    run.task_dir(0).rmdir()
    with pytest.raises(UserError, match=r"lists tasks \[0\] as finished, but their files are "
                                        r"gone .* the finished tasks \[1\] were trained on top"):
        run.prepare_resume({1: [0]}, n_tasks=2)
    assert run.state().completed == [0, 1] and run.has_task(1)  # nothing changed
    # independent tasks: task 0 alone is retrained, task 1 and its row stay
    notes = run.prepare_resume({1: []}, n_tasks=2)
    assert notes == ["tasks [0] have no files: retraining them"]
    assert run.state().completed == [1] and run.state().data["accuracy_matrix"] == []
