"""The TFLM interpreter (tflite_micro's host build): run models, quantize inputs, read the arena."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np

from edgeq.errors import EdgeqError

# Generous default: the host has memory to spare; the recording allocator reports what was really used.
DEFAULT_ARENA = 4 * 1024 * 1024


class RuntimeFailure(EdgeqError):
    """A model the TFLM or LiteRT interpreter refused to load or run."""


@dataclass(frozen=True)
class TensorQuant:
    """Shape, dtype and affine quantization of a model input or output."""

    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float
    zero_point: int


def host_arena_size(model: bytes) -> int:
    """A host arena large enough for any edgeq model: INT4 or LUT weights unpack to <= ~2.7x their bytes."""
    return DEFAULT_ARENA + 4 * len(model)


def tflm_interpreter(model: bytes, *, arena_size: int | None = None, alt_decompression: int = 0):
    """A TFLM interpreter over model bytes; alt_decompression > 0 sends DECODE output there."""
    from tflite_micro.python.tflite_micro import runtime

    arena_size = host_arena_size(model) if arena_size is None else arena_size
    try:
        return runtime.Interpreter.from_bytes(
            bytes(model), arena_size=arena_size, alt_decompression_memory_size=alt_decompression
        )
    except (RuntimeError, ValueError) as e:
        raise RuntimeFailure(f"TFLM could not load the model: {str(e).splitlines()[0]}") from e


def io_quant(interp, which: str = "input", index: int = 0) -> TensorQuant:
    """Quantization of a TFLM or LiteRT interpreter's input/output tensor."""
    if hasattr(interp, "get_input_details") and not hasattr(interp, "allocate_tensors"):
        det = interp.get_input_details(index) if which == "input" else interp.get_output_details(index)
    else:  # LiteRT returns lists
        det = (interp.get_input_details() if which == "input" else interp.get_output_details())[index]
    qp = det["quantization_parameters"]
    scales, zps = np.asarray(qp["scales"]), np.asarray(qp["zero_points"])
    return TensorQuant(
        shape=tuple(int(s) for s in det["shape"]),
        dtype=np.dtype(det["dtype"]),
        scale=float(scales[0]) if scales.size else 0.0,
        zero_point=int(zps[0]) if zps.size else 0,
    )


def quantize_input(x: np.ndarray, q: TensorQuant) -> np.ndarray:
    """Float inputs -> the model's integer input type, with its own scale and zero point."""
    if q.dtype.kind == "f" or q.scale == 0.0:
        return np.asarray(x, dtype=q.dtype)
    info = np.iinfo(q.dtype)
    return np.clip(np.round(np.asarray(x) / q.scale + q.zero_point), info.min, info.max).astype(q.dtype)


def dequantize(y: np.ndarray, q: TensorQuant) -> np.ndarray:
    """Integer outputs -> float with the output's scale and zero point."""
    if q.dtype.kind == "f" or q.scale == 0.0:
        return np.asarray(y, dtype=np.float32)
    return (np.asarray(y, dtype=np.float32) - q.zero_point) * q.scale


def invoke_all(interp, x: np.ndarray) -> np.ndarray:
    """Raw (integer) outputs of a TFLM interpreter for every float input row of x, one invoke each."""
    q = io_quant(interp, "input")
    outs = []
    for row in quantize_input(x, q):
        interp.set_input(row.reshape(q.shape), 0)
        interp.invoke()
        outs.append(np.array(interp.get_output(0)).reshape(1, -1))
    return np.concatenate(outs)


def run_tflm(model: bytes, x: np.ndarray, *, alt_decompression: int = 0) -> np.ndarray:
    """Raw (integer) outputs of the TFLM interpreter for every float input row of x, one invoke each."""
    return invoke_all(tflm_interpreter(model, alt_decompression=alt_decompression), x)


_ARENA_RE = re.compile(r"Arena allocation total (\d+) bytes")


def capture_fd_output(fn) -> str:
    """Run fn() and return what C code wrote to file descriptors 1 and 2 meanwhile."""
    with tempfile.TemporaryFile() as tmp:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            fn()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        tmp.seek(0)
        return tmp.read().decode(errors="replace")


def interpreter_arena(interp, alt_decompression: int = 0) -> int:
    """Arena total of an interpreter's recording allocator (after an invoke), plus alt decompression."""
    m = _ARENA_RE.search(capture_fd_output(interp.print_allocations))
    if not m:
        raise RuntimeFailure("TFLM printed no arena figure; is this the recording interpreter?")
    return int(m.group(1)) + alt_decompression


def kernel_set_arena(model: bytes, kernels: str, host_arena: int, *, alt_decompression: int = 0) -> int:
    """The host's best figure for the arena a kernel set needs (host TFLM runs the reference kernels).

    host_arena: the model's own host TFLM arena, which holds as it is for the reference kernels and for a
    model with no INT4 tensor.

    The reference kernels unpack every INT4 weight tensor into an arena scratch buffer; CMSIS-NN reads INT4
    packed. For cmsis-nn this is the host arena of the model with its INT4 tensors widened to INT8: the
    same activations, DECODE buffers and interpreter structures without the unpack scratch (CMSIS-NN's own
    small scratch is left to the firmware's margin; a virtual board measures the device's own figure).
    """
    if kernels != "cmsis-nn":
        return host_arena
    from deploy.flatbuffer import unpack_int4_tensors

    widened = unpack_int4_tensors(model)
    return host_arena if widened == model else arena_bytes(widened, alt_decompression=alt_decompression)


def arena_bytes(model: bytes, sample: np.ndarray | None = None, *, alt_decompression: int = 0) -> int:
    """Arena total of the TFLM recording allocator after one invoke (plus alt decompression memory)."""
    interp = tflm_interpreter(model, alt_decompression=alt_decompression)
    q = io_quant(interp, "input")
    row = np.zeros(q.shape, q.dtype) if sample is None else quantize_input(sample, q).reshape(q.shape)
    interp.set_input(row, 0)
    interp.invoke()
    return interpreter_arena(interp, alt_decompression)
