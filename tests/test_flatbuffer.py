"""deploy.flatbuffer on real converter output, a real INT4 flatbuffer and a real TFLM LUT-compressed model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deploy.flatbuffer import (
    DECODE_OP,
    FlatbufferError,
    UnsupportedOperator,
    describe,
    operators,
    resolver_calls,
    unpack_int4,
)

INT4 = 17  # TensorType INT4


def _weights(model_bytes: bytes, op_name: str = "FULLY_CONNECTED"):
    """(model_editor model, the weight tensors of every op_name operator) of a flatbuffer."""
    from tflite_micro.tensorflow.lite.micro.compression import model_editor as me

    model = me.read(model_bytes)
    ops = [op for op in model.subgraphs[0].operators if op.opcode_name == op_name]
    return model, [op.inputs[1] for op in ops]


def lut_compress(model_bytes: bytes, bits: int = 3) -> tuple[bytes, np.ndarray]:
    """The model with its first Dense kernel coarsened to <= 2**bits values, LUT-compressed by TFLM."""
    from tflite_micro.tensorflow.lite.micro.compression import spec, spec_builder
    from tflite_micro.tensorflow.lite.micro.compression.compress import compress

    model, (w, *_) = _weights(model_bytes)
    step = 256 // 2**bits
    coarse = (w.array.astype(np.int16) // step * step).astype(np.int8)
    w.array = coarse
    # Per-channel-quantized tensors need per-channel tables (DECODE restores each channel's own values).
    mode = spec.PerChannel(0) if w.quantization and w.quantization.axis is not None else spec.PerTensor()
    sb = spec_builder.SpecBuilder()
    sb.add_tensor(0, w.index).with_lut(bits, mode)
    return bytes(compress(bytes(model.build()), sb.build())), coarse


def int4_model(model_bytes: bytes) -> tuple[bytes, np.ndarray]:
    """The model with its Conv2D kernel clipped to [-8, 7] and stored as packed INT4 (low nibble first)."""
    # Conv2D: TFLM runs per-channel INT4 conv kernels; its FULLY_CONNECTED refuses per-channel INT4.
    model, (w, *_) = _weights(model_bytes, "CONV_2D")
    vals = np.clip(w.array, -8, 7).astype(np.int8)
    flat = vals.ravel().astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, 0)
    w.buffer.data = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    w.dtype = INT4
    return bytes(model.build()), vals


@pytest.fixture(scope="module")
def lut_model(tiny_tflite):
    return lut_compress(tiny_tflite, bits=3)


def test_operators_in_graph_order(tiny_tflite):
    ops = operators(tiny_tflite)
    assert ops == ["CONV_2D", "RESHAPE", "FULLY_CONNECTED"]
    assert resolver_calls(ops) == ["AddConv2D", "AddReshape", "AddFullyConnected"]


def test_describe_int8_model(tiny_tflite):
    info = describe(tiny_tflite)
    assert info.flash_bytes == len(tiny_tflite)
    assert info.ops == operators(tiny_tflite)
    conv_w = next(t for t in info.tensors if t.type == "INT8" and len(t.shape) == 4 and t.role == "constant")
    assert conv_w.shape == (8, 3, 3, 1)
    assert conv_w.bytes_stored == 8 * 9
    assert conv_w.quantization == "per-channel" and conv_w.quantized_dimension == 0
    assert 1 < conv_w.distinct_values <= 72
    inp = info.tensor(info.inputs[0])
    assert inp.role == "activation" and inp.type == "INT8" and inp.quantization == "per-tensor"
    assert info.io_bytes(info.inputs[0]) == 64 and info.io_bytes(info.outputs[0]) == 10
    assert all(t.lut is None for t in info.tensors)


def test_describe_int4_unpacks_nibbles(tiny_tflite):
    model, vals = int4_model(tiny_tflite)
    info = describe(model)
    t = next(t for t in info.tensors if t.type == "INT4")
    assert t.shape == vals.shape
    assert t.bytes_stored == math.ceil(vals.size / 2)
    assert t.distinct_values == np.unique(vals).size
    # TFLM itself runs the INT4 model: the flatbuffer we made and read is a real one.
    from deploy.measure.tflm import run_tflm

    assert run_tflm(model, np.zeros((1, 8, 8, 1), np.float32)).shape == (1, 10)


def test_unpack_int4_low_nibble_first_sign_extended():
    assert unpack_int4(bytes([0x21, 0xF8, 0x07]), 5).tolist() == [1, 2, -8, -1, 7]


def test_describe_lut_compressed(lut_model):
    model, coarse = lut_model
    info = describe(model)
    assert DECODE_OP in info.ops and info.ops.index(DECODE_OP) < info.ops.index("FULLY_CONNECTED")
    assert "AddDecode" in resolver_calls(info.ops)
    (idx,) = [t for t in info.tensors if t.role == "lut-indices"]
    assert idx.lut_bits == 3 and idx.lut.source == "dcm"
    assert idx.lut.per_channel and idx.lut.axis == 0 and idx.lut.tables == coarse.shape[0]
    assert idx.lut.decoded_shape == coarse.shape and idx.lut.decoded_type == "INT8"
    assert idx.type == "UINT8" and idx.bytes_stored == math.ceil(coarse.size * 3 / 8)
    # Values recovered through the LUTs equal the weights that went in.
    assert idx.distinct_values == np.unique(coarse).size
    assert idx.quantization == "per-channel"
    anc = info.tensor(idx.lut.ancillary_index)
    assert anc.role == "lut-ancillary"
    assert any(t.role == "lut-decoded" and t.bytes_stored == 0 for t in info.tensors)
    assert info.flash_bytes == len(model)


def test_lut_model_runs_in_tflm(lut_model):
    from deploy.measure.tflm import run_tflm

    assert run_tflm(lut_model[0], np.zeros((2, 8, 8, 1), np.float32)).shape == (2, 10)


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"hello, this is not a model",
        b"\x00" * 64,
        b"\x1c\x00\x00\x00TFL3" + np.random.default_rng(0).bytes(200),  # seeded: xdist workers collect alike
    ],
)
def test_garbage_is_refused(bad):
    with pytest.raises(FlatbufferError, match=r"is not a TFLite flatbuffer \(.*\); pass a \.tflite"):
        describe(bad)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_is_refused(tiny_tflite, keep):
    with pytest.raises(FlatbufferError, match="is not a TFLite flatbuffer"):
        operators(tiny_tflite[: int(len(tiny_tflite) * keep)])


def test_not_bytes_is_refused():
    with pytest.raises(FlatbufferError, match="got str"):
        describe("model.tflite")  # type: ignore[arg-type]


def test_unsupported_operators_are_all_named():
    with pytest.raises(UnsupportedOperator) as e:
        resolver_calls(["CONV_2D", "FANCY_OP", "RFFT2D", "FANCY_OP"])
    msg = str(e.value)
    assert "TFLM has no kernel for: FANCY_OP, RFFT2D;" in msg and "register a custom kernel" in msg


def test_resolver_mapping_covers_the_brief():
    ops = [
        "DEPTHWISE_CONV_2D",
        "SOFTMAX",
        "MAX_POOL_2D",
        "AVERAGE_POOL_2D",
        "ADD",
        "MUL",
        "CONCATENATION",
        "MEAN",
        "QUANTIZE",
        "DEQUANTIZE",
        "PAD",
        "RELU",
        "RELU6",
        "LOGISTIC",
        "TANH",
        "STRIDED_SLICE",
        "SHAPE",
        "PACK",
        "SQUEEZE",
        "TRANSPOSE",
        "HARD_SWISH",
        "TFLM_DECODE",
    ]
    calls = resolver_calls(ops)
    assert calls[:3] == ["AddDepthwiseConv2D", "AddSoftmax", "AddMaxPool2D"]
    assert calls[-2:] == ["AddHardSwish", "AddDecode"]
    assert len(calls) == len(ops)


def _litert_outputs(model: bytes, x: np.ndarray) -> np.ndarray:
    """Raw int8 outputs of LiteRT's interpreter on every row of x (inputs quantized as the model says)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    scale, zero = i["quantization"]
    out = []
    for row in x:
        q = np.clip(np.round(row / scale + zero), -128, 127).astype(np.int8).reshape(i["shape"])
        it.set_tensor(i["index"], q)
        it.invoke()
        out.append(it.get_tensor(o["index"]).copy())
    return np.array(out)


@pytest.mark.parametrize("storage", ["int8", "int4", "lut"])
def test_compact_keeps_what_tflm_and_litert_compute(tiny_tflite, tiny_lut_tflite, digits, storage):
    from deploy.flatbuffer import DROPPED_METADATA, compact, read
    from deploy.measure.tflm import run_tflm
    from deploy.verify import parse_verified

    x = digits[0][-60:]
    model = {"int8": tiny_tflite, "int4": int4_model(tiny_tflite)[0], "lut": tiny_lut_tflite}[storage]
    small = compact(model)
    assert len(small) < len(model)
    assert np.array_equal(run_tflm(small, x), run_tflm(model, x))
    if storage == "int8":  # LiteRT computes exactly what it computed before
        assert np.array_equal(_litert_outputs(small, x), _litert_outputs(model, x))
    if storage == "int4":
        # tflite-micro's model editor writes every empty buffer as an empty data vector, which LiteRT
        # refuses ("required_bytes <= bytes"); compact writes none, so the file loads and runs (its INT4
        # kernels round within 1 LSB of TFLM's)
        with pytest.raises(ValueError, match="required_bytes"):
            _litert_outputs(model, x[:1])
        diff = _litert_outputs(small, x).astype(int) - run_tflm(small, x).reshape(len(x), 1, -1)
        assert np.abs(diff).max() <= 1
    fb = parse_verified(small, "compacted")
    assert not fb.signatureDefs and fb.description is None
    assert not {m.name for m in fb.metadata or []} & set(DROPPED_METADATA)
    assert all(t.name in (None, b"") for t in fb.subgraphs[0].tensors)
    # one empty buffer (0) for every tensor without data, nothing unreferenced
    empty = [i for i, b in enumerate(fb.buffers) if b.data is None or len(b.data) == 0]
    assert empty == [0]
    assert {t.buffer for t in fb.subgraphs[0].tensors} | {m.buffer for m in fb.metadata or []} == set(
        range(len(fb.buffers))
    )
    assert compact(small) == small  # nothing more to drop
    read(small)  # tflite-micro's model editor (the compressor, the slicer) still reads it


def test_compact_writes_the_zero_points_of_zero_once(tiny_tflite):
    from deploy.flatbuffer import compact

    small = compact(tiny_tflite)
    # every weight and bias tensor of the tiny model (conv1 per channel: 8 values) has zero points of 0;
    # compacted, the 8-value int64 zero vector (64 zero bytes behind a length word of 8) is stored once
    vector = (8).to_bytes(4, "little") + bytes(64)
    assert tiny_tflite.count(vector) >= 2
    assert small.count(vector) == 1
