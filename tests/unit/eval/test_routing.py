"""The statistics router's maths (cldist.coordinator.statistics, cldist.eval.routing)."""
from __future__ import annotations

import itertools

import pytest
import torch

from cldist.coordinator.statistics import (ClassStatistics, merge_all, random_projection,
                                           router_features)
from cldist.coordinator.discriminant import LinearDiscriminant
from cldist.eval.routing import class_task_index, routed_decision, task_log_posterior, top_tasks


def _pooled(x: torch.Tensor, y: torch.Tensor, classes) -> tuple:
    """Counts, sums and within-class scatter of all the data at once, the textbook way."""
    x = x.double()
    counts = torch.tensor([float((y == c).sum()) for c in classes], dtype=torch.float64)
    sums = torch.stack([x[y == c].sum(0) for c in classes])
    scatter = sum((x[y == c] - x[y == c].mean(0)).T @ (x[y == c] - x[y == c].mean(0))
                  for c in classes)
    return counts, sums, scatter


def test_merged_statistics_equal_the_pooled_data_in_any_order():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 6, generator=g) * 3 + 5  # an offset mean: centring must be exact
    y = torch.randint(0, 4, (90,), generator=g)
    # four parts that share classes (a class split across parts needs Chan's correction)
    parts = [ClassStatistics.from_features(x[i::4], y[i::4], range(4)) for i in range(4)]
    counts, sums, scatter = _pooled(x, y, range(4))
    for order in itertools.permutations(range(4)):
        merged = merge_all(parts[i] for i in order)
        assert torch.equal(merged.counts, counts)
        torch.testing.assert_close(merged.sums, sums, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(merged.scatter, scatter, rtol=1e-12, atol=1e-9)
    # tasks with disjoint classes: the merge is a plain sum of scatters
    a = ClassStatistics.from_features(x[y < 2], y[y < 2], [0, 1])
    b = ClassStatistics.from_features(x[y >= 2], y[y >= 2], [2, 3])
    torch.testing.assert_close(b.merge(a).scatter, scatter, rtol=1e-12, atol=1e-9)
    assert b.merge(a).classes.tolist() == [0, 1, 2, 3]


def test_moments_round_trip_is_what_data_parallel_ranks_reduce():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=g) + 2, torch.randint(0, 2, (40,), generator=g)
    halves = [ClassStatistics.from_features(x[i::2], y[i::2], [0, 1]) for i in range(2)]
    summed = {k: halves[0].moments()[k] + halves[1].moments()[k] for k in ("counts", "sums", "second")}
    reduced = ClassStatistics.from_moments(halves[0].classes, **summed)
    torch.testing.assert_close(reduced.scatter, _pooled(x, y, [0, 1])[2], rtol=1e-12, atol=1e-9)


def test_statistics_round_trip_through_tensors_and_refuse_bad_shapes():
    s = ClassStatistics.from_features(torch.randn(10, 3), torch.tensor([0, 1] * 5), [0, 1])
    back = ClassStatistics.from_tensors(s.to_tensors("ref."), "ref.")
    assert torch.equal(back.scatter, s.scatter) and torch.equal(back.classes, s.classes)
    bad = s.to_tensors()
    bad["scatter"] = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="stats.safetensors: inconsistent shapes"):
        ClassStatistics.from_tensors(bad, origin="stats.safetensors")
    with pytest.raises(ValueError, match="not among the classes"):
        ClassStatistics.from_features(torch.randn(2, 3), torch.tensor([0, 5]), [0, 1])


def _blobs(n_per_class: int, dim: int, n_classes: int, seed: int, spread: float = 4.0,
           noise_seed: int = 0):
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(seed)) * spread
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    noise = torch.randn(len(y), dim, generator=torch.Generator().manual_seed(noise_seed))
    return centres[y] + noise, y


def test_lda_separates_gaussian_classes_it_has_statistics_of():
    x, y = _blobs(50, 8, 6, seed=2)
    xt, yt = _blobs(50, 8, 6, seed=2, noise_seed=1)  # the same classes, unseen samples
    stats = ClassStatistics.from_features(x, y, range(6))
    lda = LinearDiscriminant.fit(stats, shrinkage=0.1)
    assert float((lda.predict(xt) == yt).float().mean()) > 0.95
    # a class without samples is never predicted
    stats.counts[3], stats.sums[3] = 0.0, 0.0
    assert 3 not in LinearDiscriminant.fit(stats, 0.1).predict(xt).tolist()


def test_singular_covariance_and_one_class_tasks_are_handled():
    # more dimensions (64) than samples (6): the scatter has rank <= 4
    x, y = _blobs(3, 64, 2, seed=3, spread=6.0, noise_seed=3)
    stats = ClassStatistics.from_features(x, y, [0, 1])
    assert torch.linalg.matrix_rank(stats.scatter) < 64
    lda = LinearDiscriminant.fit(stats, shrinkage=0.1)
    assert torch.isfinite(lda.scores(x)).all()
    assert lda.predict(x).tolist() == y.tolist()
    # shrinkage 0 on that singular scatter still gives finite scores (pseudo-inverse)
    assert torch.isfinite(LinearDiscriminant.fit(stats, shrinkage=0.0).scores(x)).all()
    # one-class tasks: no within-class spread in either, only the merge gives a covariance
    one = [ClassStatistics.from_features(x[y == c], y[y == c], [c]) for c in (0, 1)]
    assert float(one[0].scatter.abs().sum()) > 0  # three samples of class 0 still vary
    single = ClassStatistics.from_features(x[:1], y[:1], [0])
    assert float(single.scatter.abs().sum()) == 0.0
    lda = LinearDiscriminant.fit(merge_all([single, one[1]]), shrinkage=0.1)
    assert torch.isfinite(lda.scores(x)).all()
    assert lda.predict(x[:1]).tolist() == [0]


def test_task_posterior_sums_class_posteriors_per_task():
    class_task = class_task_index([2, 3, 1])
    logits = torch.randn(7, 6, dtype=torch.float64)
    clp = torch.log_softmax(logits, dim=1)
    tlp = task_log_posterior(clp, class_task, 3)
    p = clp.exp()
    expected = torch.stack([p[:, :2].sum(1), p[:, 2:5].sum(1), p[:, 5:].sum(1)], dim=1)
    torch.testing.assert_close(tlp.exp(), expected)
    assert top_tasks(tlp, 2).tolist() == expected.topk(2, dim=1).indices.tolist()


def test_routing_every_task_is_the_posterior_weighted_ensemble():
    g = torch.Generator().manual_seed(4)
    sizes = [2, 2, 3, 2]
    class_task = class_task_index(sizes)
    clp = torch.log_softmax(torch.randn(50, 9, generator=g, dtype=torch.float64), dim=1)
    tlp = task_log_posterior(clp, class_task, 4)
    head_logits = torch.randn(50, 9, generator=g)
    head = torch.cat([torch.log_softmax(head_logits[:, class_task == t], dim=1) for t in range(4)], 1)
    routed = top_tasks(tlp, 4)
    pred = routed_decision("posterior_head", clp, tlp, head, class_task, routed)
    # P(c|x) = P(t(c)|x) P(c|x,t(c)): the mixture, computed without any routing
    mixture = tlp.exp()[:, class_task] * head.double().exp()
    assert pred.tolist() == mixture.argmax(dim=1).tolist()
    # top-1 routing takes the best task's head; the other rules stay inside the routed tasks
    top1 = routed_decision("top1", clp, tlp, head, class_task, routed)
    assert (class_task[top1] == routed[:, 0]).all()
    routed2 = top_tasks(tlp, 2)
    for rule in ("posterior_head", "lda_head"):
        pred2 = routed_decision(rule, clp, tlp, head, class_task, routed2)
        assert ((class_task[pred2][:, None] == routed2).any(dim=1)).all()
    with pytest.raises(ValueError, match="unknown routed decision rule"):
        routed_decision("vote", clp, tlp, head, class_task, routed)


def test_random_projection_is_seeded_and_relu():
    w = random_projection(5, 11, seed=3)
    assert torch.equal(w, random_projection(5, 11, seed=3))
    assert not torch.equal(w, random_projection(5, 11, seed=4))
    h = router_features(torch.randn(4, 5), w)
    assert h.shape == (4, 11) and float(h.min()) >= 0.0
    assert (h == 0).any()  # the ReLU did cut something
