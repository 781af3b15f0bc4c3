"""Check untrusted .tflite bytes before any runtime reads them: structure, indices, sizes, operator codes.

Neither the ``flatbuffers`` Python package nor tflite_micro ships a flatbuffer verifier for Python, and
TFLM's C++ reader trusts every offset and index it is given. So the check walks the whole schema with
the bindings tflite_micro ships (``schema_py_generated``, the reader TFLM's own tools use): its reads
raise on any offset outside the file, and every index, size and shape TFLM would follow is checked
against what the file holds.
"""

from __future__ import annotations

import functools
import math
import struct

import numpy as np

from deploy.flatbuffer import DECODE_OP, FlatbufferError

# Smallest flatbuffer with a root table: root offset, file identifier, a vtable and a table.
MIN_BYTES = 16
# "Not absurd": no tensor above the 2 GiB a flatbuffer can address, and no rank far beyond what any
# kernel takes (TFLM's RuntimeShape holds 6 dimensions, LiteRT's broadcasting ops 8): a higher rank
# is legal but TFLM-unfriendly, and the sandbox reports what TFLM makes of it.
MAX_TENSOR_BYTES = 2**31
MAX_RANK = 16
_TODO = "pass a .tflite written by the TFLite converter"
# Bits per element; None: no fixed size (strings, resources, variants).
_BITS = {
    "FLOAT32": 32,
    "FLOAT16": 16,
    "INT32": 32,
    "UINT8": 8,
    "INT64": 64,
    "STRING": None,
    "BOOL": 8,
    "INT16": 16,
    "COMPLEX64": 64,
    "INT8": 8,
    "FLOAT64": 64,
    "COMPLEX128": 128,
    "UINT64": 64,
    "RESOURCE": None,
    "VARIANT": None,
    "UINT32": 32,
    "UINT16": 16,
    "INT4": 4,
    "BFLOAT16": 16,
    "INT2": 2,
    "UINT4": 4,
    "FLOAT8_E4M3FN": 8,
    "FLOAT8_E5M2": 8,
}
_CUSTOM = 32  # BuiltinOperator.CUSTOM


def _schema():
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated

    return schema_py_generated


def _names(enum_cls) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def builtin_code(op_code) -> int:
    """The operator's builtin code: the larger of builtin_code and deprecated_builtin_code (schema_utils)."""
    # Files before schema 3a fill only the int8 deprecated field; newer ones fill both, or put 127
    # (PLACEHOLDER_FOR_GREATER_OP_CODES) there for codes that do not fit in int8.
    return max(int(op_code.builtinCode or 0), int(op_code.deprecatedBuiltinCode or 0))


def opcode_name(op_code) -> str:
    """Builtin enum name of an OperatorCodeT (e.g. CONV_2D), or its custom code for a custom operator."""
    code = builtin_code(op_code)
    if code == _CUSTOM and op_code.customCode:
        c = op_code.customCode
        return c.decode(errors="replace") if isinstance(c, bytes) else str(c)
    return _builtin_names().get(code, f"BUILTIN_{code}")


@functools.cache
def _builtin_names() -> dict[int, str]:
    return _names(_schema().BuiltinOperator)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:120]


def _bad(label: str, what: str) -> FlatbufferError:
    return FlatbufferError(f"{label} is not a TFLite flatbuffer ({what}); {_TODO}")


def _string_ends_in_file(buf: bytes, tab, field: int) -> bool:
    """Does the string at vtable slot `field` of a raw table end, NUL-terminated, inside buf?"""
    o = tab.Offset(field)
    if not o:
        return True
    at = o + tab.Pos
    start = at + struct.unpack_from("<I", buf, at)[0]
    (length,) = struct.unpack_from("<I", buf, start)
    end = start + 4 + length
    return end < len(buf) and buf[end] == 0


def _check_strings(buf: bytes, label: str) -> None:
    """Custom codes and metadata names, which C code compares with strcmp: inside the file, UTF-8."""
    raw = _schema().Model.GetRootAs(buf, 0)
    for i in range(raw.OperatorCodesLength()):
        oc = raw.OperatorCodes(i)
        if not _string_ends_in_file(buf, oc._tab, 6):
            raise _bad(label, f"the custom code of operator code {i} runs past the end of the file")
    for i in range(raw.MetadataLength()):
        if not _string_ends_in_file(buf, raw.Metadata(i)._tab, 4):
            raise _bad(label, f"the name of metadata entry {i} runs past the end of the file")


def _text(value, label: str, what: str) -> str:
    if value is None:
        return ""
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise _bad(label, f"{what} is not UTF-8 text") from None


def _check_indices(indices, n: int, label: str, what: str, allow_absent: bool) -> None:
    low = -1 if allow_absent else 0
    for i in [] if indices is None else indices:
        if not low <= int(i) < n:
            raise _bad(label, f"{what} names tensor {int(i)}, but the subgraph has {n} tensors")


def _subgraph_refs(options) -> list[int]:
    """Subgraph indices a control-flow operator's options name (IF, WHILE, CALL_ONCE, StableHLO)."""
    refs: list[int] = []
    for key, value in vars(options).items() if options is not None else ():
        if "ubgraph" in key and value is not None:
            refs.extend(int(v) for v in np.atleast_1d(np.asarray(value)).ravel())
    return refs


def _check_tensor(t, where: str, buffers, label: str, types: dict[int, str], lut_indices: bool) -> None:
    """Check one tensor's type, shape, buffer (bytes = elements x type size) and quantization."""
    type_name = types.get(int(t.type))
    if type_name is None:
        raise _bad(label, f"{where} has tensor type {int(t.type)}, which the TFLite schema does not define")
    shape = [] if t.shape is None else [int(s) for s in t.shape]
    if len(shape) > MAX_RANK:
        raise _bad(label, f"{where} has {len(shape)} dimensions (at most {MAX_RANK})")
    if any(s < 0 for s in shape):
        raise _bad(label, f"{where} has a negative dimension in its shape {shape}")
    count = math.prod(shape)
    bits = _BITS.get(type_name)
    if bits is not None and math.ceil(count * bits / 8) > MAX_TENSOR_BYTES:
        raise _bad(label, f"{where} of shape {shape} would take over {MAX_TENSOR_BYTES // 2**30} GiB")
    if not 0 <= int(t.buffer) < len(buffers):
        raise _bad(label, f"{where} names buffer {int(t.buffer)}, but the file has {len(buffers)} buffers")
    b = buffers[int(t.buffer)]
    if b.offset and b.offset > 1:
        stored: int | None = int(b.size)
    else:
        stored = None if b.data is None or len(b.data) == 0 else len(b.data)
    if stored is not None and bits is not None and t.sparsity is None:
        expected = math.ceil(count * bits / 8)
        if stored != expected:
            raise _bad(
                label,
                f"{where} of shape {shape} and type {type_name} needs {expected} bytes, "
                f"its buffer holds {stored}",
            )
    q = t.quantization
    scales = 0 if q is None or q.scale is None else len(q.scale)
    zeros = 0 if q is None or q.zeroPoint is None else len(q.zeroPoint)
    if scales and zeros and zeros != scales:
        raise _bad(label, f"{where} has {scales} quantization scales but {zeros} zero points")
    if scales > 1:
        axis = int(q.quantizedDimension)
        if not 0 <= axis < len(shape):
            raise _bad(label, f"{where} is quantized along dimension {axis} of {len(shape)}")
        # A LUT-compressed tensor keeps its decoded tensor's per-channel scales over its packed indices.
        if shape[axis] != scales and not lut_indices:
            raise _bad(label, f"{where} has {scales} per-channel scales for {shape[axis]} channels")


def _check_model(fb, buf: bytes, label: str) -> None:
    s = _schema()
    types = _names(s.TensorType)
    builtins = _builtin_names()
    n_file, buffers = len(buf), fb.buffers or []
    for i, b in enumerate(buffers):
        # Models over 2 GB keep buffer data after the flatbuffer, addressed by offset/size.
        if b.offset and b.offset > 1 and int(b.offset) + int(b.size) > n_file:
            raise _bad(
                label,
                f"buffer {i} lies at bytes {int(b.offset)}..{int(b.offset) + int(b.size)}, past the "
                f"end of the {n_file}-byte file; truncated?",
            )
    codes = fb.operatorCodes or []
    names = []
    for i, oc in enumerate(codes):
        code = builtin_code(oc)
        if code not in builtins:
            raise _bad(label, f"operator code {i} is builtin {code}, which this TFLM's schema does not know")
        custom = _text(oc.customCode, label, f"the custom code of operator code {i}")
        if code == _CUSTOM and not custom:
            raise _bad(label, f"operator code {i} is a custom operator without a custom code")
        names.append(custom if code == _CUSTOM else builtins[code])
    subgraphs = fb.subgraphs or []
    if not subgraphs:
        raise _bad(label, "no subgraphs")
    if not subgraphs[0].operators:
        raise _bad(label, "the main subgraph has no operators")
    for si, sg in enumerate(subgraphs):
        tensors = sg.tensors or []
        n = len(tensors)
        decode_inputs: set[int] = set()
        for k, op in enumerate(sg.operators or []):
            where = f"operator {k} of subgraph {si}"
            if not 0 <= int(op.opcodeIndex) < len(codes):
                raise _bad(label, f"{where} uses operator code {int(op.opcodeIndex)} of {len(codes)}")
            _check_indices(op.inputs, n, label, f"an input of {where}", allow_absent=True)
            _check_indices(op.outputs, n, label, f"an output of {where}", allow_absent=True)
            _check_indices(op.intermediates, n, label, f"an intermediate of {where}", allow_absent=True)
            for ref in _subgraph_refs(op.builtinOptions) + _subgraph_refs(op.builtinOptions2):
                if not 0 <= ref < len(subgraphs):
                    raise _bad(label, f"{where} calls subgraph {ref}, but the file has {len(subgraphs)}")
            if (
                op.largeCustomOptionsOffset
                and int(op.largeCustomOptionsOffset) + int(op.largeCustomOptionsSize or 0) > n_file
            ):
                raise _bad(label, f"the custom options of {where} lie past the end of the file; truncated?")
            if names[int(op.opcodeIndex)] == DECODE_OP:
                decode_inputs.update(int(i) for i in op.inputs if i >= 0)
        _check_indices(sg.inputs, n, label, f"an input of subgraph {si}", allow_absent=False)
        _check_indices(sg.outputs, n, label, f"an output of subgraph {si}", allow_absent=False)
        for ti, t in enumerate(tensors):
            _check_tensor(t, f"tensor {ti} of subgraph {si}", buffers, label, types, ti in decode_inputs)
    for i, meta in enumerate(fb.metadata or []):
        _text(meta.name, label, f"the name of metadata entry {i}")
        if not 0 <= int(meta.buffer) < len(buffers):
            raise _bad(label, f"metadata entry {i} names buffer {int(meta.buffer)} of {len(buffers)}")
    for i, sig in enumerate(fb.signatureDefs or []):
        if not 0 <= int(sig.subgraphIndex) < len(subgraphs):
            raise _bad(label, f"signature {i} names subgraph {int(sig.subgraphIndex)} of {len(subgraphs)}")
        n = len(subgraphs[int(sig.subgraphIndex)].tensors or [])
        for tm in [*(sig.inputs or []), *(sig.outputs or [])]:
            if not 0 <= int(tm.tensorIndex) < n:
                raise _bad(label, f"signature {i} names tensor {int(tm.tensorIndex)} of {n} in its subgraph")


def parse_verified(model_bytes: bytes, label: str = "the model"):
    """The schema's ModelT of model_bytes once every check of verify_tflite has passed."""
    if not isinstance(model_bytes, (bytes, bytearray, memoryview)):
        raise _bad(label, f"got {type(model_bytes).__name__}")
    buf = bytes(model_bytes)
    if len(buf) < MIN_BYTES:
        raise _bad(label, f"only {len(buf)} bytes")
    # Checked first: the schema reader happily "parses" all-zero or random bytes into an empty model.
    if buf[4:8] != b"TFL3":
        raise _bad(label, f"no TFL3 identifier at bytes 4-7: {buf[4:8]!r}")
    root = struct.unpack_from("<I", buf, 0)[0]
    if root + 4 > len(buf):
        raise _bad(label, f"root offset {root} past the end; truncated?")
    try:
        # The generated reader raises (struct.error, IndexError, ValueError, TypeError...) on any offset
        # outside the file; reading the whole object tree touches every table TFLM would follow.
        fb = _schema().ModelT.InitFromPackedBuf(buf, 0)
        _check_strings(buf, label)
    except FlatbufferError:
        raise
    except Exception as e:  # noqa: BLE001  (corrupt offsets fail the reader in many ways)
        raise _bad(label, f"truncated or corrupt: {type(e).__name__}: {_one_line(e)}") from e
    try:
        _check_model(fb, buf, label)
    except FlatbufferError:
        raise
    except Exception as e:  # noqa: BLE001  (a field of an unexpected type: still a corrupt file)
        raise _bad(label, f"corrupt: {type(e).__name__}: {_one_line(e)}") from e
    return fb


def verify_tflite(model_bytes: bytes, label: str = "the model") -> None:
    """Raise FlatbufferError (one line: what is wrong, what to do) unless TFLM can safely read model_bytes."""
    parse_verified(model_bytes, label)
