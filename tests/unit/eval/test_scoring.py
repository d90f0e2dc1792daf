"""cldist.eval.scoring.Scorer directly, on a finished two-task PEARL run (tests/unit/conftest.py):
each test set holds exactly its task's classes, every block scores a sub-network on a test
set within that sub-network's classes, a fresh Scorer gives the same blocks, the Class-IL
row follows from the blocks, and a task file that does not fit the model is refused by name."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cldist.errors import UserError
from cldist.assemble import make_scorer
from cldist.eval.scoring import row_from_blocks, task_il_from_blocks

PAIRS = [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.fixture(scope="module")
def scorer(inline_run):
    cfg, run_dir, _ = inline_run
    return make_scorer(cfg, run_dir)


def test_each_test_set_holds_its_tasks_classes(scorer):
    offsets = scorer.manifest.class_offsets()
    for j, task in enumerate(scorer.manifest.tasks):
        images, labels = scorer.test_set(j)
        assert images.shape[0] == labels.shape[0] == task.n_test
        assert set(labels.tolist()) == set(range(offsets[j], offsets[j] + len(task.classes)))


def test_blocks_score_each_subnetwork_within_its_own_classes(scorer):
    offsets = scorer.manifest.class_offsets()
    blocks = {(b.subnet, b.test): b for b in scorer.score_blocks(PAIRS)}
    assert sorted(blocks) == PAIRS
    for (i, j), block in blocks.items():
        n_i, n_j = len(scorer.manifest.tasks[i].classes), scorer.manifest.tasks[j].n_test
        assert block.label.shape == block.best.shape == (n_j,)
        assert block.log_probs.shape == (n_j, n_i)
        assert set(block.label.tolist()) <= set(range(offsets[i], offsets[i] + n_i))
        np.testing.assert_allclose(np.exp(block.log_probs).sum(axis=1), 1.0, rtol=1e-5)


def test_a_fresh_scorer_reads_the_same_model_back(scorer, inline_run):
    cfg, run_dir, _ = inline_run
    again = {(b.subnet, b.test): b for b in make_scorer(cfg, run_dir).score_blocks(PAIRS)}
    for block in scorer.score_blocks(PAIRS):
        other = again[(block.subnet, block.test)]
        assert np.array_equal(block.label, other.label)
        np.testing.assert_allclose(block.best, other.best, rtol=1e-5, atol=1e-6)


def test_rows_follow_from_the_blocks(scorer):
    blocks = {(b.subnet, b.test): b for b in scorer.score_blocks(PAIRS)}
    labels = {j: scorer.test_labels(j) for j in (0, 1)}
    # after task 0 only sub-network 0 votes: its own accuracy on test set 0
    assert row_from_blocks(0, blocks, labels) == [
        100.0 * float((blocks[(0, 0)].label == labels[0]).mean())]
    # after task 1 each sample goes to the sub-network with the larger top logit
    row = row_from_blocks(1, blocks, labels)
    for j in (0, 1):
        pick = np.where(blocks[(0, j)].best >= blocks[(1, j)].best, blocks[(0, j)].label,
                        blocks[(1, j)].label)
        assert row[j] == pytest.approx(100.0 * float((pick == labels[j]).mean()))
    assert task_il_from_blocks(1, blocks, labels) == pytest.approx(
        100.0 * float((blocks[(1, 1)].label == labels[1]).mean()))


def test_a_task_file_that_does_not_fit_is_refused_by_name(inline_run, tmp_path):
    cfg, run_dir, _ = inline_run
    copy = shutil.copytree(run_dir, tmp_path / "run")
    head = copy / "tasks" / "001" / "head.safetensors"
    tensors = load_file(str(head))
    save_file({k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim == 2 else v
               for k, v in tensors.items()}, str(head))
    with pytest.raises(UserError, match="head.safetensors"):
        make_scorer(cfg, copy).score_blocks([(1, 1)])
