"""Mixed-precision QAT reaches the flatbuffer: INT4 tensors, distinct-value bounds, verified storage."""

from __future__ import annotations

import numpy as np
import pytest

from deploy import export, flatbuffer, storage
from deploy.measure.tflm import run_tflm
from deploy.storage import lut
from edgeq.errors import ModelError, PlanError
from edgeq.optimize import quantize_model, weight_layers
from edgeq.plan import BitPlan


@pytest.fixture(scope="module")
def converted(tiny_keras, digits):
    """The tiny model after mixed-precision QAT (conv1 3, fc1 4, fc2 6 bits), converted."""
    import tf_keras as keras

    x, y = digits
    keras.utils.set_random_seed(0)  # the same QAT whatever ran before (the shuffle draws from the global RNG)
    plan = BitPlan.from_bits({"conv1": 3, "fc1": 4, "fc2": 6})
    qat = quantize_model(tiny_keras, plan)
    qat.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x[:1400], y[:1400], epochs=1, verbose=0)
    return export.convert(qat, x[:200]), plan


def test_weight_layers_counts_kernels(tiny_keras):
    # conv 3x3x1x8; flatten of 6x6x8 = 288 into 32 units; 32 into 10
    assert weight_layers(tiny_keras) == {"conv1": 3 * 3 * 1 * 8, "fc1": 288 * 32, "fc2": 32 * 10}


def test_bits_reach_the_flatbuffer(converted):
    model, plan = converted
    tensors = {t.op + str(t.shape): t for t in flatbuffer.weight_tensors(model)}
    # Dense layers deploy as 1x1 convolutions (edgeq.optimize.dense_as_conv): no FULLY_CONNECTED left.
    assert {t.op for t in tensors.values()} == {"CONV_2D"}
    conv = next(t for t in tensors.values() if t.shape == (8, 3, 3, 1))
    fc1 = next(t for t in tensors.values() if t.shape == (32, 1, 1, 288))
    fc2 = next(t for t in tensors.values() if t.shape == (10, 1, 1, 32))
    assert conv.stored_type == "INT4" and conv.per_channel
    assert fc1.stored_type == "INT4" and not fc1.per_channel
    assert fc2.stored_type == "INT8"
    # symmetric narrow range: at most 2**b - 1 values per LUT unit (channel for conv, tensor for dense)
    assert conv.distinct <= 2**3 - 1
    assert fc1.distinct <= 2**4 - 1
    assert fc2.distinct <= 2**6 - 1


def test_storage_variants_compute_the_same(converted, digits):
    model, _ = converted
    x, _ = digits
    chosen, variants = storage.choose(model, "auto", x[-150:])
    assert {v.kind for v in variants} == {"int4", "lut"}
    assert len(chosen.model) == min(len(v.model) for v in variants)
    ref = run_tflm(model, x[-150:])
    for v in variants:
        np.testing.assert_array_equal(run_tflm(v.model, x[-150:]), ref)
    lut = next(v for v in variants if v.kind == "lut")
    assert {t.lut_bits for t in lut.tensors} == {3, 4, 6}
    plain, _ = storage.choose(model, "int8", x[-20:])
    assert all(t.stored_type == "INT8" for t in plain.tensors)
    assert len(plain.model) > len(model)


def test_unpack_int4_matches_reference_nibbles():
    # 0x21 -> low nibble 1, high nibble 2; 0xF8 -> low 8 (-8), high 15 (-1)
    got = flatbuffer.unpack_int4(bytes([0x21, 0xF8]), 4)
    np.testing.assert_array_equal(got, np.array([1, 2, -8, -1], np.int8))


def test_bad_plans(tiny_keras):
    with pytest.raises(PlanError, match="lacks"):
        quantize_model(tiny_keras, BitPlan.from_bits({"nope": 4}))
    with pytest.raises(ModelError, match="supported: Conv2D, Dense, DepthwiseConv2D"):
        quantize_model(tiny_keras, BitPlan.from_bits({"flatten": 4}))
    with pytest.raises(PlanError, match="2..8"):
        quantize_model(tiny_keras, BitPlan.from_bits({"fc1": 1}))
    with pytest.raises(storage.StorageError, match="storage"):
        storage.choose(b"", "zip", np.zeros((1, 8, 8, 1)))


def test_alt_decompression_memory_takes_the_decoded_weights(converted, digits):
    from deploy.measure import alt_decompression_size
    from deploy.measure.tflm import arena_bytes

    model, _ = converted
    x, _ = digits
    stored = lut.build(model).model
    alt = alt_decompression_size(stored)
    assert alt >= 288 * 32  # the largest decoded weight tensor (fc1, int8)
    in_arena = arena_bytes(stored)
    total_with_alt = arena_bytes(stored, alt_decompression=alt)
    assert total_with_alt - alt < in_arena  # the main arena no longer holds decoded weights
    np.testing.assert_array_equal(run_tflm(stored, x[-50:], alt_decompression=alt), run_tflm(stored, x[-50:]))
    assert alt_decompression_size(model) == 0


def test_auto_storage_weighs_flash_against_an_arena_limit(converted, digits):
    from deploy.measure.tflm import arena_bytes

    model, _ = converted
    x, _ = digits
    _, variants = storage.choose(model, "auto", x[-20:])
    arenas = {v.kind: arena_bytes(v.model) for v in variants}
    flashes = {v.kind: len(v.model) for v in variants}
    smallest_arena = min(arenas, key=arenas.get)
    limit = arenas[smallest_arena]
    chosen, _ = storage.choose(model, "auto", x[-20:], arena_limit=limit)
    fitting = [k for k in arenas if arenas[k] <= limit]
    assert chosen.kind == min(fitting, key=flashes.get)
    impossible, _ = storage.choose(model, "auto", x[-20:], arena_limit=1)
    assert impossible.kind == smallest_arena


def test_non_uniform_levels_survive_qat_and_reach_lut_bits(tiny_keras, digits):
    import tf_keras as keras

    from edgeq import bayes
    from edgeq.allocate import quantile_inform
    from edgeq.optimize import bake_levels, project_weights

    x, y = digits
    keras.utils.set_random_seed(0)  # independent of the tests that ran before
    posts = bayes.posteriors(bayes.to_bayesian(tiny_keras, num_examples=1400, init_sigma=0.01))
    plan = quantile_inform(posts, 4.0, min_bits=2, max_bits=6, quantizer="quantile")
    assert all(lb.quantizer == "quantile" and lb.levels for lb in plan.layers.values())
    qat = quantize_model(project_weights(tiny_keras, plan), plan)
    qat.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x[:512], y[:512], epochs=1, verbose=0)
    tflite = export.convert(bake_levels(qat), x[:100])
    stored = lut.build(tflite)
    by_size = {int(np.prod(t.shape)): t for t in stored.tensors}
    for name, lb in plan.layers.items():
        t = by_size[int(np.prod(tiny_keras.get_layer(name).get_weights()[0].shape))]
        values = len(lb.levels)
        assert t.distinct <= values <= 2**lb.bits  # the quantile levels, not a uniform grid, were kept
        assert t.lut_bits <= lb.bits
    np.testing.assert_array_equal(run_tflm(stored.model, x[-60:]), run_tflm(tflite, x[-60:]))


def test_fold_batchnorm_is_exact_and_removes_bn(digits):
    import tf_keras as keras

    from edgeq.optimize import fold_batchnorm

    x, _ = digits
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.layers.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, use_bias=False, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(10, name="fc"),
        ]
    )
    gamma, beta, mean, var = model.get_layer("bn").get_weights()
    rng = np.random.default_rng(0)
    model.get_layer("bn").set_weights([gamma * 1.7, beta + 0.3, mean + rng.normal(0, 0.2, 8), var * 2.5])
    folded = fold_batchnorm(model)
    assert not any(isinstance(lyr, keras.layers.BatchNormalization) for lyr in folded.layers)
    assert folded.get_layer("conv").use_bias
    np.testing.assert_allclose(folded.predict(x[:64], verbose=0), model.predict(x[:64], verbose=0), atol=1e-5)
    # a BN after a layer with its own activation cannot be folded and stays
    relu_first = keras.Sequential(
        [
            keras.layers.Input((4,)),
            keras.layers.Dense(3, activation="relu"),
            keras.layers.BatchNormalization(),
        ]
    )
    assert fold_batchnorm(relu_first) is relu_first


def test_dense_as_conv_is_exact_keeps_names_and_shares_nothing():
    import tf_keras as keras

    from edgeq.optimize import dense_as_conv

    keras.utils.set_random_seed(2)
    inp = keras.Input((6,), name="features")
    shared = keras.layers.Dense(5, activation="relu", name="shared")
    a, b = shared(inp), shared(keras.layers.Lambda(lambda t: -t, name="neg")(inp))
    x = keras.layers.Concatenate(name="cat")([a, b])
    out = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inp, out, name="branchy")
    x_np = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)

    conv = dense_as_conv(model)
    np.testing.assert_allclose(conv.predict(x_np, verbose=0), model.predict(x_np, verbose=0), atol=1e-6)
    assert isinstance(conv.get_layer("shared"), keras.layers.Conv2D)  # same name, now a conv
    assert not any(type(lyr) is keras.layers.Dense for lyr in conv.layers)
    assert conv.get_layer("shared").kernel.shape == (1, 1, 6, 5)  # one conv, still shared by both branches
    conv.get_layer("head").kernel.assign(conv.get_layer("head").kernel * 0)  # the copy owns its weights
    assert np.any(model.get_layer("head").get_weights()[0] != 0)
    no_dense = keras.Sequential([keras.layers.Input((4, 4, 1)), keras.layers.Conv2D(2, 3)])
    assert dense_as_conv(no_dense) is no_dense


def test_deployed_dense_layers_agree_bit_for_bit_with_litert(converted, digits):
    """TFLM and LiteRT's reference kernels give identical int8 outputs on the QAT model."""
    from deploy.measure import measure_litert, measure_tflm

    model, _ = converted
    x, y = digits
    tflm = measure_tflm(model, x[-300:], y[-300:], "classification")
    ref = measure_litert(model, x[-300:], y[-300:], "classification", "BUILTIN_REF")
    optimized = measure_litert(
        model, x[-300:], y[-300:], "classification", "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
    )
    assert ref.vs(tflm).bit_exact and ref.vs(tflm).max_abs_diff == 0 and ref.digest == tflm.digest
    assert optimized.vs(tflm).max_abs_diff <= 1


def test_keep_dense_deploys_fully_connected(tiny_keras, digits):
    import tf_keras as keras

    x, y = digits
    qat = quantize_model(tiny_keras, BitPlan.from_bits({"conv1": 4, "fc1": 4, "fc2": 8}), keep_dense=True)
    qat.compile(keras.optimizers.Adam(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x[:256], y[:256], epochs=1, verbose=0)  # sets the quantizer ranges
    tensors = flatbuffer.weight_tensors(export.convert(qat, x[:100]))
    fc1 = next(t for t in tensors if t.shape == (32, 288))
    assert fc1.op == "FULLY_CONNECTED" and fc1.stored_type == "INT4" and not fc1.per_channel
