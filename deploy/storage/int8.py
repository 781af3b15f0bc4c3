"""int8 storage: every weight tensor one byte per value, as TFLM's kernels read them without unpacking."""

from __future__ import annotations

from deploy.flatbuffer import unpack_int4_tensors, weight_tensors
from deploy.storage.base import Storage, StorageKind


def build(converted: bytes) -> Storage:
    """The converted model with INT4 tensors widened to INT8 (same values)."""
    plain = unpack_int4_tensors(converted)
    return Storage("int8", plain, weight_tensors(plain))


KIND = StorageKind(
    "int8", build, "one byte per weight, no decoder, no unpack buffer", in_auto=False, buffers_on=()
)
