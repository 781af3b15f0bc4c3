"""Output-channel slicing of large conv/dense operators so TFLM never materialises a whole weight tensor.

TFLM's DECODE writes a LUT-compressed weight tensor, whole, into the tensor arena (and the INT4 kernels
unpack a packed weight tensor into an arena scratch buffer of its full size), so one 1024x512 dense layer
costs 512 KiB of RAM. Splitting such an operator into several operators over slices of its output
channels, joined by CONCATENATION, bounds the decompressed weights alive at any moment by the slice size:
the memory planner reuses the space of one slice's weights for the next.

This is done on the converted flatbuffer, not by rewriting the Keras model into several Dense/Conv2D
layers, because only here are the numbers guaranteed not to change: each output channel of a
FULLY_CONNECTED/CONV_2D depends only on the input, its own weight row/filter, its own bias and (per-
channel) scale, and the output quantization. Every slice keeps exactly those integers and the ORIGINAL
output scale and zero point, and CONCATENATION with identical input/output quantization copies bytes.
Retraining or reconverting split Keras layers would re-derive scales (per-tensor Dense ranges, bias
rounding) and could move results by one LSB.

INT4 weight tensors are sliced as INT4 (unpacked, sliced, repacked; each slice packs on its own), so
one sliced model serves INT4 storage as is and LUT storage after `lut_compress` (which unpacks to int8
before compressing anyway). DEPTHWISE_CONV_2D is not sliced: an output-channel slice of a depthwise
filter also needs the matching slice of the input activation (an extra SPLIT and its copy); it is left
whole with a warning row.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from deploy.flatbuffer import INT4, INT8, build, pack_int4, tensor_values
from edgeq.errors import EdgeqError

MAX_CONCAT_INPUTS = 10  # TFLM's CONCATENATION kernel takes at most 10 inputs
DEFAULT_DECODE_BUDGET = 16 * 1024
SLICEABLE = {"FULLY_CONNECTED", "CONV_2D"}
WEIGHT_OPS = SLICEABLE | {"DEPTHWISE_CONV_2D"}


class SliceError(EdgeqError):
    """A decode budget that is unparsable or too small for some layer."""


@dataclass(frozen=True)
class SliceRow:
    """One weight operator: how it was sliced, or why it was left whole."""

    layer: str  # the Keras layer name recovered from the output tensor's name
    op: str
    out_channels: int
    weight_bytes: int  # decompressed (int8) size of the whole weight tensor
    slices: int  # 1 = left whole
    largest_slice_bytes: int  # decompressed (int8) size of the largest slice
    warning: str = ""


@dataclass
class SliceResult:
    """The sliced model bytes and one row per conv/dense operator."""

    model: bytes
    budget: int
    rows: list[SliceRow] = field(default_factory=list)

    @property
    def sliced(self) -> list[SliceRow]:
        """Rows of the operators that were split."""
        return [r for r in self.rows if r.slices > 1]

    @property
    def warnings(self) -> list[SliceRow]:
        """Rows of operators over budget that had to be left whole."""
        return [r for r in self.rows if r.warning]


def parse_budget(text: str | int) -> int:
    """Bytes from '16KiB', '16KB', '16k', '90000B' or '90000' (deploy.boards.parse_size: KB = KiB = 1024)."""
    from deploy.boards import BoardError, parse_size

    try:
        value = parse_size(int(text) if isinstance(text, np.integer) else text)
    except BoardError as e:
        raise SliceError(f"cannot parse decode budget {text!r}: {e}") from e
    if value <= 0:
        raise SliceError(f"decode budget {text!r} must be a positive number of bytes, e.g. 16KiB")
    return value


def _slice_tensor(t, lo: int, hi: int, name: str | None, values: np.ndarray | None = None):
    """Constant tensor t restricted to rows lo:hi of axis 0, with matching per-channel quantization."""
    from tflite_micro.tensorflow.lite.micro.compression import model_editor

    if values is None:
        values = np.frombuffer(bytes(t.buffer.data), t.numpy_dtype).reshape(tuple(int(s) for s in t.shape))
    part = np.ascontiguousarray(values[lo:hi])
    new = t.copy()
    new.name = name  # copy(name=None) would keep the original's long name
    new.shape = part.shape
    new._fb.shapeSignature = None
    data = pack_int4(part) if t.dtype == INT4 else part.tobytes()
    new.buffer = model_editor.Buffer(data=data)
    q = t.quantization
    if q is not None and np.size(q.scales) > 1:
        zps = list(q.zero_points)
        zps = zps[lo:hi] if len(zps) == len(q.scales) else zps
        new.quantization = model_editor.Quantization(list(q.scales[lo:hi]), zps, q.axis)
    return new


def _activation_slice(out, lo: int, hi: int, name: str):
    """An activation tensor like out (same dtype and quantization) with the last axis lo:hi."""
    new = out.copy(name=name)
    new.buffer = None
    shape = list(out.shape)
    shape[-1] = hi - lo
    new.shape = shape
    new._fb.shapeSignature = None  # TFLM ignores it; it would cost flash on every slice
    return new


def _concat_op(inputs, output):
    """A CONCATENATION operator along the last (channel) axis with no fused activation."""
    from tflite_micro.tensorflow.lite.micro.compression import model_editor
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as tflite

    fb = tflite.OperatorT()
    fb.builtinOptionsType = tflite.BuiltinOptions.ConcatenationOptions
    opts = tflite.ConcatenationOptionsT()
    opts.axis = len(output.shape) - 1
    opts.fusedActivationFunction = tflite.ActivationFunctionType.NONE
    fb.builtinOptions = opts
    return model_editor.Operator(
        opcode=tflite.BuiltinOperator.CONCATENATION, inputs=list(inputs), outputs=[output], _fb=fb
    )


def _join(parts: list[tuple[list, object]], output, base: str) -> list:
    """Operators computing output from (ops, slice tensor) parts, as a CONCATENATION tree of fan-in <= 10.

    Leaf groups are emitted depth-first (a group's slice ops, then its CONCATENATION) so only one group's
    slice outputs are alive at a time.
    """
    if len(parts) == 1:
        raise AssertionError("a single part needs no join")
    level = 0
    while len(parts) > MAX_CONCAT_INPUTS:
        groups = np.array_split(np.arange(len(parts)), int(np.ceil(len(parts) / MAX_CONCAT_INPUTS)))
        merged = []
        for g, idx in enumerate(groups):
            members = [parts[i] for i in idx]
            if len(members) == 1:
                merged.append(members[0])
                continue
            widths = [int(t.shape[-1]) for _, t in members]
            t = _activation_slice(output, 0, sum(widths), f"{base}/c{level}_{g}")
            ops = [op for o, _ in members for op in o] + [_concat_op([t_ for _, t_ in members], t)]
            merged.append((ops, t))
        parts = merged
        level += 1
    return [op for o, _ in parts for op in o] + [_concat_op([t for _, t in parts], output)]


def layer_name(tensor_name: str) -> str:
    """The Keras layer name inside a converter tensor name ('sequential/quant_fc1/MatMul;...' -> 'fc1')."""
    parts = tensor_name.split(";")[0].split("/")
    name = parts[1] if len(parts) > 2 else parts[0]
    return name.removeprefix("quant_") or tensor_name


def _plan_slices(out_channels: int, per_channel: int, budget: int) -> list[tuple[int, int]]:
    """Balanced contiguous channel ranges, each at most budget bytes of int8 weights."""
    widest = budget // per_channel
    n = int(np.ceil(out_channels / widest))
    bounds = np.linspace(0, out_channels, n + 1).round().astype(int)
    # linspace rounding can make one range a channel wider than floor(out/n); widest still bounds it
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _why_not(op, w, bias) -> str:
    """Why op cannot be sliced here, or '' if it can."""
    if op.opcode_name not in SLICEABLE:
        return "depthwise filters also need the input split; left whole"
    if w.dtype not in (INT8, INT4):
        return f"weights of tensor type {w.dtype} (not int8/int4); left whole"
    if op.opcode_name == "FULLY_CONNECTED" and len(w.shape) != 2:
        return f"FULLY_CONNECTED weights of shape {tuple(w.shape)} (not 2-D); left whole"
    if op.opcode_name == "CONV_2D" and len(w.shape) != 4:
        return f"CONV_2D weights of shape {tuple(w.shape)} (not OHWI); left whole"
    if op.opcode_name == "FULLY_CONNECTED" and getattr(op._fb.builtinOptions, "weightsFormat", 0) != 0:
        return "shuffled FULLY_CONNECTED weights format; left whole"
    q = w.quantization
    if q is not None and np.size(q.scales) > 1 and (q.axis or 0) != 0:
        return f"per-channel weights quantized along axis {q.axis}, not the output axis; left whole"
    if bias is not None and (bias.buffer is None or int(np.prod(bias.shape)) != int(w.shape[0])):
        return "bias is not a constant per-output-channel vector; left whole"
    if len(op.outputs) != 1:
        return "operator with several outputs; left whole"
    return ""


def slice_weights(model_bytes: bytes, decode_budget: int | str = DEFAULT_DECODE_BUDGET) -> SliceResult:
    """Split every conv/dense operator whose int8 weights exceed decode_budget bytes along output channels."""
    from tflite_micro.tensorflow.lite.micro.compression import model_editor

    budget = parse_budget(decode_budget)
    model = model_editor.read(bytes(model_bytes))
    # First pass: find what must be sliced and check the budget against every one of them before editing.
    todo, rows, too_small = [], [], []
    for si, sg in enumerate(model.subgraphs):
        for op in sg.operators:
            if op.opcode_name not in WEIGHT_OPS or len(op.inputs) < 2:
                continue
            w = op.inputs[1]
            if w is None or w.buffer is None or not len(w.buffer.data):
                continue
            name = layer_name(str(op.outputs[0].name)) if op.outputs else op.opcode_name
            size = int(np.prod(w.shape))
            oc = int(w.shape[-1] if op.opcode_name == "DEPTHWISE_CONV_2D" else w.shape[0])
            bias = op.inputs[2] if len(op.inputs) > 2 else None
            if size <= budget:
                rows.append(SliceRow(name, op.opcode_name, oc, size, 1, size))
                continue
            why = _why_not(op, w, bias)
            if why:
                rows.append(SliceRow(name, op.opcode_name, oc, size, 1, size, why))
                continue
            per_channel = size // oc
            if per_channel > budget:
                too_small.append((per_channel, name))
            todo.append((si, op, name, size, oc, per_channel))
    if too_small:
        worst, layer = max(too_small)
        need = max(p for _, _, _, _, _, p in todo)
        raise SliceError(
            f"decode budget {budget} B is smaller than one output channel of {layer!r} ({worst} B of int8 "
            f"weights); the smallest budget that works for this model is {need} B ({need / 1024:.2f} KiB)"
        )
    for si, op, name, size, oc, per_channel in todo:
        sg = model.subgraphs[si]
        w, x = op.inputs[1], op.inputs[0]
        bias = op.inputs[2] if len(op.inputs) > 2 else None
        out = op.outputs[0]
        wvals = tensor_values(w)
        ranges = _plan_slices(oc, per_channel, budget)
        parts = []
        for k, (lo, hi) in enumerate(ranges):
            # every slice adds tensors, each name costs flash (and DECODE derives more names from them):
            # constants go unnamed, slice outputs get short names for reading the graph
            ws = _slice_tensor(w, lo, hi, None, wvals)
            bs = None if bias is None else _slice_tensor(bias, lo, hi, None)
            ys = _activation_slice(out, lo, hi, f"{name}/y{k}")
            # the copied OperatorT keeps builtin options: fused activation, strides, padding, dilation
            sop = model_editor.Operator(
                opcode=op.opcode,
                inputs=[x, ws, bs, *op.inputs[3:]] if len(op.inputs) > 2 else [x, ws],
                outputs=[ys],
                custom_code=op.custom_code,
                _fb=copy.deepcopy(op._fb),
            )
            parts.append(([sop], ys))
        pos = sg.operators.index(op)
        sg.operators[pos : pos + 1] = _join(parts, out, name)
        still_used = {id(t) for o in sg.operators for t in o.inputs if t is not None}
        sg.tensors = [t for t in sg.tensors if not ((t is w or t is bias) and id(t) not in still_used)]
        largest = max(hi - lo for lo, hi in ranges) * per_channel
        rows.append(SliceRow(name, op.opcode_name, oc, size, len(ranges), largest))
    if todo:
        model_editor.prune_buffers(model)  # the whole weight/bias buffers must not stay in flash
        out_bytes = build(model)
    else:
        out_bytes = bytes(model_bytes)
    return SliceResult(out_bytes, budget, rows)


def op_names(model_bytes: bytes) -> list[str]:
    """The first subgraph's operator kinds in execution order (custom ops by their custom code)."""
    from tflite_micro.tensorflow.lite.micro.compression import model_editor

    return [op.opcode_name for op in model_editor.read(bytes(model_bytes)).subgraphs[0].operators]


def decode_placement_problems(model_bytes: bytes) -> list[str]:
    """Every DECODE whose output is not consumed only by the operator right after it ([] when all are)."""
    from tflite_micro.tensorflow.lite.micro.compression import model_editor

    problems = []
    for sg in model_editor.read(bytes(model_bytes)).subgraphs:
        ops = sg.operators
        for i, op in enumerate(ops):
            if op.opcode_name != "TFLM_DECODE":
                continue
            for y in op.outputs:
                users = [j for j, o in enumerate(ops) if any(t is y for t in o.inputs)]
                if users != [i + 1]:
                    problems.append(
                        f"DECODE #{i} output {y.name!r} is read by operators {users}, not only #{i + 1}"
                    )
    return problems


def max_concat_fan_in(model_bytes: bytes) -> int:
    """The largest number of inputs of any CONCATENATION operator (0 if there is none)."""
    from tflite_micro.tensorflow.lite.micro.compression import model_editor

    model = model_editor.read(bytes(model_bytes))
    return max(
        (
            len(op.inputs)
            for sg in model.subgraphs
            for op in sg.operators
            if op.opcode_name == "CONCATENATION"
        ),
        default=0,
    )
