"""TFLM PRUNE storage: one mask bit per weight plus the kept values, restored by a DECODE operator.

The format is what tensorflow/lite/micro/kernels/decode_state_prune.cc reads:

- encoded tensor: one bit per element of the decoded tensor in C order, most significant bit first
  (element i is bit ``7 - i % 8`` of byte ``i // 8``); 1 means "the next kept value", 0 means "the zero
  point";
- ancillary tensor: the 16-byte DECODE Common Metadata (type 2, DCM version 1, byte 4 = PRUNE version 1),
  then the kept values in C order, in the decoded tensor's own element type.

A pruned element decodes to the tensor's zero point, not to 0: one zero point for a per-tensor
tensor, the channel's zero point for a per-channel int8 tensor (channel axis 0 or the last axis; the
runtime rejects any other quantized dimension). TFLite int8 weights are symmetric (zero point 0), so
"pruned" means "exactly zero" for every weight tensor the converter writes.

The model driver it shares with HUFFMAN (pick the weights, keep the encodings that pay, insert DECODE)
is deploy/storage/encode.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tflite_micro.tensorflow.lite.micro.compression import (
    compressor,
    decode,
    model_editor,
    spec,
)

from deploy.flatbuffer import INT8
from deploy.storage.base import Storage, StorageError, StorageKind
from deploy.storage.encode import encode_model, storage_of

PRUNE_VERSION = 1  # decode_state_prune.cc refuses any other value in DCM byte 4


@dataclass(frozen=True)
class PrunedArray:
    """A tensor as PRUNE stores it: the packed keep mask and the kept values' bytes."""

    mask: bytes
    values: bytes
    count: int  # elements of the decoded tensor

    @property
    def ancillary_data(self) -> bytes:
        """The whole ancillary tensor: DCM header (PRUNE, version 1) then the kept values."""
        dcm = decode.DecodeCommonMetadata(
            decode_type=decode.DecodeType.PRUNING, user_data=bytes([PRUNE_VERSION])
        )
        return dcm.to_bytes() + self.values

    @property
    def size(self) -> int:
        """Payload bytes: the mask plus the ancillary tensor (flatbuffer bookkeeping not included)."""
        return len(self.mask) + decode.DecodeCommonMetadata.SIZE + len(self.values)


def _broadcast_zero_points(values: np.ndarray, zero_points: np.ndarray | int, axis: int) -> np.ndarray:
    """Zero points shaped to broadcast against values: a scalar, or one per channel along axis."""
    zp = np.asarray(zero_points, dtype=np.int64).reshape(-1)
    if zp.size == 1:
        return zp.reshape(())
    if values.ndim == 0 or zp.size != values.shape[axis]:
        raise StorageError(
            f"{zp.size} zero points for a tensor of shape {values.shape} along axis {axis}; "
            "give one zero point, or one per channel"
        )
    shape = [1] * values.ndim
    shape[axis] = zp.size
    return zp.reshape(shape)


def prune_array(values: np.ndarray, zero_points: np.ndarray | int = 0, axis: int = 0) -> PrunedArray:
    """PRUNE encoding of an array: elements equal to their zero point drop out, the rest stay in C order."""
    values = np.asarray(values)
    keep = values != _broadcast_zero_points(values, zero_points, axis)
    return PrunedArray(
        mask=np.packbits(keep.reshape(-1), bitorder="big").tobytes(),
        values=np.ascontiguousarray(values[keep]).tobytes(),
        count=int(values.size),
    )


def encoded_size(values: np.ndarray, zero_points: np.ndarray | int = 0, axis: int = 0) -> int:
    """PRUNE payload bytes of an array (mask + DCM + kept values), without building the encoding."""
    values = np.asarray(values)
    kept = int(np.count_nonzero(values != _broadcast_zero_points(values, zero_points, axis)))
    return -(-values.size // 8) + decode.DecodeCommonMetadata.SIZE + kept * values.itemsize


def _runtime_zero_points(tensor: model_editor.Tensor) -> tuple[np.ndarray | int, int]:
    """The zero points and channel axis DecodeStatePrune::Setup will use for tensor's DECODE output."""
    q = tensor.quantization
    if q is None:
        return 0, 0
    rank = len(tensor.shape)
    channels = np.size(q.scales)
    axis = int(q.axis or 0)
    # Setup accepts the last axis only with more than one channel, and otherwise axis 0 alone.
    if not (axis == 0 or (axis == rank - 1 and channels > 1)):
        raise compressor.CompressionError(
            f"quantized dimension {axis} of a {rank}-D tensor with {channels} scale(s): "
            "TFLM's PRUNE decoder takes channel axis 0 or the last axis only"
        )
    zps = np.asarray(q.zero_points, dtype=np.int64).reshape(-1)
    if channels > 1 and zps.size != channels:
        raise compressor.CompressionError(f"{channels} scales but {zps.size} zero points")
    return (zps if channels > 1 else int(zps[0])), axis


class PruneCompressor(compressor.Compressor):
    """tflite_micro compression plugin for PRUNE (its own pruning.py is a stub that raises)."""

    @property
    def decode_type(self) -> decode.DecodeType:
        """DecodeType.PRUNING (2)."""
        return decode.DecodeType.PRUNING

    def compress(
        self, tensor: model_editor.Tensor, method: spec.CompressionMethod
    ) -> compressor.CompressionResult:
        """The mask as the encoded tensor, DCM + kept values as the ancillary tensor."""
        if not isinstance(method, spec.PruningCompression):
            raise compressor.CompressionError(f"PruneCompressor takes PruningCompression, got {type(method)}")
        if tensor.dtype != INT8 or tensor.array is None:
            raise compressor.CompressionError("PRUNE here encodes constant INT8 tensors only")
        zero_points, axis = _runtime_zero_points(tensor)
        pruned = prune_array(tensor.array, zero_points, axis)
        return compressor.CompressionResult(encoded_data=pruned.mask, ancillary_data=pruned.ancillary_data)


# -- The model driver (shared with deploy.storage.huffman) ---------------------------------------------


def compress(model_bytes: bytes, tensors: list[tuple[int, int]] | None = None) -> bytes:
    """The int8 model with its weights (default: every conv/dense weight) PRUNE-encoded where that pays."""
    return encode_model(model_bytes, PruneCompressor(), spec.PruningCompression(), tensors)


def build(converted: bytes) -> Storage:
    """PRUNE storage of a converted model (INT4 widened to int8 first)."""
    return storage_of("prune", converted, compress)


KIND = StorageKind(
    "prune",
    build,
    "a mask bit per weight plus the non-zero values; DECODE restores int8",
    decoder="PRUNE",
    # In --storage auto only when the run prunes (--prune): on dense weights it rarely beats LUT, and each
    # Invoke pays its decode time (HUFFMAN: 2x the digits model's host latency).
    in_auto=False,
    sparse=True,
)
