"""The Bayesian twin: real TFP Flipout layers, means from the float model, KL / N, posteriors, M_det."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq import bayes
from edgeq.errors import ModelError


@pytest.fixture(scope="module")
def twin(tiny_keras):
    return bayes.to_bayesian(tiny_keras, num_examples=1400, init_sigma=0.01)


def test_twin_means_start_at_float_weights(tiny_keras, twin):
    import tensorflow_probability as tfp

    assert isinstance(twin.get_layer("conv1"), tfp.layers.Convolution2DFlipout)
    assert isinstance(twin.get_layer("fc1"), tfp.layers.DenseFlipout)
    for post in bayes.posteriors(twin):
        np.testing.assert_allclose(post.mu, tiny_keras.get_layer(post.name).get_weights()[0], rtol=1e-6)
        np.testing.assert_allclose(post.sigma, 0.01, rtol=1e-4)
    assert [p.name for p in bayes.posteriors(twin)] == ["conv1", "fc1", "fc2"]


def test_kl_is_divided_by_num_examples(tiny_keras, digits):
    import tensorflow as tf
    import tensorflow_probability as tfp

    x, _ = digits
    a = bayes.to_bayesian(tiny_keras, num_examples=100, prior_sigma=1.0)
    b = bayes.to_bayesian(tiny_keras, num_examples=400, prior_sigma=1.0)
    a(x[:2]), b(x[:2])
    # Independent reference: closed-form KL(N(mu, s) || N(0, 1)) summed over every kernel weight.
    ref = 0.0
    for post in bayes.posteriors(a):
        mu, s = post.mu, post.sigma
        ref += np.sum(np.log(1.0 / s) + (s**2 + mu**2) / 2.0 - 0.5)
    assert float(tf.add_n(a.losses)) == pytest.approx(ref / 100, rel=1e-4)
    assert float(tf.add_n(b.losses)) == pytest.approx(ref / 400, rel=1e-4)
    assert tfp is not None


def test_deterministic_twin_reproduces_float_model(tiny_keras, twin, digits):
    x, _ = digits
    det = bayes.to_deterministic(twin, tiny_keras)
    np.testing.assert_allclose(
        det.predict(x[:64], verbose=0), tiny_keras.predict(x[:64], verbose=0), atol=1e-5
    )


def test_training_moves_sigma_and_mc_evaluation(tiny_keras, digits):
    import tensorflow as tf
    import tf_keras as keras

    x, y = digits
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    bnn = bayes.train_bayesian(
        lambda: bayes.to_bayesian(tiny_keras, num_examples=1400, init_sigma=0.01),
        x[:1400],
        y[:1400],
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        epochs=2,
        lr=5e-3,
        strategy=strategy,
    )
    sig = np.concatenate([p.sigma.ravel() for p in bayes.posteriors(bnn)])
    assert not np.allclose(sig, 0.01, rtol=1e-3)
    q = bayes.mc_evaluate(bnn, x[1400:], y[1400:], samples=5)
    assert q.accuracy > 0.8 and 0.0 <= q.ece <= 1.0


def test_ece_matches_hand_computation():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]])
    y = np.array([0, 1, 1, 0])
    # bins of width 1/15: confidences 0.9, 0.6, 0.8, 0.55 fall in separate bins except none share.
    expected = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.8) + abs(1 - 0.55)) / 4
    assert bayes.expected_calibration_error(probs, y) == pytest.approx(expected)


def test_bad_inputs(tiny_keras):
    import tf_keras as keras

    with pytest.raises(ModelError, match="flipout"):
        bayes.to_bayesian(tiny_keras, num_examples=10, method="mcmc")
    no_weights = keras.Sequential([keras.layers.Input((4,)), keras.layers.Activation("relu")])
    with pytest.raises(ModelError, match="no Dense or Conv2D"):
        bayes.to_bayesian(no_weights, num_examples=10)
    with pytest.raises(ModelError, match="no variational layers"):
        bayes.posteriors(tiny_keras)
