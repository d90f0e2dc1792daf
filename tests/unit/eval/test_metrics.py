"""Continual-learning metrics against a hand-computed 3-task accuracy matrix."""
import numpy as np
import pytest

from cldist.eval.metrics import (
    accuracy_after,
    accuracy_from_predictions,
    backward_transfer,
    forgetting_per_task,
    summarize,
)

# R[t][j] = accuracy on task j after training task t. Task 0 peaks after task 1 (85), so
# forgetting (max-based) and BWT (diagonal-based) differ.
R = [
    [80.0],
    [85.0, 70.0],
    [60.0, 65.0, 90.0],
]


def test_equal_test_sizes_by_hand():
    m = summarize(R)
    # A_0 = 80; A_1 = (85 + 70) / 2 = 77.5; A_2 = (60 + 65 + 90) / 3 = 215 / 3
    assert m["avg_acc_curve"] == pytest.approx([80.0, 77.5, 215.0 / 3])
    assert m["acc"] == pytest.approx(215.0 / 3)                      # 71.666...
    assert m["aaa"] == pytest.approx((80.0 + 77.5 + 215.0 / 3) / 3)  # 76.388...
    # forgetting_0 = max(80, 85) - 60 = 25; forgetting_1 = 70 - 65 = 5; mean 15
    assert m["forgetting_per_task"] == pytest.approx([25.0, 5.0])
    assert m["forgetting"] == pytest.approx(15.0)
    # BWT = ((60 - 80) + (65 - 70)) / 2 = -12.5
    assert m["bwt"] == pytest.approx(-12.5)


def test_unequal_test_sizes_by_hand():
    n_test = [100, 300, 100]
    m = summarize(R, n_test)
    # A_1 = (85*100 + 70*300) / 400 = 29500 / 400 = 73.75
    # A_2 = (60*100 + 65*300 + 90*100) / 500 = 34500 / 500 = 69.0
    assert m["avg_acc_curve"] == pytest.approx([80.0, 73.75, 69.0])
    assert m["acc"] == pytest.approx(69.0)
    assert m["aaa"] == pytest.approx((80.0 + 73.75 + 69.0) / 3)  # 74.25
    assert m["aaa"] == pytest.approx(74.25)
    # Forgetting and BWT are per-task quantities: test sizes do not enter.
    assert m["forgetting"] == pytest.approx(15.0)
    assert m["bwt"] == pytest.approx(-12.5)


def test_accuracy_after_weights():
    assert accuracy_after([85.0, 70.0]) == pytest.approx(77.5)
    assert accuracy_after([85.0, 70.0], [100, 300, 999]) == pytest.approx(73.75)
    assert accuracy_after([85.0, 70.0], [50, 50]) == pytest.approx(77.5)


def test_single_task_has_no_forgetting():
    m = summarize([[91.0]])
    assert m == {"acc": 91.0, "aaa": 91.0, "forgetting": 0.0, "bwt": 0.0,
                 "avg_acc_curve": [91.0], "forgetting_per_task": []}
    assert forgetting_per_task([[91.0]]) == []
    assert backward_transfer([[91.0]]) == 0.0


@pytest.mark.parametrize("bad", [[], [[1.0, 2.0]], [[1.0], [2.0]], [[1.0], [2.0, 3.0, 4.0]],
                                 [[1.0], [float("nan"), 2.0]]])
def test_malformed_matrix_is_a_clear_value_error(bad):
    with pytest.raises(ValueError, match="accuracy matrix"):
        summarize(bad)


def test_too_few_test_sizes():
    with pytest.raises(ValueError, match="n_test"):
        summarize(R, [100, 100])


def test_accuracy_from_predictions():
    assert accuracy_from_predictions([1, 2, 3, 4], [1, 2, 0, 4]) == pytest.approx(75.0)
    assert accuracy_from_predictions(np.array([0, 0]), np.array([1, 1])) == 0.0
    assert accuracy_from_predictions([], []) == 0.0
    torch = pytest.importorskip("torch")
    assert accuracy_from_predictions(torch.tensor([3, 1, 2]), torch.tensor([3, 1, 1])) \
        == pytest.approx(200.0 / 3)
    with pytest.raises(ValueError, match="length"):
        accuracy_from_predictions([1, 2], [1])
