"""Class statistics in real runs: what task jobs save, what slda makes of it, what never leaks.

On the first three digits tasks (120 training images each) with timm's test ViT:
(a) `method=slda` through the Ray runner (one packed Train job) gives the inline runner's
    statistics and accuracy matrix, well above chance;
(b) the statistics a linear-probe run saves, merged over its tasks in any order, are the
    statistics of all training images through the reference network, computed here directly,
    and a 2-worker data-parallel Ray job saves the same;
(c) no run directory holds a per-sample tensor or a file outside the documented layout;
(d) a resumed PEARL run's statistics (its retrained task's included) are the uninterrupted
    run's.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cldist.coordinator.statistics import (STATS_STEM, ClassStatistics, merge_all,
                                           statistics_from_tensors)
from cldist.rundir import RunDir

from tests.conftest import first_tasks, tiny_overrides

N_TASKS = 3
# what a run directory may hold (README "Run directory"); tasks/TTT is checked on its own
RUN_FILES = {"config.yaml", "config.json", "seeds.json", "manifest.json", "state.json",
             "metrics.json", "cldist.lock", "reference.safetensors"}
RUN_DIRS = {"tasks", "tb", "ray_train"}  # ray_train: Ray Train's own storage (Ray runner)
TASK_STEMS = {"adapter", "head", STATS_STEM}
PEARL_SHORT = ("method.reference_epochs=2", "method.epochs=1")


@pytest.fixture(scope="module")
def three_tasks(digits_dir, tmp_path_factory) -> Path:
    return first_tasks(digits_dir, tmp_path_factory.mktemp("stats-digits3") / "data", N_TASKS)


def _run(data: Path, run_dir: Path, *extra: str) -> dict:
    from cldist.config.compose import compose
    from cldist.stream import run_stream
    return run_stream(compose(tiny_overrides(data, run_dir, *extra)))


def _stats(run_dir: Path, group: str, order=range(N_TASKS)) -> ClassStatistics:
    return merge_all(statistics_from_tensors(RunDir(run_dir).read_task_weights(t)[STATS_STEM],
                                             f"task {t}")[group] for t in order)


def _assert_same(a: ClassStatistics, b: ClassStatistics, rtol: float = 1e-6) -> None:
    assert torch.equal(a.classes, b.classes)
    assert torch.equal(a.counts, b.counts)
    for name in ("sums", "scatter"):
        x, y = getattr(a, name), getattr(b, name)
        # float32 features summed in float64: equal up to the features' own rounding
        assert torch.allclose(x, y, rtol=rtol, atol=rtol * float(y.abs().max())), name


@pytest.fixture(scope="module")
def probe_inline(three_tasks, tmp_path_factory) -> tuple[dict, Path]:
    run_dir = tmp_path_factory.mktemp("probe") / "run"
    return _run(three_tasks, run_dir, "method=linear_probe", "runner=inline"), run_dir


@pytest.fixture(scope="module")
def slda_inline(three_tasks, tmp_path_factory) -> tuple[dict, Path]:
    run_dir = tmp_path_factory.mktemp("slda") / "run"
    return _run(three_tasks, run_dir, "method=slda", "runner=inline"), run_dir


def test_a_slda_through_the_ray_runner_equals_inline(three_tasks, slda_inline, tmp_path,
                                                      ray_cluster):
    inline, inline_dir = slda_inline
    run_dir = tmp_path / "ray"
    metrics = _run(three_tasks, run_dir, "method=slda", "runner=ray",
                   f"trainer.tasks_per_job={N_TASKS}")
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "finished" and state["completed_tasks"] == list(range(N_TASKS))
    # nothing trains: no parameters, no fit, only the statistics pass
    assert metrics["method"] == "slda" and metrics["params_per_task"] == 0
    for t in range(N_TASKS):
        meta = json.loads((run_dir / "tasks" / f"{t:03d}" / "meta.json").read_text())
        assert meta["fits"] == [] and meta["statistics_seconds"] > 0
        assert meta["tensor_files"] == ["stats.safetensors"]
    _assert_same(_stats(run_dir, "ref"), _stats(inline_dir, "ref"))
    assert metrics["accuracy_matrix"] == inline["accuracy_matrix"]
    # 6 classes: chance is 16.7 %; the frozen random-init test ViT's features separate digits
    assert metrics["acc"] > 50.0, metrics["accuracy_matrix"]
    check_no_per_sample_tensors(run_dir, three_tasks)


def test_b_saved_statistics_are_the_training_images_statistics(three_tasks, probe_inline):
    """Merged over tasks (in any order) = computed here in one go from every training image
    through the reference network, with the test-time transform."""
    from cldist.config.compose import compose
    from cldist.data import TaskReader
    from cldist.assemble import build_model, make_method, transforms
    _, run_dir = probe_inline
    cfg = compose(tiny_overrides(three_tasks, run_dir, "method=linear_probe"))
    manifest = RunDir(run_dir).read_manifest()
    model = build_model(cfg, make_method(cfg), manifest, run_dir).eval()
    _, test_tf = transforms(cfg, manifest)
    feats, labels = [], []
    with torch.no_grad():
        for t in range(N_TASKS):
            for x, y in TaskReader(manifest, t, "train", test_tf).batches(50):
                feats.append(model.features(x))
                labels.append(y)
    labels = torch.cat(labels)
    direct = ClassStatistics.from_features(torch.cat(feats), labels, sorted(set(labels.tolist())))
    assert direct.n == sum(manifest.tasks[t].n_train for t in range(N_TASKS))
    _assert_same(_stats(run_dir, "ref"), direct)
    _assert_same(_stats(run_dir, "ref", order=[2, 0, 1]), direct)
    # a linear probe's own sub-network is the frozen backbone too
    _assert_same(_stats(run_dir, "own"), direct)
    check_no_per_sample_tensors(run_dir, three_tasks)


def test_b_two_data_parallel_workers_save_the_one_worker_statistics(
        three_tasks, probe_inline, tmp_path, ray_cluster):
    _, inline_dir = probe_inline
    run_dir = tmp_path / "dp2"
    _run(three_tasks, run_dir, "method=linear_probe", "runner=ray", "trainer.num_workers=2",
         f"trainer.tasks_per_job={N_TASKS}")
    state = json.loads((run_dir / "state.json").read_text())
    assert all(m["world_size"] == 2 for m in state["task_meta"].values())
    for group in ("ref", "own"):
        _assert_same(_stats(run_dir, group), _stats(inline_dir, group))
    check_no_per_sample_tensors(run_dir, three_tasks)


def test_d_resume_rebuilds_the_statistics_of_committed_tasks(three_tasks, tmp_path):
    """PEARL (task 0 trains the reference every statistic is taken through), interrupted after
    two tasks and resumed: its statistics, the retrained task's included, are an uninterrupted
    run's, bit for bit (inline runner, CPU)."""
    from cldist.cli import main
    clean_dir, cut_dir = tmp_path / "clean", tmp_path / "cut"
    clean = _run(three_tasks, clean_dir, "runner=inline", *PEARL_SHORT)
    shutil.copytree(clean_dir, cut_dir)  # resume works in the directory it is given
    state_file = cut_dir / "state.json"
    state = json.loads(state_file.read_text())
    state.update(completed_tasks=[0, 1], accuracy_matrix=state["accuracy_matrix"][:2],
                 status="interrupted")
    state["task_meta"].pop("2")
    state["params_per_task"].pop("2")
    state_file.write_text(json.dumps(state))
    (cut_dir / "metrics.json").unlink()
    shutil.rmtree(cut_dir / "tasks" / "002")  # its statistics are what resume must rebuild

    assert main(["resume", str(cut_dir)]) == 0
    resumed = json.loads((cut_dir / "metrics.json").read_text())
    assert json.loads(state_file.read_text())["completed_tasks"] == list(range(N_TASKS))
    for group in ("ref", "own"):
        for t in range(N_TASKS):  # task by task: the retrained task's own statistics too
            _assert_same(_stats(cut_dir, group, [t]), _stats(clean_dir, group, [t]), rtol=0)
        _assert_same(_stats(cut_dir, group), _stats(clean_dir, group), rtol=0)
    assert resumed["accuracy_matrix"] == clean["accuracy_matrix"]
    check_no_per_sample_tensors(cut_dir, three_tasks)


def check_no_per_sample_tensors(run_dir: Path, data: Path) -> None:
    """(c) Every tensor of every safetensors file in the run directory (Ray Train's copies
    included) has no dimension equal to a task's number of training images - the shape any
    per-sample feature or image tensor would have (120 here; the test ViT's tensors have 2, 4,
    16, 17, 64, 192 and the ranks <= 64) - and nothing lies outside the documented layout."""
    manifest = json.loads((data / "manifest.json").read_text())
    n_train = {int(t["n_train"]) for t in manifest["tasks"]}
    assert n_train == {120}, n_train  # the sizes the shapes above are chosen against
    files = list(run_dir.rglob("*.safetensors"))
    assert files
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                assert not n_train & set(shape), f"{path}: {key} has shape {shape}"
    top = {p.name for p in run_dir.iterdir()}
    assert top - RUN_FILES - RUN_DIRS == set(), top
    assert {p.name for p in (run_dir / "tasks").iterdir()} == {f"{t:03d}" for t in range(N_TASKS)}
    for t in range(N_TASKS):
        task = run_dir / "tasks" / f"{t:03d}"
        meta = json.loads((task / "meta.json").read_text())
        assert {p.name for p in task.iterdir()} == {"meta.json", *meta["tensor_files"]}
        assert {Path(n).stem for n in meta["tensor_files"]} <= TASK_STEMS
        assert f"{STATS_STEM}.safetensors" in meta["tensor_files"]
        assert set(meta["statistics_dims"]) <= {"ref", "own"}
