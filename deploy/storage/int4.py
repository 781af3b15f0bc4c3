"""INT4 storage: the converter's packed 4-bit tensors for layers with <= 4 bits, int8 elsewhere."""

from __future__ import annotations

from deploy.flatbuffer import weight_tensors
from deploy.storage.base import Storage, StorageKind


def build(converted: bytes) -> Storage:
    """The converted model as it is: TF 2.21 emits packed INT4 for QAT layers of <= 4 bits."""
    return Storage("int4", converted, weight_tensors(converted))


KIND = StorageKind(
    "int4",
    build,
    "packed 4-bit tensors (two per byte); the reference kernels unpack them into the arena",
    buffers_on=("reference",),  # CMSIS-NN's INT4 conv and fully-connected kernels read them packed
)
