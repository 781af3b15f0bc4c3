"""Bayesian Bits: decomposition, hard-concrete gates, AR regulariser, training and plans (real TF)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before tf_keras loads)
from edgeq.bayesian_bits import (
    BETA_T,
    GAMMA,
    HIGH_BITS,
    ZETA,
    BayesianBitsError,
    BBDense,
    bayesian_bits_plan,
    bb_quantize,
    bb_scales,
    deterministic_gate,
    expected_bops,
    hard_concrete,
    prob_nonzero,
    strip_bayesian_bits,
    to_bayesian_bits,
)
from edgeq.bops import bops
from edgeq.optimize import weight_layers
from edgeq.plan import BitPlan


def gates_up_to(top: int, dtype="float64") -> dict:
    """Gates 2..top on, the rest off (top=0: all off)."""
    import tensorflow as tf

    return {b: tf.constant(1.0 if b <= top else 0.0, dtype) for b in (2, *HIGH_BITS)}


def grid(x: np.ndarray, beta: float, b: int) -> np.ndarray:
    """Independent reference: the symmetric narrow-range b-bit grid, s_b = 2 beta / (2^b - 1)."""
    s = 2 * beta / (2**b - 1)
    k = np.clip(np.round(np.clip(x, -beta, beta) / s), -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1)
    return s * k


# ---------------------------------------------------------------- decomposition


def test_scale_recursion_by_hand():
    s = {b: float(v) for b, v in bb_scales(1.5).items()}
    assert s[2] == pytest.approx(1.0)  # 2 * 1.5 / 3
    assert s[4] == pytest.approx(0.2)  # 1 / (2^2 + 1)
    assert s[8] == pytest.approx(0.2 / 17)  # / (2^4 + 1)
    assert s[16] == pytest.approx(0.2 / 17 / 257)
    assert s[32] == pytest.approx(0.2 / 17 / 257 / 65537)
    for b, v in s.items():
        assert v == pytest.approx(3.0 / (2**b - 1), rel=1e-12)


def test_all_gates_on_is_the_32_bit_grid_and_close_to_x():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    beta = 0.8
    x = np.concatenate([rng.normal(0, 0.3, 2000), [beta, -beta, 0.0]])
    inside = np.abs(x) <= beta
    xq = bb_quantize(tf.constant(x), beta, gates_up_to(32)).numpy()
    s32 = 2 * beta / (2**32 - 1)
    # float64 keeps s_32 (~4e-10) resolvable; the telescoped sum is the 32-bit grid point itself.
    np.testing.assert_allclose(xq, grid(x, beta, 32), rtol=0, atol=s32 * 1e-3)
    assert np.all(np.abs(xq[inside] - x[inside]) <= s32 / 2 * (1 + 1e-3) + 1e-15)
    # Outside the range x is clipped: the top grid level (2^31 - 1) s_32, half a step inside beta.
    np.testing.assert_allclose(xq[~inside], np.sign(x[~inside]) * (beta - s32 / 2), rtol=0, atol=s32 * 1e-3)


@pytest.mark.parametrize("top", [2, 4, 8, 16])
def test_gates_cut_the_decomposition_at_each_width(top):
    import tensorflow as tf

    rng = np.random.default_rng(1)
    beta = 1.3
    x = np.concatenate([rng.uniform(-1.6, 1.6, 3000), [beta, -beta]])
    xq = bb_quantize(tf.constant(x), beta, gates_up_to(top)).numpy()
    np.testing.assert_allclose(xq, grid(x, beta, top), rtol=0, atol=1e-12)
    if top == 2:  # z_4 = 0 leaves only x_2: three levels, -s_2, 0, s_2
        assert set(np.round(xq / (2 * beta / 3), 9)) == {-1.0, 0.0, 1.0}


def test_z2_off_prunes_the_channel_only():
    import tensorflow as tf

    x = tf.constant(np.linspace(-1, 1, 12).reshape(4, 3))
    z = gates_up_to(8)
    z[2] = tf.constant([1.0, 0.0, 1.0], tf.float64)  # one gate per output channel (last axis)
    xq = bb_quantize(x, 1.0, z).numpy()
    assert np.all(xq[:, 1] == 0) and np.any(xq[:, 0] != 0)
    np.testing.assert_allclose(xq[:, [0, 2]], grid(x.numpy()[:, [0, 2]], 1.0, 8), atol=1e-12)


@pytest.mark.parametrize("top", [2, 8, 32])
def test_straight_through_gradient_is_one_inside_the_range(top):
    import tensorflow as tf

    x = tf.constant(np.linspace(-1.5, 1.5, 61), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(bb_quantize(x, 1.0, gates_up_to(top, "float32")))
    g = tape.gradient(y, x).numpy()
    inside = np.abs(x.numpy()) < 1.0
    np.testing.assert_allclose(g[inside], 1.0)
    np.testing.assert_allclose(g[np.abs(x.numpy()) > 1.0], 0.0)


# ---------------------------------------------------------------- hard-concrete gates


def test_prob_nonzero_closed_form_and_deterministic_gate():
    for la in (-3.0, -1.0, 0.0, 2.0):
        # P(z = 0) = P(stretched s <= 0) = P(s <= -gamma / (zeta - gamma)); invert the logistic noise.
        p0 = -GAMMA / (ZETA - GAMMA)
        p_zero = 1 / (1 + math.exp(-(BETA_T * math.log(p0 / (1 - p0)) - la)))
        assert float(prob_nonzero(la)) == pytest.approx(1 - p_zero, rel=1e-6)
    threshold = BETA_T * math.log(-GAMMA / ZETA)  # q = 0.5 here (about -1.599)
    got = deterministic_gate(np.array([threshold - 0.05, threshold + 0.05, 6.0], "float32")).numpy()
    np.testing.assert_array_equal(got, [0.0, 1.0, 1.0])


@pytest.mark.parametrize("la", [-1.0, 0.5, 2.0])
def test_hard_concrete_samples_match_the_closed_form(la):
    rng = np.random.default_rng(2)
    u = rng.uniform(1e-7, 1 - 1e-7, 200_000)
    z = hard_concrete(np.float64(la), u).numpy()
    assert z.min() >= 0 and z.max() <= 1
    q = float(prob_nonzero(np.float64(la)))
    p_one = 1 / (1 + math.exp(-(la - BETA_T * math.log((1 - GAMMA) / (ZETA - 1)))))
    assert np.mean(z > 0) == pytest.approx(q, abs=0.005)
    assert np.mean(z == 1) == pytest.approx(p_one, abs=0.005)
    # E[z] = integral over t in (0, 1) of P(z > t);
    # P(z > t) = sigmoid(la - beta_t logit((t - gamma) / (zeta - gamma))).
    t = np.linspace(0, 1, 20001)
    r = (t - GAMMA) / (ZETA - GAMMA)
    tail = 1 / (1 + np.exp(-(la - BETA_T * np.log(r / (1 - r)))))
    assert z.mean() == pytest.approx(np.trapezoid(tail, t), abs=0.005)


# ---------------------------------------------------------------- regulariser


def test_autoregressive_regulariser_on_a_small_layer():
    import tensorflow as tf

    layer = BBDense(3, lam=0.7, bop_weight=0.01, gate_lr_mult=100.0)
    layer.build((None, 4))
    la = {2: np.array([2.0, -1.0, 0.3]), 4: 1.0, 8: -0.5, 16: 3.0, 32: -2.0}
    for b, v in la.items():
        layer.set_gate_log_alpha(b, v)
    layer(tf.ones((1, 4)), training=False)

    def q(v):
        return 1 / (1 + np.exp(-(v - BETA_T * np.log(-GAMMA / ZETA))))

    expect = 0.0
    for c in range(3):  # each channel: a gate is charged for its added bits only when all lower gates are on
        prod = q(la[2][c])
        expect += 0.7 * 0.01 * prod * 2
        for b in HIGH_BITS:
            prod *= q(la[b])
            expect += 0.7 * 0.01 * prod * (b - b // 2)
    assert len(layer.losses) == 1
    assert float(layer.losses[0]) == pytest.approx(expect, rel=1e-5)


def test_model_regulariser_is_lam_times_expected_bop_fraction(tiny_keras, digits):
    bb = to_bayesian_bits(tiny_keras, lam=0.3, gate_lr_mult=1.0)
    bb.get_layer("fc1").set_gate_log_alpha(8, -0.2)
    bb.get_layer("conv1").set_gate_log_alpha(2, np.linspace(-3, 3, 8))
    bb(digits[0][:2], training=False)
    bops_32 = bops(bb, {"conv1": 32, "fc1": 32, "fc2": 32})
    assert float(sum(bb.losses)) == pytest.approx(0.3 * expected_bops(bb) / bops_32, rel=1e-5)


# ---------------------------------------------------------------- models, training, plans


def test_fresh_wrap_predicts_like_the_float_model(tiny_keras, digits):
    x = digits[0][:64]
    bb = to_bayesian_bits(tiny_keras)
    # Gates start on and 32-bit residuals are below float32 resolution, so outputs barely move.
    np.testing.assert_allclose(bb(x, training=False), tiny_keras(x), atol=1e-4)
    assert bayesian_bits_plan(bb).bits == {"conv1": 32, "fc1": 32, "fc2": 32}


@pytest.fixture(scope="module")
def trained(tiny_keras, digits):
    """tiny_keras wrapped at two lambdas, fine-tuned 2 epochs each: {lam: (bb_model, plan, accuracy)}."""
    import tensorflow as tf
    import tf_keras as keras

    x, y = digits
    out = {}
    for lam in (0.01, 1.0):
        tf.keras.utils.set_random_seed(1)
        bb = to_bayesian_bits(tiny_keras, lam=lam, gate_lr_mult=100.0)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        bb.compile(keras.optimizers.Adam(1e-3), loss, ["accuracy"])
        bb.fit(x[:1400], y[:1400], epochs=2, batch_size=32, verbose=0)
        acc = bb.evaluate(x[1400:], y[1400:], verbose=0)[1]
        out[lam] = (bb, bayesian_bits_plan(bb), acc)
    return out


def test_larger_lambda_gives_fewer_bits_and_bops(trained, tiny_keras):
    sizes = weight_layers(tiny_keras)
    (_, small, acc_small), (_, large, acc_large) = trained[0.01], trained[1.0]
    assert small.method == large.method == "bb"
    assert large.mean_bits(sizes) <= small.mean_bits(sizes)
    assert large.meta["bops"] <= small.meta["bops"]
    assert large.meta["bops"] < large.meta["bops_32"]  # lam = 1 must switch some gates off in 2 epochs
    assert large.meta["bops_kept"] <= large.meta["bops"]
    for plan in (small, large):
        assert set(plan.bits.values()) <= {0, 2, 4, 8, 16, 32}
        for lb in plan.layers.values():
            assert lb.lo == -lb.hi and lb.hi > 0
    assert min(acc_small, acc_large) > 0.7


def test_plan_round_trips_json(trained, tmp_path):
    plan = trained[1.0][1]
    assert BitPlan.load(plan.save(tmp_path / "bb.json")) == plan


def test_forced_off_z2_prunes_channels_and_all_pruned_is_zero_bits(trained, tiny_keras, digits):
    bb = trained[0.01][0]
    fc1 = bb.get_layer("fc1")
    saved = fc1.bb_log_alpha_2.numpy().copy()
    try:
        la = fc1.gate_log_alpha()[2].copy()
        la[[3, 17]] = -20.0
        fc1.set_gate_log_alpha(2, la)
        lb = bayesian_bits_plan(bb).layers["fc1"]
        assert {3, 17} <= set(lb.pruned_channels) and lb.bits >= 2
        # The inference model computes exactly that: the pruned units output relu(bias).
        h = bb.get_layer("fc1").output
        import tf_keras as keras

        hidden = keras.Model(bb.inputs, h)(digits[0][:5], training=False).numpy()
        np.testing.assert_allclose(hidden[:, 3], np.maximum(fc1.bias.numpy()[3], 0), atol=1e-6)
        stripped = strip_bayesian_bits(bb, tiny_keras)
        assert np.all(stripped.get_layer("fc1").kernel.numpy()[:, [3, 17]] == 0)

        fc1.set_gate_log_alpha(2, -20.0)
        lb = bayesian_bits_plan(bb).layers["fc1"]
        assert lb.bits == 0 and lb.pruned_channels == tuple(range(32))
    finally:
        fc1.bb_log_alpha_2.assign(saved)


def test_strip_carries_the_trained_float_weights(trained, tiny_keras, digits):
    bb = trained[1.0][0]
    stripped = strip_bayesian_bits(bb, tiny_keras, zero_pruned=False)
    assert type(stripped.get_layer("fc1")) is type(tiny_keras.get_layer("fc1"))
    for name in ("conv1", "fc1", "fc2"):
        np.testing.assert_array_equal(
            stripped.get_layer(name).kernel.numpy(), bb.get_layer(name).kernel.numpy()
        )
        np.testing.assert_array_equal(stripped.get_layer(name).bias.numpy(), bb.get_layer(name).bias.numpy())
    assert not np.array_equal(
        stripped.get_layer("fc1").kernel.numpy(), tiny_keras.get_layer("fc1").kernel.numpy()
    )


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors(tiny_keras):
    import tf_keras as keras

    with pytest.raises(BayesianBitsError, match="lam"):
        to_bayesian_bits(tiny_keras, lam=-0.1)
    with pytest.raises(BayesianBitsError, match="lam"):
        to_bayesian_bits(tiny_keras, lam=float("nan"))
    no_kernels = keras.Sequential(
        [keras.layers.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.ReLU()]
    )
    with pytest.raises(BayesianBitsError, match="no Conv2D or Dense"):
        to_bayesian_bits(no_kernels)
    with pytest.raises(BayesianBitsError, match="Bayesian Bits layers"):
        bayesian_bits_plan(tiny_keras)
