"""edgeq.informativeness against hand-computed values (paper eqs. 2 and 15)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeq.errors import EdgeqError, PosteriorError
from edgeq.informativeness import info, layer_informativeness
from edgeq.posterior import LayerPosterior


def test_info_is_abs_mu_over_sigma():
    got = info(np.array([-2.0, 1.0, 0.0]), np.array([1.0, 4.0, 2.0]))
    np.testing.assert_allclose(got, [2.0, 0.25, 0.0])


def test_info_keeps_shape():
    assert info(np.ones((3, 2, 4)), np.full((3, 2, 4), 0.5)).shape == (3, 2, 4)


@pytest.mark.parametrize("sigma", [np.array([1.0, 0.0]), np.array([1.0, -1.0]), np.array([1.0, np.nan])])
def test_info_rejects_bad_sigma(sigma):
    with pytest.raises(PosteriorError, match="sigma"):
        info(np.array([1.0, 2.0]), sigma)


def test_info_rejects_shape_mismatch():
    with pytest.raises(PosteriorError, match="shape"):
        info(np.ones(3), np.ones(2))


def test_mean_aggregate_eq2():
    posts = [
        LayerPosterior("a", np.array([[1.0, -3.0], [0.0, 2.0]]), np.array([[1.0, 1.0], [1.0, 4.0]])),
        LayerPosterior("b", np.array([0.5, 0.5]), np.array([0.25, 0.5])),
    ]
    got = layer_informativeness(posts)
    assert got == pytest.approx({"a": (1 + 3 + 0 + 0.5) / 4, "b": (2 + 1) / 2})


def test_entropy_aggregate_eq15():
    # info = [1, 1, 2] -> p = [1/4, 1/4, 1/2]
    post = LayerPosterior("a", np.array([1.0, -1.0, 2.0]), np.ones(3))
    h = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    got = layer_informativeness([post], aggregate="entropy")["a"]
    assert got == pytest.approx(1 - h / math.log(3))


def test_entropy_extremes():
    flat = LayerPosterior("flat", np.full(16, 0.3), np.full(16, 0.1))
    spike = LayerPosterior("spike", np.r_[5.0, np.zeros(15)], np.ones(16))
    zero = LayerPosterior("zero", np.zeros(8), np.ones(8))
    one = LayerPosterior("one", np.array([2.0]), np.array([1.0]))
    got = layer_informativeness([flat, spike, zero, one], aggregate="entropy")
    assert got["flat"] == pytest.approx(0.0, abs=1e-12)
    assert got["spike"] == pytest.approx(1.0)
    assert got["zero"] == 0.0 and got["one"] == 0.0


def test_bad_aggregate_names_allowed_values():
    post = LayerPosterior("a", np.ones(4), np.ones(4))
    with pytest.raises(EdgeqError, match="mean.*entropy"):
        layer_informativeness([post], aggregate="median")


def test_empty_and_duplicate_posteriors():
    with pytest.raises(PosteriorError):
        layer_informativeness([])
    p = LayerPosterior("a", np.ones(4), np.ones(4))
    with pytest.raises(PosteriorError, match="duplicate"):
        layer_informativeness([p, p])
