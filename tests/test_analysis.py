"""Per-layer sensitivity and its R^2 against informativeness, on a real trained model."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq import bayes
from edgeq.analysis import r_squared, sensitivity
from edgeq.errors import ModelError


def test_r_squared_matches_the_correlation_of_a_line():
    rng = np.random.default_rng(0)
    x = rng.random(20)
    y = 3 * x + rng.normal(0, 0.1, 20)
    assert r_squared(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
    assert r_squared(x, 2 * x + 1) == pytest.approx(1.0)


def test_sensitivity_quantizes_one_layer_at_a_time(tiny_keras, digits):
    x, y = digits
    before = [w.copy() for w in tiny_keras.get_weights()]
    posts = bayes.posteriors(bayes.to_bayesian(tiny_keras, num_examples=1400, init_sigma=0.01))
    s = sensitivity(tiny_keras, (x[1400:], y[1400:]), bits=(1, 2, 8), posteriors=posts, tolerance=0.01)
    for a, b in zip(before, tiny_keras.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # restored
    assert s.layers == ["conv1", "fc1", "fc2"] and s.accuracy.shape == (3, 3)
    # 8 bits on one layer costs (almost) nothing; 1 bit on a layer hurts more than 8 bits does
    assert np.all(s.baseline - s.accuracy[:, 2] <= 0.01)
    assert np.all(s.accuracy[:, 0] <= s.accuracy[:, 2] + 1e-9)
    for i, n in enumerate(s.layers):
        ok = [b for j, b in enumerate(s.bits) if s.baseline - s.accuracy[i, j] <= 0.01]
        assert s.optimal_bits[n] == ok[0]
    assert set(s.informativeness) == set(s.layers)
    assert s.r2 is not None


def test_sensitivity_rejects_missing_layers(tiny_keras, digits):
    x, y = digits
    with pytest.raises(ModelError, match="no layers"):
        sensitivity(tiny_keras, (x[:10], y[:10]), layers=["nope"])
