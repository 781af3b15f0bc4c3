"""PRUNE and HUFFMAN storage: real converted models, encoded, run in TFLM bit for bit against the original."""

from __future__ import annotations

import numpy as np
import pytest
from tflite_micro.tensorflow.lite.micro.compression import spec

import edgeq  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from deploy.export import convert
from deploy.flatbuffer import INT8, read, unpack_int4_tensors, weight_inputs
from deploy.inspect import op_sequence
from deploy.measure.tflm import run_tflm
from deploy.storage import huffman, prune
from deploy.storage.base import StorageError
from edgeq.optimize import quantize_model
from edgeq.plan import BitPlan

DECODE = "TFLM_DECODE"
ENCODERS = [pytest.param(prune, id="prune"), pytest.param(huffman, id="huffman")]


def _sparse_skewed(model, seed: int = 0, zeros: float = 0.7):
    """Most weights exactly zero, the rest heavy-tailed: what pruning and entropy coding feed on."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        w = layer.get_weights()
        if w:
            k = w[0] * rng.laplace(size=w[0].shape)
            k[rng.random(k.shape) < zeros] = 0.0
            layer.set_weights([k.astype(np.float32), *w[1:]])
    return model


def _net(dense_units: int = 32):
    """Conv (per-channel, axis 0), depthwise (per-channel, last axis), dense (per-channel PTQ) on 8x8x1."""
    import tf_keras as keras

    return keras.Sequential(
        [
            keras.layers.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu", name="conv1"),
            keras.layers.Conv2D(32, 3, activation="relu", name="conv2"),
            keras.layers.DepthwiseConv2D(3, depth_multiplier=4, padding="same", activation="relu", name="dw"),
            keras.layers.MaxPooling2D(2, name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(dense_units, activation="relu", name="fc"),
            keras.layers.Dense(10, name="out"),
        ]
    )


@pytest.fixture(scope="module")
def inputs():
    """50 random inputs in the digits range, the ones every comparison runs."""
    return np.random.default_rng(1).random((50, 8, 8, 1), dtype=np.float32)


@pytest.fixture(scope="module")
def sparse_int8(digits):
    """The sparse, skewed net through the real converter (full int8)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    x, _ = digits
    return convert(_sparse_skewed(_net()), x[:100])


def _weights_by_op(model_bytes: bytes) -> dict[str, object]:
    """Layer kind -> its model_editor weight tensor, read from the flatbuffer."""
    model = read(model_bytes)
    return {f"{op}:{tuple(int(d) for d in t.shape)}": t for t, op in weight_inputs(model)}


def _decoded_inputs(model_bytes: bytes) -> dict[str, int]:
    """Operator -> how many of its inputs a DECODE operator produced, summed over operators of that kind."""
    ops = op_sequence(model_bytes)
    decoded = {o for name, _, outs in ops if name == DECODE for o in outs}
    counts: dict[str, int] = {}
    for name, ins, _ in ops:
        if name != DECODE:
            counts[name] = counts.get(name, 0) + sum(i in decoded for i in ins)
    return counts


@pytest.mark.parametrize("encoder", ENCODERS)
def test_sparse_model_shrinks_and_computes_the_same(encoder, sparse_int8, inputs):
    encoded = encoder.compress(sparse_int8)
    assert len(encoded) < len(sparse_int8)
    decoded = _decoded_inputs(encoded)
    # conv2 (axis-0 channels), the depthwise filter (last-axis channels) and fc all come out of DECODE.
    assert decoded["CONV_2D"] == 1 and decoded["DEPTHWISE_CONV_2D"] == 1 and decoded["FULLY_CONNECTED"] == 1
    np.testing.assert_array_equal(run_tflm(encoded, inputs), run_tflm(sparse_int8, inputs))


@pytest.mark.parametrize("encoder", ENCODERS)
def test_small_tensors_stay_as_they_are(encoder, sparse_int8):
    # conv1 (144 B) and out (320 B) save less than a DECODE costs the flatbuffer: left untouched.
    before = _weights_by_op(sparse_int8)
    after = _weights_by_op(encoder.compress(sparse_int8))
    for key in ("CONV_2D:(16, 3, 3, 1)", "FULLY_CONNECTED:(10, 32)"):
        assert after[key].dtype == INT8
        assert after[key].buffer.data == before[key].buffer.data


@pytest.mark.parametrize("encoder", ENCODERS)
def test_a_model_that_does_not_shrink_comes_back_unchanged(encoder, digits):
    import tensorflow as tf
    import tf_keras as keras

    tf.keras.utils.set_random_seed(0)
    x, _ = digits
    # Uniform weights fill all 255 int8 levels of every channel, almost none of them zero.
    init = keras.initializers.RandomUniform(-1.0, 1.0, seed=0)
    dense = keras.Sequential(
        [
            keras.layers.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(64, kernel_initializer=init, name="fc"),
            keras.layers.Dense(10, kernel_initializer=init, name="out"),
        ]
    )
    model = convert(dense, x[:100])
    assert encoder.compress(model) == model
    assert encoder.build(model).kind == "int8"


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoded_size_is_the_payload(encoder, sparse_int8):
    plugin = prune.PruneCompressor() if encoder is prune else huffman.HuffmanCompressor()
    method = spec.PruningCompression() if encoder is prune else spec.HuffmanCompression()
    for t, _ in weight_inputs(read(sparse_int8)):
        result = plugin.compress(t, method)
        assert encoder.encoded_size(t.array) == len(result.encoded_data) + len(result.ancillary_data)


def test_prune_payload_is_mask_plus_kept_values(sparse_int8):
    for t, _ in weight_inputs(read(sparse_int8)):
        pruned = prune.prune_array(t.array)
        assert pruned.mask == np.packbits(t.array.reshape(-1) != 0).tobytes()
        assert pruned.values == t.array[t.array != 0].tobytes()
        assert pruned.ancillary_data[:5] == bytes([2, 1, 0, 0, 1])  # PRUNE, DCM v1, reserved, PRUNE v1


def test_huffman_code_is_complete_and_length_limited():
    # Fibonacci counts make an unlimited Huffman code as deep as it can be (n - 1 bits).
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    lengths = huffman.code_lengths(np.array(fib))
    assert lengths.max() == huffman.MAX_CODE_BITS
    assert np.sum(2.0 ** -lengths.astype(float)) == 1.0
    # Where the limit does not bind, package-merge is plain Huffman: 4 symbols 1, 1, 2, 4 -> 3, 3, 2, 1.
    np.testing.assert_array_equal(huffman.code_lengths(np.array([1, 1, 2, 4])), [3, 3, 2, 1])


@pytest.mark.parametrize("encoder", ENCODERS)
def test_a_one_value_tensor_decodes(encoder, digits, inputs):
    import tensorflow as tf
    import tf_keras as keras

    tf.keras.utils.set_random_seed(0)
    x, _ = digits
    # An all-zero kernel: PRUNE keeps no value at all, HUFFMAN has a one-symbol code.
    net = keras.Sequential(
        [
            keras.layers.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu", name="fc1"),
            keras.layers.Dense(64, kernel_initializer="zeros", bias_initializer="ones", name="fc2"),
            keras.layers.Dense(10, name="out"),
        ]
    )
    model = convert(net, x[:100])
    assert np.unique(_weights_by_op(model)["FULLY_CONNECTED:(64, 64)"].array).size == 1
    encoded = encoder.compress(model)
    assert len(encoded) < len(model)
    np.testing.assert_array_equal(run_tflm(encoded, inputs), run_tflm(model, inputs))


def _decode_like_tflm(encoded: bytes, ancillary: bytes, count: int) -> np.ndarray:
    """DecompressToBufferWith16BitTable (decode_state_huffman.cc) step by step, failing on any read past
    the encoded buffer, which the host runtime would not notice (it reads the flatbuffer's next bytes)."""
    table = np.frombuffer(ancillary[16:], "<u2").astype(np.int64)
    bits = np.unpackbits(np.frombuffer(encoded, np.uint8))
    pos, out = 0, []
    for _ in range(count):
        used = (ancillary[5] >> 4) + 1
        assert pos + used <= bits.size, "read past the encoded buffer"
        offset = int(bits[pos : pos + used] @ (1 << np.arange(used)[::-1]))
        pos += used
        entry = table[offset]
        while not entry & 0x8000:
            used = ((entry >> 11) & 0xF) + 1
            assert pos + used <= bits.size, "read past the encoded buffer"
            offset += (entry & 0x7FF) + int(bits[pos : pos + used] @ (1 << np.arange(used)[::-1]))
            pos += used
            entry = table[offset]
        out.append(entry & 0xFF)
        pos -= used - ((entry >> 11) & 0xF)  # PutBackBits: the look-ahead the codeword did not use
    return np.array(out, np.uint8).view(np.int8)


def test_huffman_stream_holds_every_bit_the_decoder_reads(sparse_int8):
    for t, _ in weight_inputs(read(sparse_int8)):
        enc = huffman.huffman_array(t.array)
        assert len(enc.encoded_data) % 4 == 0  # the decoder loads 32-bit words
        np.testing.assert_array_equal(
            _decode_like_tflm(enc.encoded_data, enc.ancillary_data, t.array.size), t.array.reshape(-1)
        )


@pytest.fixture(scope="module")
def qat_int4(digits):
    """A 4-bit QAT model (conv2, dw and fc at 4 bits, fc kept FULLY_CONNECTED per-tensor), converted."""
    import tensorflow as tf
    import tf_keras as keras

    tf.keras.utils.set_random_seed(0)
    x, y = digits
    qat = quantize_model(
        _sparse_skewed(_net(dense_units=64)),
        BitPlan.from_bits({"conv2": 4, "dw": 4, "fc": 4}),
        keep_dense=True,
    )
    qat.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x[:1400], y[:1400], epochs=1, batch_size=64, verbose=0)
    return convert(qat, x[:100])


@pytest.mark.parametrize("encoder", ENCODERS)
def test_qat_int4_model_encodes_bit_exact(encoder, qat_int4, inputs):
    int4 = [t for t, _ in weight_inputs(read(qat_int4)) if t.dtype != INT8]
    assert len(int4) == 3  # the converter packed the three 4-bit layers as INT4
    with pytest.raises(StorageError, match="unpack_int4_tensors"):
        encoder.compress(qat_int4)
    plain = unpack_int4_tensors(qat_int4)
    encoded = encoder.compress(plain)
    assert len(encoded) < len(plain)
    fc = _weights_by_op(plain)["FULLY_CONNECTED:(64, 512)"]
    assert len(fc.quantization.scales) == 1  # QAT dense weights are per-tensor
    assert _decoded_inputs(encoded)["FULLY_CONNECTED"] >= 1
    np.testing.assert_array_equal(run_tflm(encoded, inputs), run_tflm(qat_int4, inputs))
    stored = encoder.build(qat_int4)
    assert stored.kind == encoder.KIND.name and stored.model == encoded


@pytest.mark.parametrize("encoder", ENCODERS)
def test_bad_tensor_choices_say_what_to_do(encoder, sparse_int8):
    with pytest.raises(StorageError, match=r"\(subgraph, tensor index\)"):
        encoder.compress(sparse_int8, [(0, 10_000)])
    model = read(sparse_int8)
    activation = model.subgraphs[0].inputs[0].index
    with pytest.raises(StorageError, match="not constant"):
        encoder.compress(sparse_int8, [(0, activation)])
