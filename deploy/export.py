"""Export: full-integer TFLite conversion, INT4 or TFLM LUT weight storage, verified bit for bit."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from deploy.flatbuffer import unpack_int4 as unpack_int4_values
from deploy.tflm import run_tflm
from edgeq.errors import EdgeqError

INT8, INT4 = 9, 17  # tflite TensorType codes
WEIGHT_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
STORAGES = ("int8", "int4", "lut", "auto")
MAX_LUT_BITS = 7  # the TFLM compressor takes 1..7 index bits


class ExportError(EdgeqError):
    """Conversion or compression failed, or the compressed model computes something else."""


def _converter(model):
    """A TFLiteConverter over the model traced at batch 1 (inference mode).

    A microcontroller runs one sample at a time; a static batch lets the converter fold shape
    arithmetic, so Keras Reshape layers become one RESHAPE with a constant shape (from_keras_model
    leaves SHAPE/STRIDED_SLICE/PACK ops for the dynamic batch).
    """
    import tensorflow as tf

    specs = [tf.TensorSpec([1, *t.shape[1:]], t.dtype, name=t.name.split(":")[0]) for t in model.inputs]
    fn = tf.function(lambda *x: model(list(x) if len(x) > 1 else x[0], training=False))
    return tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function(*specs)], model)


def convert(model, representative: np.ndarray, *, samples: int = 200) -> bytes:
    """Full-integer TFLite flatbuffer (int8 in/out); QAT models keep their per-layer bit widths."""
    import tensorflow as tf

    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rep = np.asarray(representative[:samples], dtype=np.float32)
    conv.representative_dataset = lambda: ([rep[i : i + 1]] for i in range(len(rep)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    try:
        return bytes(conv.convert())
    except Exception as e:  # noqa: BLE001  (the converter raises many types)
        raise ExportError(f"TFLite conversion failed: {str(e).splitlines()[0]}") from e


def convert_float(model) -> bytes:
    """The float32 TFLite flatbuffer (no optimisation): the reference size for flash comparisons."""
    try:
        return bytes(_converter(model).convert())
    except Exception as e:  # noqa: BLE001  (the converter raises many types)
        raise ExportError(f"float TFLite conversion failed: {str(e).splitlines()[0]}") from e


@dataclass(frozen=True)
class WeightTensor:
    """One constant weight tensor of a conv/dense operator as stored in the flatbuffer."""

    index: int
    name: str
    op: str
    shape: tuple[int, ...]
    stored_type: str  # INT8 or INT4
    per_channel: bool
    distinct: int  # most distinct values in any LUT unit (channel or whole tensor)
    lut_bits: int | None = None


@dataclass
class Storage:
    """An exported model and how its weights are stored."""

    kind: str
    model: bytes
    tensors: list[WeightTensor] = field(default_factory=list)


def _read(model_bytes: bytes):
    from tflite_micro.tensorflow.lite.micro.compression import model_editor

    return model_editor.read(bytes(model_bytes))


def _weights(model) -> Iterable[tuple[object, str]]:
    """(tensor, op name) for every constant weight input of a conv/dense operator."""
    seen = set()
    for sg in model.subgraphs:
        for op in sg.operators:
            if op.opcode_name not in WEIGHT_OPS or len(op.inputs) < 2:
                continue
            t = op.inputs[1]
            if t is None or t.buffer is None or not len(t.buffer.data) or id(t) in seen:
                continue
            seen.add(id(t))
            yield t, op.opcode_name


def _values(t) -> np.ndarray:
    count = int(np.prod(t.shape))
    raw = bytes(t.buffer.data)
    vals = unpack_int4_values(raw, count) if t.dtype == INT4 else np.frombuffer(raw, np.int8)[:count]
    return vals.reshape(tuple(int(s) for s in t.shape))


def _is_per_channel(t) -> bool:
    q = t.quantization
    return q is not None and q.scales is not None and np.size(q.scales) > 1


def _max_distinct(vals: np.ndarray, per_channel: bool, axis: int = 0) -> int:
    if not per_channel:
        return int(np.unique(vals).size)
    v = np.moveaxis(vals, axis, 0).reshape(vals.shape[axis], -1)
    s = np.sort(v, axis=1)
    return int(np.max(1 + np.count_nonzero(np.diff(s, axis=1), axis=1)))


def weight_tensors(model_bytes: bytes) -> list[WeightTensor]:
    """The conv/dense weight tensors of a flatbuffer with their storage and distinct-value counts."""
    out = []
    for t, op in _weights(_read(model_bytes)):
        pc = _is_per_channel(t)
        axis = int(t.quantization.axis or 0) if pc else 0
        out.append(
            WeightTensor(
                index=int(t.index),
                name=str(t.name or ""),
                op=op,
                shape=tuple(int(s) for s in t.shape),
                stored_type="INT4" if t.dtype == INT4 else "INT8",
                per_channel=pc,
                distinct=_max_distinct(_values(t), pc, axis),
            )
        )
    return out


def unpack_int4(model_bytes: bytes) -> bytes:
    """The same model with every INT4 weight tensor stored as INT8 (identical values)."""
    model = _read(model_bytes)
    for t, _ in _weights(model):
        if t.dtype == INT4:
            t.buffer.data = _values(t).astype(np.int8).tobytes()
            t.dtype = INT8
    return bytes(model.build())


def lut_compress(model_bytes: bytes, max_bits: int = MAX_LUT_BITS) -> Storage:
    """TFLM LUT compression of every weight tensor with <= 2**max_bits distinct values per LUT unit.

    The LUT unit follows the tensor's quantization: a per-channel tensor needs a per-channel table
    (a per-tensor table over a per-channel tensor decodes to wrong outputs, measured here).
    """
    from tflite_micro.tensorflow.lite.micro.compression import spec, spec_builder
    from tflite_micro.tensorflow.lite.micro.compression.compress import compress

    plain = unpack_int4(model_bytes)
    builder = spec_builder.SpecBuilder()
    chosen = []
    for t, op in _weights(_read(plain)):
        pc = _is_per_channel(t)
        axis = int(t.quantization.axis or 0) if pc else 0
        distinct = _max_distinct(_values(t), pc, axis)
        bits = max(1, int(np.ceil(np.log2(max(distinct, 2)))))
        wt = WeightTensor(
            int(t.index),
            str(t.name or ""),
            op,
            tuple(int(s) for s in t.shape),
            "INT8",
            pc,
            distinct,
            bits if bits <= max_bits else None,
        )
        chosen.append(wt)
        if wt.lut_bits is not None:
            mode = spec.PerChannel(axis) if pc else spec.PerTensor()
            builder.add_tensor(0, wt.index).with_lut(bits, mode)
    specs = builder.build()
    if not specs:
        return Storage("int8", plain, chosen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the compressor warns on small tensors that grow; we measure size
        try:
            compressed = bytes(compress(plain, specs))
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"TFLM LUT compression failed: {e}") from e
    return Storage("lut", compressed, chosen)


def strip_names(model_bytes: bytes) -> bytes:
    """The same model without tensor names: TFLM never reads them; on small models they cost ~5% of flash."""
    model = _read(model_bytes)
    for sg in model.subgraphs:
        for t in sg.tensors:
            t.name = ""
    return bytes(model.build())


def verify_same_outputs(reference: bytes, candidate: bytes, x: np.ndarray, what: str) -> None:
    """Raise unless candidate's TFLM outputs equal reference's bit for bit on every row of x."""
    a, b = run_tflm(reference, x), run_tflm(candidate, x)
    if not np.array_equal(a, b):
        bad = int(np.sum(np.any(a != b, axis=1)))
        raise ExportError(
            f"{what}: TFLM outputs differ from the uncompressed model on {bad}/{len(x)} samples; "
            "refusing to write it (use --storage int4 or int8)"
        )


def choose_storage(
    converted: bytes,
    storage: str,
    verify_x: np.ndarray,
    reference: bytes | None = None,
    arena_limit: int | None = None,
) -> tuple[Storage, list[Storage]]:
    """Build the storage variants asked for, verify each against reference (default: converted).

    The smallest flash wins; with arena_limit, the smallest flash among the variants whose TFLM arena
    fits it (or the smallest arena when none does), since a LUT model's DECODE buffers cost RAM.
    """
    if storage not in STORAGES:
        raise ExportError(f"unknown storage {storage!r}; use one of {', '.join(STORAGES)}")
    reference = converted if reference is None else reference
    variants: list[Storage] = []
    if storage in ("int4", "auto"):
        variants.append(Storage("int4", converted, weight_tensors(converted)))
    if storage == "int8":
        plain = unpack_int4(converted)
        variants.append(Storage("int8", plain, weight_tensors(plain)))
    if storage in ("lut", "auto"):
        variants.append(lut_compress(converted))
    for v in variants:
        v.model = strip_names(v.model)
        verify_same_outputs(reference, v.model, verify_x, f"{v.kind} model")
    if arena_limit is not None and len(variants) > 1:
        from deploy.tflm import arena_bytes

        arenas = {id(v): arena_bytes(v.model) for v in variants}
        fitting = [v for v in variants if arenas[id(v)] <= arena_limit]
        if not fitting:
            return min(variants, key=lambda v: arenas[id(v)]), variants
        variants_to_rank = fitting
    else:
        variants_to_rank = variants
    chosen = min(variants_to_rank, key=lambda s: len(s.model))
    return chosen, variants
