"""LUT storage: TFLM's compressor keeps b-bit indices into a value table, restored by DECODE."""

from __future__ import annotations

import warnings
from collections.abc import Collection

import numpy as np

from deploy.flatbuffer import (
    INT4,
    WeightTensor,
    channel_axis,
    is_per_channel,
    max_distinct,
    read,
    tensor_values,
    unpack_int4_tensors,
    weight_inputs,
    widen_int4,
)
from deploy.flatbuffer import build as build_flatbuffer
from deploy.storage.base import Storage, StorageError, StorageKind
from deploy.storage.cost import MIXED

MAX_LUT_BITS = 7  # the TFLM compressor takes 1..7 index bits


def build(converted: bytes, max_bits: int = MAX_LUT_BITS) -> Storage:
    """LUT-compress every weight tensor with <= 2**max_bits distinct values per LUT unit.

    The LUT unit follows the tensor's quantization: a per-channel tensor needs a per-channel table
    (a per-tensor table over a per-channel tensor decodes to wrong outputs, measured here).
    """
    return _compressed(unpack_int4_tensors(converted), None, max_bits, "lut")


def build_mixed(converted: bytes, ops: Collection[int], max_bits: int = MAX_LUT_BITS) -> Storage:
    """LUT-compress the weights of the operators `ops` (indices in the graph), keep the rest as converted.

    The planner's per-layer storage: LUT where its indices save bytes and its decode buffer fits the
    arena, packed INT4 (or INT8) elsewhere; CMSIS-NN reads those INT4 weights packed, with no buffer.
    """
    if not ops:
        raise StorageError(
            f"{MIXED} storage needs the operators to LUT-compress, which a planner plan names "
            "(plan.meta['lut_ops']); use --storage auto, int4 or lut"
        )
    model = read(converted)
    chosen = _weight_ops(model, ops)
    for t in chosen.values():
        if t.dtype == INT4:  # the other INT4 tensors stay packed
            widen_int4(t)
    return _compressed(build_flatbuffer(model), set(chosen), max_bits, MIXED)


def _weight_ops(model, ops: Collection[int]) -> dict[int, object]:
    """Operator index -> its weight tensor, for each of `ops` (a StorageError names one without)."""
    weights = {id(t) for t, _ in weight_inputs(model)}
    operators = model.subgraphs[0].operators
    out = {}
    for k in sorted({int(k) for k in ops}):
        w = operators[k].inputs[1] if 0 <= k < len(operators) and len(operators[k].inputs) > 1 else None
        if w is None or id(w) not in weights:
            raise StorageError(f"operator {k} has no weight tensor to LUT-compress; the plan is stale")
        out[k] = w
    return out


def _compressed(plain: bytes, ops: set[int] | None, max_bits: int, kind: str) -> Storage:
    """plain (INT8 where LUT may apply) with the weights of ops (None: all) LUT-compressed where they fit."""
    from tflite_micro.tensorflow.lite.micro.compression import spec, spec_builder
    from tflite_micro.tensorflow.lite.micro.compression.compress import compress

    model = read(plain)
    picked = None if ops is None else {id(t) for t in _weight_ops(model, ops).values()}
    builder = spec_builder.SpecBuilder()
    chosen = []
    for t, op in weight_inputs(model):
        bits = None
        if picked is None or id(t) in picked:
            pc, axis = is_per_channel(t), channel_axis(t)
            b = max(1, int(np.ceil(np.log2(max(max_distinct(tensor_values(t), pc, axis), 2)))))
            if b <= max_bits:
                bits = b
                builder.add_tensor(0, t.index).with_lut(b, spec.PerChannel(axis) if pc else spec.PerTensor())
        chosen.append(WeightTensor.of(t, op, bits))
    specs = builder.build()
    if not specs and ops is None:
        return Storage("int8", plain, tuple(chosen))
    if not specs:
        raise StorageError(f"no planned operator's weights hold <= {2**max_bits} values per unit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the compressor warns on small tensors that grow; we measure size
        try:
            compressed = bytes(compress(plain, specs))
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"TFLM LUT compression failed: {e}") from e
    from deploy.storage.encode import drop_encoded_quantization

    return Storage(kind, drop_encoded_quantization(compressed), tuple(chosen))


KIND = StorageKind(
    "lut", build, "b-bit indices into per-channel value tables; DECODE restores int8", decoder="LUT"
)

MIXED_KIND = StorageKind(
    MIXED,
    build_mixed,
    "LUT on the layers the planner names, packed INT4 (INT8 above 4 bits) on the others",
    decoder="LUT",
    planned=True,
)
