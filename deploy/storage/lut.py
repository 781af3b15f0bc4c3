"""LUT storage: TFLM's compressor keeps b-bit indices into a value table, restored by DECODE."""

from __future__ import annotations

import warnings

import numpy as np

from deploy.flatbuffer import (
    WeightTensor,
    channel_axis,
    is_per_channel,
    max_distinct,
    read,
    tensor_values,
    unpack_int4_tensors,
    weight_inputs,
)
from deploy.storage.base import Storage, StorageError, StorageKind

MAX_LUT_BITS = 7  # the TFLM compressor takes 1..7 index bits


def build(converted: bytes, max_bits: int = MAX_LUT_BITS) -> Storage:
    """LUT-compress every weight tensor with <= 2**max_bits distinct values per LUT unit.

    The LUT unit follows the tensor's quantization: a per-channel tensor needs a per-channel table
    (a per-tensor table over a per-channel tensor decodes to wrong outputs, measured here).
    """
    from tflite_micro.tensorflow.lite.micro.compression import spec, spec_builder
    from tflite_micro.tensorflow.lite.micro.compression.compress import compress

    plain = unpack_int4_tensors(converted)
    builder = spec_builder.SpecBuilder()
    chosen = []
    for t, op in weight_inputs(read(plain)):
        pc, axis = is_per_channel(t), channel_axis(t)
        distinct = max_distinct(tensor_values(t), pc, axis)
        bits = max(1, int(np.ceil(np.log2(max(distinct, 2)))))
        wt = WeightTensor.of(t, op, bits if bits <= max_bits else None)
        chosen.append(wt)
        if wt.lut_bits is not None:
            builder.add_tensor(0, wt.index).with_lut(bits, spec.PerChannel(axis) if pc else spec.PerTensor())
    specs = builder.build()
    if not specs:
        return Storage("int8", plain, tuple(chosen))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the compressor warns on small tensors that grow; we measure size
        try:
            compressed = bytes(compress(plain, specs))
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"TFLM LUT compression failed: {e}") from e
    from deploy.storage.encode import drop_encoded_quantization

    return Storage("lut", drop_encoded_quantization(compressed), tuple(chosen))


KIND = StorageKind(
    "lut", build, "b-bit indices into per-channel value tables; DECODE restores int8", decoder="LUT"
)
