"""Routed Class-IL for sub-network methods: both rules from the blocks, the true
routed execution, metrics.json keys, the Ray evaluator path and `cldist eval` of old runs."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cldist.config.compose import compose
from cldist.config.schema import RunConfig
from cldist.eval.metrics import accuracy_after
from cldist.eval.routing import class_log_posterior, class_task_index
from cldist.assemble import make_scorer
from cldist.eval.scoring import Scorer, fit_router, routed_row_from_blocks, row_from_blocks
from cldist.stream import run_stream

from tests.conftest import first_tasks, tiny_overrides

N_TASKS = 4  # > 1 + top_k, so routing runs fewer sub-networks than the ensemble


def _stream_data(tmp_path_factory, digits_dir):
    return first_tasks(digits_dir, tmp_path_factory.mktemp("routed-data"), N_TASKS)


def _overrides(data, run_dir, *extra):
    return tiny_overrides(data, run_dir, "method.epochs=1", "method.reference_epochs=2", *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory, digits_dir):
    return _stream_data(tmp_path_factory, digits_dir)


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("routed-inline") / "run"
    metrics = run_stream(compose(_overrides(data, run_dir, "runner=inline")))
    return metrics, run_dir


def _scorer(run_dir) -> Scorer:
    cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    return make_scorer(cfg, run_dir)


def _everything(scorer: Scorer, n: int):
    """Every block, label, reference feature and task statistics of the first n tasks."""
    blocks = {(b.subnet, b.test): b
              for b in scorer.score_blocks([(i, j) for i in range(n) for j in range(n)])}
    labels = {j: scorer.test_labels(j) for j in range(n)}
    features = scorer.reference_features(range(n))
    stats = scorer.task_statistics(range(n))
    return blocks, labels, features, [stats[t] for t in range(n)]


def test_metrics_json_has_both_rules(inline_run):
    metrics, run_dir = inline_run
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    for key in ("acc_routed", "acc_ensemble", "task_id_acc", "forwards_per_image",
                "accuracy_matrix_routed", "accuracy_matrix_ensemble", "class_il_rule"):
        assert key in on_disk, key
    n_test = on_disk["n_test"]
    assert on_disk["class_il_rule"] == "routed"  # the default for sub-network methods
    assert on_disk["acc"] == on_disk["acc_routed"]
    assert on_disk["accuracy_matrix"] == on_disk["accuracy_matrix_routed"]
    assert on_disk["acc_ensemble"] == pytest.approx(
        accuracy_after(on_disk["accuracy_matrix_ensemble"][-1], n_test))
    assert on_disk["forwards_per_image"] == {"routed": 3, "ensemble": N_TASKS}
    assert on_disk["forwards_per_image"]["routed"] < on_disk["forwards_per_image"]["ensemble"]
    task_id = on_disk["task_id_acc"]
    assert task_id["k"] == 2 and 0 <= task_id["top1"] <= task_id["top_k"] <= 100
    # the ensemble matrix is the paper's protocol, computed from the same blocks as before
    scorer = _scorer(run_dir)
    blocks, labels, features, stats = _everything(scorer, N_TASKS)
    assert on_disk["accuracy_matrix_ensemble"] == \
        [row_from_blocks(t, blocks, labels) for t in range(N_TASKS)]
    # the ensemble's argmax over every head can only lose to the argmax within the true task
    # (Task-IL), image by image; the routed default (lda_head) also weighs the statistics'
    # class posterior, so it may beat the heads' Task-IL, and here (random-init test ViT: weak
    # heads, a good discriminant) it does
    for row, til in zip(on_disk["accuracy_matrix_ensemble"], on_disk["task_il_accuracy_matrix"]):
        assert all(r <= t for r, t in zip(row, til))
    assert on_disk["routing"]["combine"] == "lda_head"


def test_score_routed_equals_block_rows(inline_run):
    """The true routed execution (reference + each image's top-k sub-networks, grouped by
    task) gives the final row that the blocks give, and the run recorded."""
    metrics, run_dir = inline_run
    scorer = _scorer(run_dir)
    blocks, labels, features, stats = _everything(scorer, N_TASKS)
    sizes = [len(labels[j]) for j in range(N_TASKS)]
    t = N_TASKS - 1
    for combine in ("posterior_head", "lda_head", "top1"):
        lda = fit_router(stats, 0.1, 2 * N_TASKS)
        from_blocks = routed_row_from_blocks(t, blocks, labels, features, lda, [2] * N_TASKS,
                                             2, combine)
        executed = scorer.score_routed(t, list(range(N_TASKS)), 2, combine, 0.1)
        assert executed.row == from_blocks.row, combine
        assert (executed.task_top1, executed.task_topk) == \
            (from_blocks.task_top1, from_blocks.task_topk)
        assert executed.forwards_per_image == 3.0 and executed.images == sum(sizes)
    routing = metrics["routing"]  # what the run used (the defaults)
    executed = scorer.score_routed(t, list(range(N_TASKS)), routing["top_k"], routing["combine"],
                                   routing["shrinkage"])
    assert executed.row == metrics["accuracy_matrix_routed"][-1]
    assert executed.task_id_acc == metrics["task_id_acc"]


def test_top_k_all_tasks_is_the_posterior_weighted_ensemble(inline_run):
    """top_k = T with posterior_head: argmax_c P(t(c)|x) P(c|x, t(c)), brute force from every
    block's softmax and the LDA's task posterior."""
    _, run_dir = inline_run
    scorer = _scorer(run_dir)
    blocks, labels, features, stats = _everything(scorer, N_TASKS)
    for t in range(1, N_TASKS):
        lda = fit_router(stats[:t + 1], 0.1, 2 * (t + 1))
        class_task = class_task_index([2] * (t + 1)).numpy()
        brute = []
        for j in range(t + 1):
            post = torch.softmax(class_log_posterior(lda, torch.from_numpy(features[j])),
                                 dim=1).numpy()
            task_post = np.stack([post[:, class_task == i].sum(1) for i in range(t + 1)], 1)
            within = np.concatenate([np.exp(blocks[(i, j)].log_probs.astype(np.float64))
                                     for i in range(t + 1)], axis=1)
            pred = (task_post[:, class_task] * within).argmax(1)
            brute.append(100.0 * float((pred == labels[j]).mean()))
        routed = routed_row_from_blocks(t, blocks, labels, features, lda, [2] * N_TASKS,
                                        t + 1, "posterior_head")
        assert routed.row == brute
        assert routed.task_topk == sum(len(labels[j]) for j in range(t + 1))  # every task runs
        executed = scorer.score_routed(t, list(range(t + 1)), t + 1, "posterior_head", 0.1)
        assert executed.row == brute and executed.forwards_per_image == 1 + t + 1


def test_eval_without_saved_statistics_rescores_the_same(inline_run, capsys):
    """An old run (no tasks/TTT/stats.safetensors): `cldist eval` collects the statistics
    from the training shards itself and scores as with them."""
    from safetensors.torch import save_file

    from cldist.cli import main
    from cldist.coordinator.statistics import statistics_tensors
    metrics, run_dir = inline_run
    old = run_dir.parent / "old-run"
    shutil.copytree(run_dir, old)
    paths = [old / "tasks" / f"{t:03d}" / "stats.safetensors" for t in range(N_TASKS)]
    if not all(p.is_file() for p in paths):  # a run made before task jobs saved statistics
        scorer = _scorer(old)
        for t, p in enumerate(paths):
            save_file(statistics_tensors({"ref": scorer.task_statistics([t])[t]}), str(p))
    capsys.readouterr()
    assert main(["eval", str(old)]) == 0
    with_stats = json.loads(capsys.readouterr().out)
    for p in paths:  # what a run made before task jobs saved statistics looks like
        p.unlink()
        meta = json.loads((p.parent / "meta.json").read_text())
        meta["tensor_files"] = [f for f in meta.get("tensor_files", []) if f != p.name]
        (p.parent / "meta.json").write_text(json.dumps(meta))
    assert main(["eval", str(old)]) == 0
    without = json.loads(capsys.readouterr().out)
    assert without == with_stats
    for key in ("acc", "acc_routed", "acc_ensemble", "accuracy_matrix_routed",
                "accuracy_matrix_ensemble", "task_id_acc", "forwards_per_image"):
        assert without[key] == metrics[key], key
    # the other rule on request: acc follows it
    assert main(["eval", str(old), "--class-il", "ensemble", "--top-k", "1"]) == 0
    ensemble = json.loads(capsys.readouterr().out)
    assert ensemble["acc"] == ensemble["acc_ensemble"] == metrics["acc_ensemble"]
    assert ensemble["class_il_rule"] == "ensemble"
    assert ensemble["forwards_per_image"] == {"routed": 2, "ensemble": N_TASKS}
    assert ensemble["task_id_acc"]["top_k"] == ensemble["task_id_acc"]["top1"]


def test_ray_runner_routes_like_inline(inline_run, data, tmp_path, ray_cluster):
    """The sharded evaluator actors give the inline runner's blocks, features and statistics:
    the same inline-trained run re-scored through them is the same to the bit; a whole run
    through the Ray runner (eval.class_il=ensemble) agrees up to training's float noise."""
    from cldist.distributed.runner import RayRunner
    from cldist.assemble import stream_evaluator
    from cldist.data.manifest import Manifest
    metrics, run_dir = inline_run
    cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    cfg.cluster.eval_actors = 2
    runner = RayRunner(cfg, run_dir)
    try:
        evaluator = stream_evaluator(cfg, Manifest.load(data), "subnetworks", runner)
        evaluator.tasks_finished([0, 2])  # out of order, as independent jobs finish
        evaluator.tasks_finished([1, 3])
    finally:
        runner.close()
    assert evaluator.rows_routed == metrics["accuracy_matrix_routed"]
    assert evaluator.rows_ensemble == metrics["accuracy_matrix_ensemble"]
    assert evaluator.class_il_metrics()["task_id_acc"] == metrics["task_id_acc"]

    ray_metrics = run_stream(compose(_overrides(data, tmp_path / "ray", "runner=ray",
                                                "eval.class_il=ensemble")))
    assert ray_metrics["class_il_rule"] == "ensemble"
    assert ray_metrics["acc"] == ray_metrics["acc_ensemble"]
    assert ray_metrics["accuracy_matrix"] == ray_metrics["accuracy_matrix_ensemble"]
    assert ray_metrics["forwards_per_image"] == metrics["forwards_per_image"]
    for rule in ("routed", "ensemble"):
        for row_a, row_b in zip(metrics[f"accuracy_matrix_{rule}"],
                                ray_metrics[f"accuracy_matrix_{rule}"]):
            assert row_b == pytest.approx(row_a, abs=2.0), rule
