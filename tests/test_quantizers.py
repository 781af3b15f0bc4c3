"""edgeq.quantizers: hand-computed grids, Lloyd-Max monotonicity, plan-driven quantize, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeq.errors import PlanError
from edgeq.plan import LayerBits
from edgeq.quantizers import gaussian_quantile, lloyd_max, quantize, uniform

# Standard normal quantiles from tables (independent of scipy): Phi^-1(0.125), Phi^-1(0.25), Phi^-1(0.75).
Z125, Z25 = -1.1503493803760079, -0.6744897501960817


def test_uniform_hand_example():
    q, levels = uniform(np.array([0.4, 0.6, 1.4, -5.0, 7.0, 2.2]), 2, lo=0.0, hi=3.0)
    np.testing.assert_allclose(levels, [0, 1, 2, 3])
    np.testing.assert_allclose(q, [0, 1, 1, 0, 3, 2])


def test_uniform_default_range_is_p5_p95():
    x = np.arange(101, dtype=float)  # P5 = 5 and P95 = 95 exactly
    q, levels = uniform(x, 2)
    np.testing.assert_allclose(levels, [5, 35, 65, 95])
    assert q[40] == pytest.approx(35) and q[0] == pytest.approx(5) and q[100] == pytest.approx(95)


def test_uniform_constant_range():
    q, levels = uniform(np.full(10, 0.3), 3)
    np.testing.assert_allclose(q, 0.3)
    np.testing.assert_allclose(levels, [0.3])


def test_uniform_rejects_inverted_range():
    with pytest.raises(PlanError, match="swap"):
        uniform(np.arange(8.0), 2, lo=3.0, hi=1.0)


def test_gaussian_quantile_one_bit():
    q, levels = gaussian_quantile(np.array([-1.0, 1.0, -1.0, 1.0]), 1)  # mean 0, std 1
    np.testing.assert_allclose(levels, [Z25, -Z25])
    np.testing.assert_allclose(q, [Z25, -Z25, Z25, -Z25])


def test_gaussian_quantile_two_bits_midpoints_and_tails():
    a = np.sqrt(1.75)  # [-a, -0.5, 0.5, a] has mean 0 and (population) std 1
    q, levels = gaussian_quantile(np.array([-a, -0.5, 0.5, a]), 2)
    # boundaries Phi^-1(1/4, 2/4, 3/4) = Z25, 0, -Z25; inner levels are midpoints, tails Phi^-1(1/8), (7/8)
    np.testing.assert_allclose(levels, [Z125, Z25 / 2, -Z25 / 2, -Z125])
    np.testing.assert_allclose(q, [Z125, Z25 / 2, -Z25 / 2, -Z125])


def test_gaussian_quantile_scales_with_fit():
    x = np.array([-1.0, 1.0, -1.0, 1.0]) * 3 + 10
    _, levels = gaussian_quantile(x, 1)
    np.testing.assert_allclose(levels, [10 + 3 * Z25, 10 - 3 * Z25])


def test_lloyd_max_two_clusters():
    q, levels = lloyd_max(np.array([0.0, 1, 2, 10, 11, 12]), 1)
    np.testing.assert_allclose(levels, [1, 11])
    np.testing.assert_allclose(q, [1, 1, 1, 11, 11, 11])


def test_lloyd_max_weighted_centroids():
    _, levels = lloyd_max(np.array([0.0, 2, 10, 12]), 1, weights=np.array([3.0, 1, 1, 3]))
    np.testing.assert_allclose(levels, [0.5, 11.5])


def test_lloyd_max_error_non_increasing():
    rng = np.random.default_rng(1)
    x = rng.laplace(0, 1, 3000)
    w = rng.uniform(0.5, 2.0, x.size)
    errs = [np.sum(w * (lloyd_max(x, 3, weights=w, iters=k)[0] - x) ** 2) for k in range(25)]
    assert np.all(np.diff(errs) <= 1e-9 * errs[0])
    assert errs[-1] < errs[0]


def test_lloyd_max_empty_cells_keep_level():
    x = np.r_[np.zeros(10), np.ones(2)]  # initial quantiles collide, so cells start empty
    q, levels = lloyd_max(x, 2)
    assert levels.size == 4 and np.all(np.isfinite(levels)) and np.all(np.diff(levels) >= 0)
    np.testing.assert_allclose(q, x)


def test_lloyd_max_keeps_shape():
    x = np.random.default_rng(0).normal(size=(4, 5, 6))
    assert lloyd_max(x, 2)[0].shape == (4, 5, 6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.integers(1, 6), n=st.integers(64, 400))
def test_at_most_2_pow_bits_values(seed, bits, n):
    x = np.random.default_rng(seed).standard_t(3, n)
    for fn in (uniform, gaussian_quantile, lloyd_max):
        q, levels = fn(x, bits)
        assert np.unique(q).size <= 2**bits
        assert np.all(np.diff(levels) >= 0) and levels.size <= 2**bits
        assert np.all(np.isin(q, levels))


@pytest.mark.parametrize("fn", [uniform, lloyd_max])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mse_non_increasing_in_bits(fn, seed):
    x = np.random.default_rng(seed).normal(0, 0.05, 5000)
    mse = [np.mean((fn(x, b)[0] - x) ** 2) for b in range(1, 9)]
    assert np.all(np.diff(mse) <= 0)


def test_quantize_uniform_uses_stored_range():
    x = np.array([0.4, 0.6, 1.4, -5.0, 7.0])
    np.testing.assert_allclose(quantize(x, LayerBits(2, "uniform", lo=0.0, hi=3.0)), [0, 1, 1, 0, 3])


def test_quantize_uniform_without_range_uses_percentiles():
    x = np.arange(101, dtype=float).reshape(1, 101)
    got = quantize(x, LayerBits(2))
    assert got.shape == x.shape and set(np.unique(got)) == {5.0, 35.0, 65.0, 95.0}


def test_quantize_uniform_small_kernel_is_allowed():
    # a fixed grid needs no data to fit: an 8-bit plan on a 10-weight kernel still quantizes
    x = np.linspace(-1, 1, 10)
    assert np.unique(quantize(x, LayerBits(8, lo=-1.0, hi=1.0))).size == 10


def test_quantize_projects_onto_levels():
    levels = (-1.0, -0.2, 0.1, 2.0)
    x = np.random.default_rng(0).normal(0, 1, (7, 9))
    got = quantize(x, LayerBits(2, "quantile", levels=levels))
    lv = np.array(levels)
    want = lv[np.argmin(np.abs(x[..., None] - lv), axis=-1)]  # brute-force nearest level
    np.testing.assert_allclose(got, want)


def test_quantize_fits_when_levels_missing():
    x = np.random.default_rng(0).normal(0, 1, 500)
    np.testing.assert_allclose(quantize(x, LayerBits(3, "lloyd_max")), lloyd_max(x, 3)[0])
    np.testing.assert_allclose(quantize(x, LayerBits(3, "quantile")), gaussian_quantile(x, 3)[0])


def test_quantize_rejects_bad_plans():
    with pytest.raises(PlanError, match=">= 1"):
        quantize(np.ones(4), LayerBits(0))
    with pytest.raises(PlanError, match="levels"):
        quantize(np.ones(4), LayerBits(1, "quantile", levels=(0.0, 1.0, 2.0)))


@pytest.mark.parametrize("fn", [uniform, gaussian_quantile, lloyd_max])
def test_bad_bits_and_too_few_values(fn):
    with pytest.raises(PlanError, match=">= 1"):
        fn(np.arange(16.0), 0)
    with pytest.raises(PlanError, match="at most 3 bits"):
        fn(np.arange(10.0), 4)


def test_lloyd_max_rejects_bad_weights():
    with pytest.raises(PlanError, match="weights"):
        lloyd_max(np.arange(8.0), 1, weights=np.r_[np.ones(7), 0.0])
