"""DECODE-encoded storages: a tflite_micro compressor plugin applied to a model's weights where it pays.

The shared driver of the PRUNE and HUFFMAN storages (prune.py, huffman.py): which tensors may be encoded,
installing DECODE operators with tflite_micro's decode_insert, and keeping only the encodings that make
the file smaller.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from tflite_micro.tensorflow.lite.micro.compression import (
    compressor,
    constant_inputs,
    decode_insert,
    model_editor,
    spec,
)

# Private in tflite_micro, and the only way to the C++ re-aligner it wraps: the Python flatbuffers
# builder ignores the schema's force_align, and DECODE reads encoded data as 32-bit words (HUFFMAN) and
# value tables in their element type, so buffers must keep the 16-byte alignment TFLM assumes.
from tflite_micro.tensorflow.lite.micro.compression.compress import _apply_flatbuffer_alignment
from tflite_micro.tensorflow.lite.micro.python.schema_py_generated import TensorType

from deploy.flatbuffer import INT4, WeightTensor, build, read, unpack_int4_tensors, weight_inputs
from deploy.storage.base import Storage, StorageError


def weight_tensor_ids(model: model_editor.Model) -> list[tuple[int, int]]:
    """(subgraph, tensor index) of every constant weight input of a conv, depthwise conv or dense op."""
    where = {id(t): (si, ti) for si, sg in enumerate(model.subgraphs) for ti, t in enumerate(sg.tensors)}
    return [where[id(t)] for t, _ in weight_inputs(model)]


def _tensor(model: model_editor.Model, sg: int, ti: int) -> model_editor.Tensor:
    """The named tensor, checked to be a constant INT8 tensor the DECODE output may replace."""
    if not 0 <= sg < len(model.subgraphs) or not 0 <= ti < len(model.subgraphs[sg].tensors):
        raise StorageError(f"no tensor {ti} in subgraph {sg}; name tensors as (subgraph, tensor index)")
    subgraph = model.subgraphs[sg]
    tensor = subgraph.tensors[ti]
    if tensor.buffer is None or not len(tensor.buffer.data):
        raise StorageError(
            f"tensor {ti} ({tensor.name!r}) of subgraph {sg} is not constant; only weights encode"
        )
    if tensor.dtype == INT4:
        raise StorageError(
            f"tensor {ti} ({tensor.name!r}) is packed INT4; widen the model with "
            "deploy.flatbuffer.unpack_int4_tensors first (build() does)"
        )
    uses = constant_inputs.find_uses(subgraph, tensor)
    if uses:
        raise StorageError(
            f"tensor {ti} ({tensor.name!r}) must stay constant: " + "; ".join(u.describe() for u in uses)
        )
    return tensor


def _with_decode(model_bytes: bytes, results: dict[tuple[int, int], compressor.CompressionResult]) -> bytes:
    """The model with the encoded tensors installed behind DECODE operators, 16-byte aligned."""
    model = model_editor.read(bytes(model_bytes))
    with warnings.catch_warnings():
        # decode_insert warns and skips a tensor sharing its buffer with an unencoded one: size can't drop.
        warnings.simplefilter("ignore")
        decode_insert.insert_decode_operators(model, results)
    for sg, ti in results:
        encoded = model.subgraphs[sg].tensors[ti]
        if encoded.dtype == TensorType.UINT8 and encoded.quantization is None:
            # decode_insert clears the wrapper's quantization, but build() keeps the TensorT's own copy, so
            # the UINT8 encoded tensor would carry the scales and zero points its DECODE output also
            # carries: 12 bytes per channel twice (1.5 KB for a 128-channel depthwise filter).
            encoded._fb.quantization = None
    return bytes(_apply_flatbuffer_alignment(build(model)))


def drop_encoded_quantization(model_bytes: bytes) -> bytes:
    """The model with every DECODE operator's encoded (UINT8) inputs stripped of quantization.

    TFLM's decode_insert leaves each encoded tensor the scales and zero points its DECODE output carries:
    12 bytes per channel that TFLM never reads, and on a depthwise filter a quantized dimension the 1-D
    encoded tensor does not have (so the file fails verification). TFLM's compress() output needs this too.
    """
    from deploy.flatbuffer import DECODE_OP

    model = model_editor.read(bytes(model_bytes))
    changed = False
    for sg in model.subgraphs:
        for op in sg.operators:
            if op.custom_code != DECODE_OP:
                continue
            for encoded in op.inputs[0::2]:  # (encoded, ancillary) pairs, one pair per decoded output
                if encoded.dtype == TensorType.UINT8 and encoded._fb.quantization is not None:
                    encoded.quantization = None
                    encoded._fb.quantization = None
                    changed = True
    return bytes(_apply_flatbuffer_alignment(build(model))) if changed else bytes(model_bytes)


def encode_model(
    model_bytes: bytes,
    plugin: compressor.Compressor,
    method: spec.CompressionMethod,
    tensors: list[tuple[int, int]] | None = None,
) -> bytes:
    """The model with each chosen tensor encoded by plugin behind a DECODE operator, where that pays.

    tensors: (subgraph, tensor index) pairs; None means every conv/dense weight. A tensor is encoded only
    if its payload (encoded + ancillary bytes) is smaller than its raw bytes and encoding it alone makes
    the file smaller: each DECODE also costs the flatbuffer 150-350 bytes (an operator, two tensors, their
    names, alignment), more than a small tensor saves. With nothing worth encoding the input comes back
    unchanged.
    """
    model = model_editor.read(bytes(model_bytes))
    chosen = weight_tensor_ids(model) if tensors is None else [(int(s), int(t)) for s, t in tensors]
    results: dict[tuple[int, int], compressor.CompressionResult] = {}
    for sg, ti in dict.fromkeys(chosen):
        tensor = _tensor(model, sg, ti)
        try:
            result = plugin.compress(tensor, method)
        except compressor.CompressionError as e:
            raise StorageError(
                f"{plugin.decode_type.name} cannot encode tensor {ti} ({tensor.name!r}): {e}"
            ) from e
        if len(result.encoded_data) + len(result.ancillary_data) < len(tensor.buffer.data):
            results[(sg, ti)] = result
    if not results:
        return bytes(model_bytes)
    base = len(_with_decode(model_bytes, {}))  # the rebuilt model, so layouts compare like for like
    paying = {k: r for k, r in results.items() if len(_with_decode(model_bytes, {k: r})) < base}
    if not paying:
        return bytes(model_bytes)
    encoded = _with_decode(model_bytes, paying)
    return encoded if len(encoded) < len(model_bytes) else bytes(model_bytes)


def storage_of(kind: str, converted: bytes, encode: Callable[[bytes], bytes]) -> Storage:
    """A Storage of the given kind: INT4 tensors widened to int8, then encode(plain model) applied.

    With no tensor worth encoding the model is plain int8 and says so, as the LUT storage does.
    """
    plain = unpack_int4_tensors(converted)
    encoded = encode(plain)
    tensors = tuple(WeightTensor.of(t, op) for t, op in weight_inputs(read(plain)))
    return Storage(kind if encoded != plain else "int8", encoded, tensors)
