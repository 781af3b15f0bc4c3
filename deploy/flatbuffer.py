"""Read a .tflite flatbuffer: its operators, its tensors as stored, and the TFLM op-resolver calls it needs.

Parsing uses the schema bindings that ship with tflite-micro (``schema_py_generated``, the same module
``tflite_micro...compression.model_editor`` builds on), so what we report is what TFLM will read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from tflite_micro.tensorflow.lite.micro.compression.decode import DecodeCommonMetadata, DecodeType
from tflite_micro.tensorflow.lite.micro.compression.decode_insert import DECODE_CUSTOM_OP_NAME
from tflite_micro.tensorflow.lite.micro.python.schema_py_generated import TensorType

from edgeq.errors import EdgeqError

# The custom code tflite_micro.compression's decode_insert gives the DECODE operator.
DECODE_OP = DECODE_CUSTOM_OP_NAME
# DECODE Common Metadata: the 16-byte header before each decode type's own data.
_DCM_SIZE = DecodeCommonMetadata.SIZE
_DCM_LUT = DecodeType.LUT.code
INT8, INT4 = TensorType.INT8, TensorType.INT4
# The operators whose second input is a constant weight tensor that edgeq stores.
WEIGHT_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"})
# LUT ancillary byte 5: bits 7-4 axis, 15 meaning one table for the whole tensor (lut.LutAncillaryData).
_LUT_PER_TENSOR_AXIS = 0xF

# MicroMutableOpResolver method per operator, from tflite-micro's micro_mutable_op_resolver.h.
_RESOLVER = {
    "ABS": "AddAbs",
    "ADD": "AddAdd",
    "ADD_N": "AddAddN",
    "ARG_MAX": "AddArgMax",
    "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable",
    "AVERAGE_POOL_2D": "AddAveragePool2D",
    "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd",
    "BROADCAST_ARGS": "AddBroadcastArgs",
    "BROADCAST_TO": "AddBroadcastTo",
    "CALL_ONCE": "AddCallOnce",
    "CAST": "AddCast",
    "CEIL": "AddCeil",
    "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D",
    "COS": "AddCos",
    "CUMSUM": "AddCumSum",
    "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D",
    "DEQUANTIZE": "AddDequantize",
    "DIV": "AddDiv",
    "ELU": "AddElu",
    "EQUAL": "AddEqual",
    "EXP": "AddExp",
    "EXPAND_DIMS": "AddExpandDims",
    "FILL": "AddFill",
    "FLOOR": "AddFloor",
    "FLOOR_DIV": "AddFloorDiv",
    "FLOOR_MOD": "AddFloorMod",
    "FULLY_CONNECTED": "AddFullyConnected",
    "GATHER": "AddGather",
    "GATHER_ND": "AddGatherNd",
    "GREATER": "AddGreater",
    "GREATER_EQUAL": "AddGreaterEqual",
    "HARD_SWISH": "AddHardSwish",
    "IF": "AddIf",
    "L2_NORMALIZATION": "AddL2Normalization",
    "L2_POOL_2D": "AddL2Pool2D",
    "LEAKY_RELU": "AddLeakyRelu",
    "LESS": "AddLess",
    "LESS_EQUAL": "AddLessEqual",
    "LOG": "AddLog",
    "LOGICAL_AND": "AddLogicalAnd",
    "LOGICAL_NOT": "AddLogicalNot",
    "LOGICAL_OR": "AddLogicalOr",
    "LOGISTIC": "AddLogistic",
    "LOG_SOFTMAX": "AddLogSoftmax",
    "MAXIMUM": "AddMaximum",
    "MAX_POOL_2D": "AddMaxPool2D",
    "MEAN": "AddMean",
    "MINIMUM": "AddMinimum",
    "MIRROR_PAD": "AddMirrorPad",
    "MUL": "AddMul",
    "NEG": "AddNeg",
    "NOT_EQUAL": "AddNotEqual",
    "PACK": "AddPack",
    "PAD": "AddPad",
    "PADV2": "AddPadV2",
    "PRELU": "AddPrelu",
    "QUANTIZE": "AddQuantize",
    "READ_VARIABLE": "AddReadVariable",
    "REDUCE_MAX": "AddReduceMax",
    "RELU": "AddRelu",
    "RELU6": "AddRelu6",
    "RESHAPE": "AddReshape",
    "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor",
    "ROUND": "AddRound",
    "RSQRT": "AddRsqrt",
    "SELECT_V2": "AddSelectV2",
    "SHAPE": "AddShape",
    "SIN": "AddSin",
    "SLICE": "AddSlice",
    "SOFTMAX": "AddSoftmax",
    "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd",
    "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit",
    "SPLIT_V": "AddSplitV",
    "SQRT": "AddSqrt",
    "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference",
    "SQUEEZE": "AddSqueeze",
    "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub",
    "SUM": "AddSum",
    "SVDF": "AddSvdf",
    "TANH": "AddTanh",
    "TRANSPOSE": "AddTranspose",
    "TRANSPOSE_CONV": "AddTransposeConv",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    "UNPACK": "AddUnpack",
    "VAR_HANDLE": "AddVarHandle",
    "WHILE": "AddWhile",
    "ZEROS_LIKE": "AddZerosLike",
    # Custom operators go by their custom code.
    DECODE_OP: "AddDecode",
    "TFLite_Detection_PostProcess": "AddDetectionPostprocess",
    "CIRCULAR_BUFFER": "AddCircularBuffer",
}

_NUMPY = {
    "FLOAT16": "<f2",
    "FLOAT32": "<f4",
    "FLOAT64": "<f8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "BOOL": "<u1",
}


class FlatbufferError(EdgeqError):
    """Bytes that are not a readable TFLite flatbuffer."""


class UnsupportedOperator(EdgeqError):
    """Operators TFLM's MicroMutableOpResolver has no kernel for."""


@dataclass(frozen=True)
class LutInfo:
    """How a LUT-compressed tensor is stored: index width, value tables, and the tensor DECODE restores."""

    bits: int
    per_channel: bool
    axis: int | None
    tables: int
    table_size: int
    decoded_type: str
    decoded_shape: tuple[int, ...]
    ancillary_index: int
    # "dcm": read from the LUT ancillary header; "table-size": ceil(log2(table size)), header not understood.
    source: str = "dcm"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the flatbuffer stores it."""

    subgraph: int
    index: int
    name: str
    type: str
    shape: tuple[int, ...]
    bytes_stored: int
    distinct_values: int | None
    # "per-channel", "per-tensor" or "none"; a LUT-indices tensor reports its decoded tensor's.
    quantization: str
    quantized_dimension: int | None
    # "constant", "activation", "lut-indices" (packed LUT indices), "lut-ancillary" (header + value
    # tables) or "lut-decoded" (DECODE's output: lives in the arena, not in flash).
    role: str
    lut: LutInfo | None = None

    @property
    def lut_bits(self) -> int | None:
        """Index bit width when the tensor holds LUT indices, else None."""
        return self.lut.bits if self.lut else None


@dataclass(frozen=True)
class ModelInfo:
    """Operators, tensors and size of one .tflite."""

    ops: list[str]
    tensors: list[TensorInfo] = field(default_factory=list)
    flash_bytes: int = 0
    subgraphs: int = 1
    # Tensor indices of the main subgraph's inputs and outputs.
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def tensor(self, index: int, subgraph: int = 0) -> TensorInfo:
        """The tensor at index in subgraph."""
        return next(t for t in self.tensors if t.subgraph == subgraph and t.index == index)

    def io_bytes(self, index: int) -> int:
        """Bytes of one main-subgraph tensor at run time (elements times element size)."""
        t = self.tensor(index)
        n = int(np.prod(t.shape)) if t.shape else 1
        return n * (np.dtype(_NUMPY[t.type]).itemsize if t.type in _NUMPY else 4)


def _schema():
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated

    return schema_py_generated


def _enum_names(enum_cls) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def _parse(model_bytes: bytes, label: str = "the model"):
    """The schema's ModelT for model_bytes, or FlatbufferError saying why not (deploy.verify's checks)."""
    from deploy.verify import parse_verified

    return parse_verified(model_bytes, label)


def check_flatbuffer(model_bytes: bytes, label: str = "the model") -> None:
    """Raise FlatbufferError unless model_bytes parse as a TFLite flatbuffer."""
    _parse(model_bytes, label)


def _opcode_names(fb) -> list[str]:
    from deploy.verify import opcode_name

    # Pre-2.3 files only fill deprecated_builtin_code; opcode_name takes the larger of the two, as TFLite.
    return [opcode_name(oc) for oc in fb.operatorCodes or []]


def operators(model_bytes: bytes) -> list[str]:
    """Distinct operator names in graph order (builtin enum names; custom ops by their custom code)."""
    return _operators(_parse(model_bytes))


def _operators(fb) -> list[str]:
    codes = _opcode_names(fb)
    seen: dict[str, None] = {}
    for sg in fb.subgraphs:
        for op in sg.operators or []:
            seen.setdefault(codes[op.opcodeIndex], None)
    return list(seen)


def resolver_calls(ops: list[str]) -> list[str]:
    """MicroMutableOpResolver method (e.g. AddConv2D) per distinct op; UnsupportedOperator if one lacks it."""
    missing = [op for op in ops if op not in _RESOLVER]
    if missing:
        raise UnsupportedOperator(
            f"TFLM has no kernel for: {', '.join(dict.fromkeys(missing))}; "
            "replace these layers or register a custom kernel"
        )
    return [_RESOLVER[op] for op in dict.fromkeys(ops)]


def unpack_int4(raw: bytes, count: int) -> np.ndarray:
    """INT4 values packed two per byte (low nibble first), sign-extended to int8."""
    b = np.frombuffer(raw, np.uint8)
    vals = np.empty(b.size * 2, np.int8)
    vals[0::2] = (b & 0x0F).astype(np.int8)
    vals[1::2] = (b >> 4).astype(np.int8)
    vals[vals > 7] -= 16
    return vals[:count]


def pack_int4(vals: np.ndarray) -> bytes:
    """TFLite's packed INT4 (low nibble first) from int8 values in -8..7: the inverse of unpack_int4."""
    v = (vals.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if v.size % 2:
        v = np.append(v, np.uint8(0))
    return (v[0::2] | (v[1::2] << 4)).astype(np.uint8).tobytes()


def _buffer_bytes(fb, model: bytes, idx: int) -> bytes:
    if not idx or idx >= len(fb.buffers):
        return b""
    b = fb.buffers[idx]
    if b.offset and b.offset > 1:
        return model[b.offset : b.offset + b.size]
    return b.data.tobytes() if b.data is not None else b""


def _quant(t) -> tuple[str, int | None]:
    q = t.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return "none", None
    if len(q.scale) > 1:
        return "per-channel", int(q.quantizedDimension)
    return "per-tensor", None


def _distinct(data: bytes, type_name: str, count: int) -> int | None:
    if type_name == "INT4":
        return int(np.unique(unpack_int4(data, count)).size)
    dt = _NUMPY.get(type_name)
    if dt is None or len(data) % np.dtype(dt).itemsize:
        return None
    return int(np.unique(np.frombuffer(data, dt)).size)


def _lut(anc: bytes, enc: bytes, decoded_type: str, decoded_shape: tuple[int, ...], anc_index: int):
    """(LutInfo, distinct decoded values) of one LUT-compressed tensor; (None, None) if not a LUT."""
    if len(anc) < _DCM_SIZE or anc[0] != _DCM_LUT:
        return None, None
    n = int(np.prod(decoded_shape)) if decoded_shape else 1
    dt = _NUMPY.get(decoded_type)
    item = np.dtype(dt).itemsize if dt else 1
    tables_bytes = anc[_DCM_SIZE:]
    if anc[1] == 1 and anc[4] == 1 and 1 <= (anc[5] & 0x07) and anc[6] > 0:
        bits, axis_field, stride = anc[5] & 0x07, anc[5] >> 4, anc[6]
        axis = None if axis_field == _LUT_PER_TENSOR_AXIS else int(axis_field)
        source = "dcm"
    else:
        # Unknown header version: fall back to the table length (one table assumed).
        stride = max(1, len(tables_bytes) // item)
        bits, axis, source = max(1, math.ceil(math.log2(stride))), None, "table-size"
    n_tables = len(tables_bytes) // (stride * item) if stride else 0
    info = LutInfo(
        bits=bits,
        per_channel=axis is not None,
        axis=axis,
        tables=n_tables,
        table_size=stride,
        decoded_type=decoded_type,
        decoded_shape=decoded_shape,
        ancillary_index=anc_index,
        source=source,
    )
    if dt is None or source != "dcm" or len(enc) * 8 < n * bits or n_tables < 1:
        return info, None
    # Indices are packed MSB first (lut.pack_indices); rebuild them and look the values up.
    bitarr = np.unpackbits(np.frombuffer(enc, np.uint8))[: n * bits].reshape(n, bits).astype(np.int64)
    idx = bitarr @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    tables = np.frombuffer(tables_bytes[: n_tables * stride * item], dt).reshape(n_tables, stride)
    if idx.max(initial=0) >= stride:
        return info, None
    if axis is None:
        values = tables[0][idx]
    else:
        idx_nd = np.moveaxis(idx.reshape(decoded_shape), axis, 0)
        if idx_nd.shape[0] != n_tables:
            return info, None
        values = np.take_along_axis(tables, idx_nd.reshape(n_tables, -1), axis=1)
    return info, int(np.unique(values).size)


def describe(model_bytes: bytes) -> ModelInfo:
    """Operators, every tensor (type, shape, bytes, distinct values, quantization, LUT) and flash bytes."""
    fb = _parse(model_bytes)
    model = bytes(model_bytes)
    types = _enum_names(_schema().TensorType)
    codes = _opcode_names(fb)
    tensors: list[TensorInfo] = []
    for si, sg in enumerate(fb.subgraphs):
        sg_tensors = sg.tensors or []
        # DECODE inputs come in (encoded, ancillary) pairs, one decoded output per pair (decode_insert.py).
        lut_of: dict[int, tuple[LutInfo, int | None, object]] = {}
        ancillary: set[int] = set()
        decoded: set[int] = set()
        for op in sg.operators or []:
            if codes[op.opcodeIndex] != DECODE_OP:
                continue
            ins, outs = list(op.inputs), list(op.outputs)
            for k, out_idx in enumerate(outs):
                if 2 * k + 1 >= len(ins):
                    break
                enc_i, anc_i = int(ins[2 * k]), int(ins[2 * k + 1])
                if enc_i in lut_of:
                    continue
                dec = sg_tensors[out_idx]
                dec_type = types.get(dec.type, str(dec.type))
                dec_shape = tuple(int(s) for s in (dec.shape if dec.shape is not None else []))
                anc = _buffer_bytes(fb, model, sg_tensors[anc_i].buffer)
                enc = _buffer_bytes(fb, model, sg_tensors[enc_i].buffer)
                info, distinct = _lut(anc, enc, dec_type, dec_shape, anc_i)
                if info is not None:
                    lut_of[enc_i] = (info, distinct, dec)
                    ancillary.add(anc_i)
                    decoded.add(int(out_idx))
        for ti, t in enumerate(sg_tensors):
            type_name = types.get(t.type, str(t.type))
            shape = tuple(int(s) for s in (t.shape if t.shape is not None else []))
            data = _buffer_bytes(fb, model, t.buffer)
            count = int(np.prod(shape)) if shape else 1
            lut = lut_of.get(ti)
            if lut is not None:
                info, distinct, dec = lut
                qkind, qdim = _quant(dec)
                role = "lut-indices"
            else:
                info = None
                qkind, qdim = _quant(t)
                if ti in ancillary:
                    role = "lut-ancillary"
                elif ti in decoded:
                    role = "lut-decoded"
                else:
                    role = "constant" if data else "activation"
                distinct = _distinct(data, type_name, count) if data and role == "constant" else None
            name = t.name.decode(errors="replace") if isinstance(t.name, bytes) else str(t.name or "")
            tensors.append(
                TensorInfo(
                    subgraph=si,
                    index=ti,
                    name=name,
                    type=type_name,
                    shape=shape,
                    bytes_stored=len(data),
                    distinct_values=distinct,
                    quantization=qkind,
                    quantized_dimension=qdim,
                    role=role,
                    lut=info,
                )
            )
    main = fb.subgraphs[0]
    return ModelInfo(
        ops=_operators(fb),
        tensors=tensors,
        flash_bytes=len(model),
        subgraphs=len(fb.subgraphs),
        inputs=[int(i) for i in (main.inputs if main.inputs is not None else [])],
        outputs=[int(i) for i in (main.outputs if main.outputs is not None else [])],
    )


# -- Editing: tflite_micro's model_editor (what the compressor itself reads and writes) ---------------


def read(model_bytes: bytes):
    """The model as tflite_micro's editable model_editor.Model."""
    from tflite_micro.tensorflow.lite.micro.compression import model_editor

    return model_editor.read(bytes(model_bytes))


def build(model) -> bytes:
    """model_editor's Model.build(), each buffer packed as one numpy vector: the same bytes, sooner.

    model_editor hands the generated flatbuffer code its buffers as Python lists, which that code packs
    one byte per call: 56 s of VGG-16's reference slicing went there, for 7.5 MB of weights.
    """
    schema = _schema()
    pack = schema.BufferT.Pack

    def pack_numpy(self, builder):
        if isinstance(self.data, list) and self.data:
            self.data = np.asarray(self.data, dtype=np.uint8)
        return pack(self, builder)

    schema.BufferT.Pack = pack_numpy
    try:
        return bytes(model.build())
    finally:
        schema.BufferT.Pack = pack


def weight_inputs(model) -> list[tuple[object, str]]:
    """(tensor, op name) for every constant weight input of a conv/dense operator of a model_editor.Model."""
    seen, out = set(), []
    for sg in model.subgraphs:
        for op in sg.operators:
            name = _editor_op_name(model, op)
            if name not in WEIGHT_OPS or len(op.inputs) < 2:
                continue
            t = op.inputs[1]
            if t is None or t.buffer is None or not len(t.buffer.data) or id(t) in seen:
                continue
            seen.add(id(t))
            out.append((t, name))
    return out


def _editor_op_name(model, op) -> str:
    """A model_editor operator's name by the schema's rule (deploy.verify.opcode_name)."""
    # model_editor's own opcode_name ignores deprecated_builtin_code, all that pre-2.3 files fill.
    from deploy.verify import opcode_name

    k = op.opcode_index
    if k is None or not 0 <= k < len(model.operator_codes):
        return op.opcode_name
    return opcode_name(model.operator_codes[k]._fb)


def tensor_values(t) -> np.ndarray:
    """A model_editor weight tensor's integer values (INT4 unpacked), in its shape."""
    count = int(np.prod(t.shape))
    raw = bytes(t.buffer.data)
    vals = unpack_int4(raw, count) if t.dtype == INT4 else np.frombuffer(raw, np.int8)[:count]
    return vals.reshape(tuple(int(s) for s in t.shape))


def is_per_channel(t) -> bool:
    """True when a model_editor tensor carries one scale per channel."""
    q = t.quantization
    return q is not None and q.scales is not None and np.size(q.scales) > 1


def channel_axis(t) -> int:
    """The quantized dimension of a per-channel tensor (0 for per-tensor ones)."""
    return int(t.quantization.axis or 0) if is_per_channel(t) else 0


def max_distinct(vals: np.ndarray, per_channel: bool, axis: int = 0) -> int:
    """Most distinct values in any LUT unit: the whole tensor, or each channel along axis."""
    if not per_channel:
        return int(np.unique(vals).size)
    v = np.moveaxis(vals, axis, 0).reshape(vals.shape[axis], -1)
    s = np.sort(v, axis=1)
    return int(np.max(1 + np.count_nonzero(np.diff(s, axis=1), axis=1)))


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
    lut_bits: int | None = None  # index bits when a DECODE of some kind restores it

    @classmethod
    def of(cls, t, op: str, lut_bits: int | None = None) -> WeightTensor:
        """The description of model_editor tensor t, the weight input of an op."""
        pc = is_per_channel(t)
        return cls(
            index=int(t.index),
            name=str(t.name or ""),
            op=op,
            shape=tuple(int(s) for s in t.shape),
            stored_type="INT4" if t.dtype == INT4 else "INT8",
            per_channel=pc,
            distinct=max_distinct(tensor_values(t), pc, channel_axis(t)),
            lut_bits=lut_bits,
        )


def weight_tensors(model_bytes: bytes) -> tuple[WeightTensor, ...]:
    """The conv/dense weight tensors of a flatbuffer with their storage and distinct-value counts."""
    return tuple(WeightTensor.of(t, op) for t, op in weight_inputs(read(model_bytes)))


def unpack_int4_tensors(model_bytes: bytes) -> bytes:
    """The same model with every INT4 weight tensor stored as INT8 (identical values); unchanged without."""
    model = read(model_bytes)
    packed = [t for t, _ in weight_inputs(model) if t.dtype == INT4]
    if not packed:
        return bytes(model_bytes)  # not rebuilt: a DECODE model's layout and alignment stay as they are
    for t in packed:
        widen_int4(t)
    return build(model)


def widen_int4(t) -> None:
    """Store a model_editor INT4 weight tensor as INT8, the same values (the LUT compressor reads int8)."""
    t.buffer.data = tensor_values(t).astype(np.int8).tobytes()
    t.dtype = INT8


# Metadata the converter writes for people and for LiteRT's version checks; TFLM never reads it.
DROPPED_METADATA = (b"min_runtime_version", b"CONVERSION_METADATA")


class _SharedVectors:
    """A flatbuffers.Builder wrapper that writes the arrays compact names once per content and kind.

    A flatbuffer table refers to its vectors by offset, so two tables may point at one vector; TFLM and
    LiteRT read them through the offsets as before. `shared` maps an array's id to its kind: arrays of one
    kind with equal content are written once. compact names only arrays whose equality does not depend on
    the trained values (zero points of 0 of the weights and biases; shapes and tensor indices; one
    activation's quantization around a pooling or reshape), so the stored size stays a function of the
    plan (deploy.storage.cost). Scales and other zero points match by chance, and are written as they are.
    """

    def __init__(self, size: int, shared: dict[int, object]) -> None:
        import flatbuffers

        self._b = flatbuffers.Builder(size)
        self._shared = shared
        self._seen: dict[tuple, int] = {}

    def __getattr__(self, name: str):
        return getattr(self._b, name)

    def CreateNumpyVector(self, x: np.ndarray) -> int:  # noqa: N802 (the flatbuffers API's name)
        kind = self._shared.get(id(x))
        if kind is None:
            return self._b.CreateNumpyVector(x)
        key = (kind, x.dtype.str, x.tobytes())
        if key not in self._seen:
            self._seen[key] = self._b.CreateNumpyVector(x)
        return self._seen[key]


# Operators whose int8 inputs and output carry one quantization in TFLite (or, for CONCATENATION, in
# the files the slicer writes: a sliced layer's slices and their join keep the layer's output's).
SAME_QUANTIZATION = ("CONCATENATION", "MAX_POOL_2D", "AVERAGE_POOL_2D", "RESHAPE", "SQUEEZE", "EXPAND_DIMS")


def _structural_vectors(root, codes: list[str]) -> dict[int, object]:
    """The ids of the arrays compact may write once per content: what the graph, not the weights, fixes.

    Shapes (but of DECODE's inputs, whose sizes follow the bits) and the operators' and subgraphs'
    tensor-index vectors; and, around the operators of SAME_QUANTIZATION, the activations' scale and zero
    point vectors, made one array where they are equal. codes: the model's operator names (_opcode_names).
    """
    decode = {i for i, c in enumerate(codes) if c == DECODE_OP}
    same = {i for i, c in enumerate(codes) if c in SAME_QUANTIZATION}
    shared: dict[int, object] = {}
    for sg in root.subgraphs or []:
        ops = sg.operators or []
        encoded = {i for op in ops if op.opcodeIndex in decode for i in op.inputs}
        vectors = [sg.inputs, sg.outputs, *(v for op in ops for v in (op.inputs, op.outputs))]
        vectors += [t.shape for i, t in enumerate(sg.tensors or []) if i not in encoded]
        shared.update((id(v), "index") for v in vectors if isinstance(v, np.ndarray) and v.dtype == np.int32)
        for op in ops:
            if op.opcodeIndex not in same:
                continue
            first: dict[tuple, object] = {}
            for i in [*op.inputs, *op.outputs]:
                q = sg.tensors[i].quantization if i >= 0 else None
                if q is None or q.scale is None or q.zeroPoint is None:
                    continue
                key = (q.scale.tobytes(), q.zeroPoint.tobytes(), q.quantizedDimension)
                if key in first:
                    q.scale, q.zeroPoint = first[key].scale, first[key].zeroPoint
                else:
                    first[key] = q
                    shared.update({id(q.scale): id(q.scale), id(q.zeroPoint): id(q.zeroPoint)})
    return shared


def _renumber_buffers(root, metadata: list) -> None:
    """Buffer 0 (empty) for every tensor without data, one buffer per stored vector, nothing else.

    The converter gives each activation its own empty buffer (16 B each) and tflite-micro's rebuild leaves
    the copies of the metadata it rewrote behind, referenced by nothing.
    """
    old = root.buffers or []
    new, index = [_schema().BufferT()], {}

    def place(i: int) -> int:
        data = old[i].data
        if data is None or len(data) == 0:
            return 0
        if i not in index:
            index[i] = len(new)
            new.append(old[i])
        return index[i]

    for sg in root.subgraphs or []:
        for t in sg.tensors or []:
            t.buffer = place(t.buffer)
    for m in metadata:
        m.buffer = place(m.buffer)
    root.buffers = new


def compact(model_bytes: bytes) -> bytes:
    """The same model with only what TFLM reads, each structural vector once (every export passes here).

    Drops tensor and subgraph names, has_rank flags, the description, the signatures, the converter's
    metadata (DROPPED_METADATA) and every buffer without data but buffer 0; writes the weights' zero points
    of 0, the shapes and index vectors, and the quantization a pooling or reshape passes on, once each
    (see _SharedVectors). The 4-bit digits model (qiu, sliced): 16,968 B -> 15,312 B; LeNet-5's: 311,208
    -> 304,232 B. Every stored variant is then checked bit for bit in TFLM (deploy.storage.choose); LiteRT
    loads the int8 and INT4 results and computes what it did before (tests/test_flatbuffer.py).
    """
    schema = _schema()
    root = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    root.description = None
    root.signatureDefs = None
    kept = [m for m in root.metadata or [] if m.name not in DROPPED_METADATA]
    root.metadata = kept or None
    # One all-zero zero-point array per length for the weight and bias tensors: the constants and what
    # DECODE outputs (a decoded weight takes over its quantization).
    zeros: dict[int, np.ndarray] = {}
    codes = _opcode_names(root)
    decode = {i for i, c in enumerate(codes) if c == DECODE_OP}
    for sg in root.subgraphs or []:
        sg.name = None
        decoded = {o for op in sg.operators or [] if op.opcodeIndex in decode for o in op.outputs}
        for i, t in enumerate(sg.tensors or []):
            t.name = None
            if t.shape is not None and len(t.shape):
                t.hasRank = False  # LiteRT reads it only for a shape of unknown rank; TFLM never
            q, data = t.quantization, root.buffers[t.buffer].data
            weight = (data is not None and len(data) > 0) or i in decoded
            if weight and q is not None and q.zeroPoint is not None and not np.any(q.zeroPoint):
                n = len(q.zeroPoint)
                q.zeroPoint = zeros.setdefault(n, np.zeros(n, np.int64))
    shared = {id(z): "zero points" for z in zeros.values()} | _structural_vectors(root, codes)
    _renumber_buffers(root, kept)
    builder = _SharedVectors(len(model_bytes) + 1024, shared)
    builder.Finish(root.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def entropy_bytes(values: np.ndarray) -> float:
    """n * H(values) / 8: the bytes an ideal entropy coder needs for these integers."""
    vals = np.asarray(values).reshape(-1)
    _, counts = np.unique(vals, return_counts=True)
    p = counts / vals.size
    return vals.size * float(-(p * np.log2(p)).sum()) / 8


def entropy_limit(model_bytes: bytes) -> int:
    """sum over weight tensors of entropy_bytes, plus 4 bytes per output channel's int32 bias.

    The floor an ideal entropy coder reaches on the stored integers, beside the fixed-width packing limit.
    """
    total = 0.0
    for t, _ in weight_inputs(read(model_bytes)):
        total += entropy_bytes(tensor_values(t)) + 4 * int(t.shape[0])
    return int(np.ceil(total))
