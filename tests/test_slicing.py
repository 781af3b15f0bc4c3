"""Output-channel slicing: bit-exact in TFLM, bounded decode memory, CONCATENATION trees, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from deploy import export, flatbuffer
from deploy.export import slicing
from deploy.measure.tflm import arena_bytes, run_tflm
from deploy.storage import lut
from edgeq.optimize import quantize_model
from edgeq.plan import BitPlan


def _qat_convert(model, bits: dict[str, int], digits) -> bytes:
    """Train model briefly, QAT it with the given bits for one epoch, convert to full-integer TFLite."""
    import tensorflow as tf
    import tf_keras as keras

    tf.keras.utils.set_random_seed(0)
    x, y = digits
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile("adam", loss)
    model.fit(x[:1400], y[:1400], epochs=3, batch_size=64, verbose=0)
    qat = quantize_model(model, BitPlan.from_bits(bits))
    qat.compile(keras.optimizers.Adam(1e-4), loss)
    qat.fit(x[:1400], y[:1400], epochs=1, batch_size=64, verbose=0)
    return export.convert(qat, x[:100])


@pytest.fixture(scope="module")
def dense_model(digits) -> bytes:
    """MLP 64->256->128->10 with 3-bit QAT on the hidden layers (per-tensor INT4, as 1x1 convs)."""
    import tf_keras as keras

    L = keras.layers
    m = keras.Sequential(
        [
            L.Input((8, 8, 1)),
            L.Flatten(name="flatten"),
            L.Dense(256, activation="relu", name="fc1"),
            L.Dense(128, activation="relu", name="fc2"),
            L.Dense(10, name="out"),
        ]
    )
    return _qat_convert(m, {"fc1": 3, "fc2": 3, "out": 8}, digits)


@pytest.fixture(scope="module")
def conv_model(digits) -> bytes:
    """edgeq's digits_cnn with 3/4-bit QAT (per-channel INT4 Conv2D weights, per-tensor Dense)."""
    from edgeq.models import digits_cnn

    return _qat_convert(digits_cnn(), {"conv1": 3, "conv2": 3, "fc1": 4, "fc2": 8}, digits)


CASES = [("dense_model", 4096), ("conv_model", 1024)]


@pytest.mark.parametrize("fixture,budget", CASES)
def test_sliced_model_is_bit_exact_and_within_budget(fixture, budget, request, digits):
    model = request.getfixturevalue(fixture)
    x, _ = digits
    res = slicing.slice_weights(model, budget)
    assert res.sliced, "the test budget must force slicing"
    assert all(r.largest_slice_bytes <= budget for r in res.rows if not r.warning)
    # every weight tensor actually in the sliced flatbuffer fits the budget
    assert all(int(np.prod(t.shape)) <= budget for t in flatbuffer.weight_tensors(res.model))
    ref = run_tflm(model, x)
    np.testing.assert_array_equal(run_tflm(res.model, x), ref)
    stored = lut.build(res.model)
    assert stored.kind == "lut"
    np.testing.assert_array_equal(run_tflm(stored.model, x), ref)


def test_slices_keep_each_quantization(conv_model):
    from tflite_micro.tensorflow.lite.micro.compression import model_editor

    res = slicing.slice_weights(conv_model, 1024)
    ops = model_editor.read(res.model).subgraphs[0].operators
    conv = [op for op in ops if op.opcode_name == "CONV_2D" and op.outputs[0].name.startswith("conv2/")]
    # fc1 is a per-tensor 1x1 conv after quantize_model (dense_as_conv); FULLY_CONNECTED slicing is
    # covered by test_depthwise_is_left_whole_with_a_warning on a post-training-quantized model.
    fc = [op for op in ops if op.opcode_name == "CONV_2D" and op.outputs[0].name.startswith("fc1/")]
    assert len(conv) == 5 and len(fc) == 22  # 144 B and 288 B per channel into 1 KiB slices
    for op in conv:  # per-channel: one scale per sliced filter, bias scales sliced alike
        width = op.inputs[1].shape[0]
        assert len(op.inputs[1].quantization.scales) == width == len(op.inputs[2].quantization.scales)
        assert op.outputs[0].shape[-1] == width
    for op in fc:  # the per-tensor former Dense keeps its single scale
        assert len(op.inputs[1].quantization.scales) == 1
    widths = [op.inputs[1].shape[0] for op in fc]
    assert sum(widths) == 64 and max(widths) - min(widths) <= 1  # balanced


def test_concatenation_is_a_tree_of_fan_in_at_most_10(conv_model):
    res = slicing.slice_weights(conv_model, 1024)
    names = slicing.op_names(res.model)
    assert slicing.max_concat_fan_in(res.model) <= slicing.MAX_CONCAT_INPUTS
    # conv2: 5 slices, one join; fc1: 22 slices -> 3 leaf joins + a root
    assert names.count("CONCATENATION") == 1 + 4


def test_decode_sits_right_before_its_consumer_and_arena_shrinks(dense_model, digits):
    x, _ = digits
    res = slicing.slice_weights(dense_model, 4096)
    lut_whole = lut.build(dense_model).model
    lut_sliced = lut.build(res.model).model
    assert slicing.decode_placement_problems(lut_sliced) == []
    names = slicing.op_names(lut_sliced)
    # fc1 4 slices, fc2 8; the 8-bit output layer has more than 2**7 values and stays plain int8
    assert names.count("TFLM_DECODE") == 4 + 8
    assert all(names[i + 1] == "CONV_2D" for i, n in enumerate(names) if n == "TFLM_DECODE")
    # the planner reuses one slice's decode space for the next: 32 KiB fc2 no longer materialised whole
    whole, sliced = arena_bytes(lut_whole, x[0]), arena_bytes(lut_sliced, x[0])
    assert sliced < whole - 16 * 1024
    # INT4 weights are unpacked into an arena scratch buffer per op: slicing bounds that too
    assert arena_bytes(res.model, x[0]) < arena_bytes(dense_model, x[0]) - 16 * 1024


def test_budget_too_small_names_the_layer_and_the_minimum(dense_model):
    with pytest.raises(slicing.SliceError, match=r"'fc2'.*256 B.*smallest budget that works .* 256 B"):
        slicing.slice_weights(dense_model, 200)
    res = slicing.slice_weights(dense_model, 256)  # the minimum it names does work: one channel per slice
    assert max(r.slices for r in res.rows) == 128


def test_budget_above_every_layer_changes_nothing(dense_model):
    res = slicing.slice_weights(dense_model, "1MiB")
    assert res.model == dense_model and not res.sliced and all(r.slices == 1 for r in res.rows)


@pytest.mark.parametrize(
    "text,value",
    [
        ("16KiB", 16384),
        ("16KB", 16384),
        ("16k", 16384),
        ("90000B", 90000),
        ("90000", 90000),
        (" 2 MiB", 2 << 20),
        (4096, 4096),
    ],
)
def test_parse_budget(text, value):
    assert slicing.parse_budget(text) == value


@pytest.mark.parametrize("text", ["16 bananas", "", "KiB", "-4KiB", "0", "1e3"])
def test_parse_budget_rejects(text):
    with pytest.raises(slicing.SliceError, match="budget"):
        slicing.parse_budget(text)


def test_depthwise_is_left_whole_with_a_warning(digits):
    import tensorflow as tf
    import tf_keras as keras

    tf.keras.utils.set_random_seed(0)
    x, _ = digits
    L = keras.layers
    m = keras.Sequential(
        [
            L.Input((8, 8, 1)),
            L.Conv2D(8, 3, activation="relu", name="conv1"),
            L.DepthwiseConv2D(3, depth_multiplier=2, name="dw"),
            L.GlobalAveragePooling2D(name="gap"),
            L.Dense(10, name="fc"),
        ]
    )
    model = export.convert(m, x[:50], samples=50)
    res = slicing.slice_weights(model, 100)  # dw 3x3x16 = 144 B > 100; fc 16 B/channel fits 6 per slice
    rows = {r.op: r for r in res.rows}
    assert rows["DEPTHWISE_CONV_2D"].slices == 1 and "depthwise" in rows["DEPTHWISE_CONV_2D"].warning
    assert res.warnings == [rows["DEPTHWISE_CONV_2D"]]
    assert rows["FULLY_CONNECTED"].slices == 2 and rows["CONV_2D"].slices == 1
    np.testing.assert_array_equal(run_tflm(res.model, x[:200]), run_tflm(model, x[:200]))
