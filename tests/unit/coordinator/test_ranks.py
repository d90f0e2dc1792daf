"""PEARL's rank rule: explained-variance rank, task-vector SVD, dynamic thresholds."""
import math

import pytest
import torch

from cldist.coordinator.ranks import (THRESHOLD_RULES, RankDecision, allocate_rank,
                                      normalized_distance, rank_for_threshold, task_vector_svd)

# s = [10, 5, 2, 0.5, 0.1]  ->  s^2 = [100, 25, 4, 0.25, 0.01], total 129.26
# cumulative explained variance:
#   k=1: 100    / 129.26 = 0.773634...
#   k=2: 125    / 129.26 = 0.967043...
#   k=3: 129    / 129.26 = 0.997989...
#   k=4: 129.25 / 129.26 = 0.999923...
#   k=5: 1
# float64: in float32, 0.1 and 0.5 are not the decimals, and the exact-boundary cases below
# would compare against fractions that differ from CUM by ~1e-9.
S = torch.tensor([10.0, 5.0, 2.0, 0.5, 0.1], dtype=torch.float64)
TOTAL = 129.26
CUM = [100 / TOTAL, 125 / TOTAL, 129 / TOTAL, 129.25 / TOTAL, 1.0]


def test_cumulative_fractions_by_hand():
    s2 = S.double().pow(2)
    torch.testing.assert_close(torch.cumsum(s2, 0) / s2.sum(),
                               torch.tensor(CUM, dtype=torch.float64))


@pytest.mark.parametrize("threshold, expected", [
    (0.0, 1),
    (0.5, 1),
    (0.77, 1),        # 0.7736 reaches it
    (0.8, 2),         # 0.7736 < 0.8 <= 0.9670
    (0.96, 2),
    (0.97, 3),        # 0.9670 < 0.97 <= 0.99799
    (0.99, 3),
    (0.998, 4),       # 0.99799 < 0.998 <= 0.999923
    (0.9999, 4),      # 0.9999 <= 0.999923
    (0.99995, 5),     # 0.999923 < 0.99995
    (1.0, 5),
    (1.5, 5),         # unreachable threshold -> the full rank
    (CUM[1], 2),      # exactly on a cumulative fraction: reached, not the next rank
    (CUM[0], 1),
])
def test_rank_for_threshold_table(threshold, expected):
    assert rank_for_threshold(S, threshold) == expected


@pytest.mark.parametrize("threshold, min_rank, max_rank, expected", [
    (0.5, 3, None, 3),      # k=1 raised to min_rank
    (0.99, 1, 2, 2),        # k=3 capped at max_rank
    (0.99, 4, None, 4),
    (0.99, 2, 3, 3),        # within bounds: untouched
    (0.5, 10, None, 5),     # min_rank beyond the spectrum -> the full rank
    (0.5, 10, 4, 4),        # ... or max_rank, whichever is smaller
    (1.0, 1, 100, 5),       # max_rank beyond the spectrum
    (0.5, 0, None, 1),      # never below 1
])
def test_rank_for_threshold_clamps(threshold, min_rank, max_rank, expected):
    assert rank_for_threshold(S, threshold, min_rank=min_rank, max_rank=max_rank) == expected


@pytest.mark.parametrize("min_rank, max_rank, expected", [
    (1, None, 1),
    (2, None, 2),
    (3, 2, 2),
    (9, None, 5),
])
def test_rank_for_threshold_zero_spectrum(min_rank, max_rank, expected):
    assert rank_for_threshold(torch.zeros(5), 0.9, min_rank, max_rank) == expected


def test_rank_for_threshold_dtype_and_round_off():
    # float32 spectrum: the sums run in float64; equal values split evenly
    s = torch.ones(4, dtype=torch.float32)
    assert rank_for_threshold(s, 0.5) == 2
    assert rank_for_threshold(s, 0.75) == 3
    assert rank_for_threshold(s, 0.7500001) == 4
    for threshold, expected in [(0.5, 1), (0.8, 2), (0.99, 3), (0.998, 4), (1.0, 5)]:
        assert rank_for_threshold(S.float(), threshold) == expected


# -- allocate_rank on a task vector with a known spectrum -----------------------------------------
def _orthonormal(n, k, gen):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q


def _task_pair(out, fan_in, s, seed=0, shape=None, dtype=torch.float32):
    """(W_ref, W_task, dW) with dW = U diag(s) V^T exactly (float64), reshaped to `shape`."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(s, dtype=torch.float64)
    U = _orthonormal(out, len(s), gen)
    V = _orthonormal(fan_in, len(s), gen)
    dw = (U * s) @ V.T
    shape = shape or (out, fan_in)
    w_ref = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (w_ref.to(dtype), (w_ref + dw.reshape(shape)).to(dtype), dw, U, V,
            w_ref)


def _truncation(U, s, V, k):
    s = torch.as_tensor(s, dtype=torch.float64)
    return (U[:, :k] * s[:k]) @ V[:, :k].T


@pytest.mark.parametrize("t_max, expected", [
    (0.5, 1), (0.8, 2), (0.97, 3), (0.99, 3), (0.998, 4), (1.0, 5),
])
def test_allocate_rank_fixed_threshold_matrix(t_max, expected):
    w_ref, w_task, dw, U, V, w_ref64 = _task_pair(12, 9, S.tolist(), seed=1)
    dec, B, A = allocate_rank(w_ref, w_task, rule="fixed", rule_params={"t_max": t_max},
                              return_factors=True)
    assert isinstance(dec, RankDecision)
    assert dec.rank == expected
    assert dec.threshold == t_max
    assert dec.distance == pytest.approx(TOTAL / float(w_ref64.pow(2).sum()), rel=1e-5)
    assert dec.explained == pytest.approx(CUM[expected - 1], rel=1e-5)
    assert B.shape == (12, expected) and A.shape == (expected, 9)
    assert B.dtype == A.dtype == torch.float32
    torch.testing.assert_close((B @ A).double(), _truncation(U, S, V, expected),
                               atol=1e-5, rtol=0)
    assert set(dec.to_dict()) == {"rank", "threshold", "distance", "explained"}


def test_allocate_rank_factors_split_sqrt_s():
    # B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T: both factors carry the same column/row norms
    w_ref, w_task, *_ = _task_pair(10, 7, [9.0, 4.0, 1.0], seed=2, dtype=torch.float64)
    _, B, A = allocate_rank(w_ref, w_task, rule="fixed", rule_params={"t_max": 1.0},
                            return_factors=True)
    torch.testing.assert_close(B.norm(dim=0), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(A.norm(dim=1), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("t_max, expected", [(0.5, 1), (0.8, 2), (0.99, 3)])
def test_allocate_rank_conv_weight(t_max, expected):
    shape = (8, 4, 3, 3)  # (out, in, kh, kw) -> an 8 x 36 matrix
    w_ref, w_task, dw, U, V, w_ref64 = _task_pair(8, 36, S.tolist(), seed=3, shape=shape)
    dec, B, A = allocate_rank(w_ref, w_task, rule="fixed", rule_params={"t_max": t_max},
                              return_factors=True)
    assert dec.rank == expected
    assert dec.distance == pytest.approx(TOTAL / float(w_ref64.pow(2).sum()), rel=1e-5)
    assert B.shape == (8, expected) and A.shape == (expected, 36)
    torch.testing.assert_close((B @ A).double(), _truncation(U, S, V, expected),
                               atol=1e-5, rtol=0)


def test_allocate_rank_rule_sets_threshold_and_clamps():
    w_ref, w_task, dw, *_ = _task_pair(12, 9, S.tolist(), seed=4)
    d = normalized_distance(w_ref, w_task)
    params = {"scale": d, "t_min": 0.5, "t_max": 0.95}  # d = c: halfway, T = 0.725
    dec = allocate_rank(w_ref, w_task, rule="squashed", rule_params=params)
    assert dec.threshold == pytest.approx(0.725)
    assert dec.rank == 1  # 0.7736 >= 0.725
    assert allocate_rank(w_ref, w_task, rule="squashed", rule_params=params, min_rank=3).rank == 3
    dec = allocate_rank(w_ref, w_task, rule="fixed", rule_params={"t_max": 0.99}, max_rank=2)
    assert dec.rank == 2
    assert dec.explained == pytest.approx(CUM[1], rel=1e-5)


def test_allocate_rank_zero_task_vector():
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(5))
    dec, B, A = allocate_rank(w, w.clone(), rule="fixed", min_rank=2, return_factors=True)
    assert dec.rank == 2
    assert dec.distance == 0.0
    assert dec.explained == 1.0
    assert B.shape == (6, 2) and A.shape == (2, 5)
    assert torch.count_nonzero(B @ A) == 0


def test_normalized_distance():
    w_ref = torch.tensor([[3.0, 4.0]])          # ||W_ref||^2 = 25
    w_task = torch.tensor([[3.0, 6.0]])         # ||dW||^2 = 4
    assert normalized_distance(w_ref, w_task) == pytest.approx(4 / 25)
    # a zero reference: the raw squared distance
    assert normalized_distance(torch.zeros(1, 2), w_task) == pytest.approx(45.0)


# -- randomised SVD path ------------------------------------------------------------------------
def _gapped(seed=6, noise=0.01):
    """200 x 150 task vector: three large singular values over a small noise floor."""
    w_ref, w_task, dw, U, V, _ = _task_pair(200, 150, [10.0, 8.0, 6.0], seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    w_task = w_task + noise * torch.randn(200, 150, generator=gen)
    return w_ref, w_task, U, V


def test_lowrank_path_is_taken():
    torch.manual_seed(0)  # svd_lowrank draws its random projection from the global generator
    w_ref, w_task, *_ = _gapped()
    U, S_, Vh, rest = task_vector_svd(w_ref, w_task, max_rank=4)
    assert S_.numel() == 4 + 8  # q = max_rank + oversample, not the full 150
    assert U.shape == (200, 12) and Vh.shape == (12, 150)
    assert rest > 0
    total = float((w_task - w_ref).double().pow(2).sum())
    assert float(S_.pow(2).sum()) + rest == pytest.approx(total, rel=1e-9)
    U, S_, Vh, rest = task_vector_svd(w_ref, w_task)  # no max_rank: the full SVD
    assert S_.numel() == 150 and rest == 0.0


@pytest.mark.parametrize("t_max, expected", [(0.4, 1), (0.75, 2), (0.95, 3), (0.999, 4)])
def test_lowrank_path_matches_full_path(t_max, expected):
    # s^2 = [100, 64, 36] + noise energy ~ 1e-4 * 30000 = 3 -> total ~ 203:
    # cumulative ~ 0.49, 0.81, 0.985, then the noise floor (0.999 is capped by max_rank=4)
    torch.manual_seed(0)
    w_ref, w_task, U, V = _gapped()
    params = {"t_max": t_max}
    full = allocate_rank(w_ref, w_task, rule="fixed", rule_params=params, max_rank=200)
    low, B, A = allocate_rank(w_ref, w_task, rule="fixed", rule_params=params, max_rank=4,
                              return_factors=True)
    assert low.rank == expected
    assert min(full.rank, 4) == expected
    assert low.distance == pytest.approx(full.distance, rel=1e-9)
    if expected <= 3:
        assert full.rank == expected
        assert low.explained == pytest.approx(full.explained, rel=1e-4)
        truncated = _truncation(U, [10.0, 8.0, 6.0], V, expected)
        assert B.shape == (200, expected) and A.shape == (expected, 150)
        # the noise (0.01 per entry) perturbs the top factors only a little
        assert float((B @ A).double().sub(truncated).norm()) < 0.05 * float(truncated.norm())


def test_lowrank_path_flat_spectrum_caps_at_max_rank():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(7)
    w_ref = torch.randn(200, 150, generator=gen)
    w_task = w_ref + torch.randn(200, 150, generator=gen)  # noise: no dominant direction
    low = allocate_rank(w_ref, w_task, rule="fixed", rule_params={"t_max": 0.9}, max_rank=4)
    full = allocate_rank(w_ref, w_task, rule="fixed", rule_params={"t_max": 0.9}, max_rank=200)
    assert low.rank == 4
    assert full.rank > 4
    # the explained fraction is over the whole spectrum, not over the top q values
    assert low.explained < 0.2
    assert low.explained == pytest.approx(full_explained_at(w_ref, w_task, 4), rel=0.05)


def full_explained_at(w_ref, w_task, k):
    s2 = torch.linalg.svdvals((w_task - w_ref).double()).pow(2)
    return float(s2[:k].sum() / s2.sum())


# -- threshold rules ----------------------------------------------------------------------------
DISTANCES = [0.0, 1e-6, 1e-5, 1e-4, 5e-4, 1e-3, 2e-3, 1e-2, 0.1, 1.0, 100.0]


@pytest.mark.parametrize("params", [
    {},
    {"scale": 1e-2, "t_min": 0.3, "t_max": 0.99},
    {"scale": 1e-4, "t_min": 0.6, "t_max": 0.9},
])
def test_squashed_monotone_and_bounded(params):
    rule = THRESHOLD_RULES["squashed"]
    lo, hi = params.get("t_min", 0.5), params.get("t_max", 0.95)
    values = [rule(d, params) for d in DISTANCES]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert all(lo <= v <= hi for v in values), values
    assert values[0] == pytest.approx(lo)
    c = params.get("scale", 1e-3)
    assert rule(c, params) == pytest.approx((lo + hi) / 2)
    assert rule(1e9 * c, params) == pytest.approx(hi, abs=1e-6)


def test_linear_rule():
    rule = THRESHOLD_RULES["linear"]
    p = {"scale": 1.0, "t_min": 0.2, "t_max": 0.9}
    assert rule(0.0, p) == pytest.approx(0.2)
    assert rule(0.5, p) == pytest.approx(0.5)
    assert rule(5.0, p) == pytest.approx(0.9)
    values = [rule(d, p) for d in DISTANCES]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_fixed_rule():
    rule = THRESHOLD_RULES["fixed"]
    assert rule(0.0, {}) == 0.95
    assert rule(123.0, {"t_max": 0.7}) == 0.7


def test_unknown_rule_raises():
    torch.manual_seed(0)
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="bogus"):
        allocate_rank(w, w + 1, rule="bogus")
    assert sorted(THRESHOLD_RULES) == ["fixed", "linear", "squashed"]
    assert math.isfinite(allocate_rank(w, w + 1).threshold)


def test_randomised_svd_is_deterministic_and_leaves_the_rng_alone():
    """The low-rank path must give the same rank whatever the global RNG state, and must not
    consume the caller's RNG (ranks computed in another process vs in-process must agree)."""
    from cldist.coordinator.ranks import allocate_rank
    g = torch.Generator().manual_seed(3)
    w_ref = torch.randn(200, 150, generator=g)
    w_task = w_ref + 0.01 * torch.randn(200, 150, generator=g)
    decisions = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        decisions.append(allocate_rank(w_ref, w_task, "fixed", {"t_max": 0.6}, 1, 4,
                                       return_factors=True))
        assert torch.equal(torch.get_rng_state(), before)
    (d1, B1, A1), (d2, B2, A2) = decisions
    assert d1 == d2 and torch.equal(B1, B2) and torch.equal(A1, A2)


def test_lora_product_svd_is_the_exact_spectrum_of_the_product():
    """QR of the factors + an r x r SVD gives dW = B A's thin SVD without forming dW."""
    from cldist.coordinator.ranks import lora_product_svd
    g = torch.Generator().manual_seed(0)
    B = torch.randn(96, 8, generator=g, dtype=torch.float64)
    A = torch.randn(8, 64, generator=g, dtype=torch.float64)
    U, S, Vh = lora_product_svd(B, A)
    dense = B @ A
    assert torch.allclose(S, torch.linalg.svdvals(dense)[:8], atol=1e-10)
    assert torch.allclose((U * S) @ Vh, dense, atol=1e-10)
    assert torch.allclose(U.T @ U, torch.eye(8, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(Vh @ Vh.T, torch.eye(8, dtype=torch.float64), atol=1e-10)
