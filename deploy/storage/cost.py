"""The exporter's byte cost model: flash of the stored .tflite and TFLM arena, per plan and storage (#19).

Calibrated against the real exporter (deploy.export + the storage table, TF 2.21, tflite-micro's
compressor), see benchmarks/cost_model.py. The model starts from one reference conversion of the model
(any plan; `shapes_from_tflite`), which fixes everything no plan changes: the operators, activations,
biases, quantization of the weight tensors, slicing under the decode budget, metadata and the TFLM
persistent arena. What a plan changes is then counted object by object:

- int4 storage (the converter's file, sliced, compacted by deploy.flatbuffer.compact): a layer of <= 4
  bits is packed INT4, ceil(n / 2) bytes whatever b in 2..4, so 2 and 3 bits save nothing over 4;
  others are INT8, n bytes. Data vectors pad to 4 bytes; nothing else in the file depends on the bits.
- lut storage (INT4 widened, every weight tensor with <= 128 distinct values per LUT unit compressed by
  tflite-micro, compacted): per compressed tensor ceil(n * index_bits / 8) bytes of indices, a
  DECODE operator and its output tensor (LUT_TENSOR + LUT_DIM per dimension; the output takes over the
  weight's quantization, the encoded tensor carries none: deploy.storage.encode.drop_encoded_quantization),
  and an ancillary tensor (16-byte DCM + one value table of `stride` int8 entries per unit) that
  byte-identical tensors share (a tensor whose every unit holds the whole symmetric grid has the canonical
  table); once per model the DECODE operator code.
  index_bits = ceil(log2(stride)), stride = the most distinct values in any unit, so a 5-bit layer
  with 9 weights per channel is stored in 4-bit indices.
- int4+lut storage (deploy.storage.lut.build_mixed): the layers a plan names as lut, the others as int4;
  the DECODE operator code once, as lut.
- arena: TFLM's greedy planner, simulated exactly over the activations, each INT4 operator's unpack
  scratch (its int8 weights) and each DECODE output (alive from DECODE to its consumer), 16-byte
  aligned; plus the reference's persistent tail and, per DECODE and per tensor it adds, their
  persistent structs.

The DECODE kernel's own code (flash the .tflite does not hold) is measured per kernel set in
deploy/firmware/code_size.json; predict_storage(decode_code=...) counts it where auto weighs LUT.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# Flatbuffer objects, in bytes (measured on the stored files of digits, LeNet-5 and ResNet-8).
# Fitted on compacted files (deploy.flatbuffer.compact) of digits, LeNet-5 and ResNet-8: 15 LUT files,
# max error 27 B (benchmarks/cost_model.py measures it again).
LUT_OPCODE = 52  # the TFLM_DECODE operator code (custom code string), once per model
LUT_TENSOR = 52  # per compressed tensor: DECODE operator, its output tensor, the 1-D encoded shape...
LUT_DIM = 4  # ...and per dimension of the DECODE output's shape (int32 each)
LUT_ANCILLARY = 36  # per distinct ancillary tensor, beyond its data: tensor table, shape, buffer entry
DCM_BYTES = 16  # DECODE Common Metadata at the head of every ancillary tensor
MAX_LUT_STRIDE = 128  # deploy.storage.lut: 7 index bits at most; tensors with more distinct values stay INT8
# TFLM arena: buffers are 16-byte aligned; persistent structs per DECODE operator and per added tensor
# (NodeAndRegistration 64 B, DecodeState and its pointers, TfLiteEvalTensor 24 B, alignment).
ARENA_ALIGN = 16
TAIL_DECODE = 157
TAIL_TENSOR = 27
TAIL_INT4_OP = 8  # an INT4 operator's scratch-buffer request
WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
STORAGE_KINDS = ("int8", "int4", "lut", "huffman")  # how one weight tensor is stored in the file
DECODED = ("lut", "huffman")  # the tensor kinds a DECODE operator restores
MIXED = "int4+lut"  # per layer: LUT on the layers a plan names, INT4/INT8 on the others (deploy.storage.lut)
EXPORT_STORAGES = ("int4", "lut", "int8", MIXED, "auto")  # the storages predict() knows


def _pad4(n: int) -> int:
    return -(-int(n) // 4) * 4


def _align(n: int) -> int:
    return -(-int(n) // ARENA_ALIGN) * ARENA_ALIGN


def index_bits(stride: int) -> int:
    """LUT index bits for a table of `stride` values (deploy.storage.lut: ceil(log2), at least 1)."""
    return max(1, math.ceil(math.log2(max(int(stride), 2))))


@dataclass(frozen=True)
class WeightSlice:
    """One weight tensor of a layer as stored: the whole kernel or one output-channel slice."""

    op: int  # its operator in ModelShapes.ops
    lo: int  # output channels lo:hi of the layer
    hi: int
    elements: int
    units: int  # LUT tables: one per channel of a per-channel tensor, else one
    per_unit: int  # weights per unit (bounds the distinct values a unit can hold)


@dataclass(frozen=True)
class LayerShape:
    """One planned (conv/dense) layer: its stored kernel shape and its slices."""

    name: str
    op: str
    shape: tuple[int, ...]  # as stored: OHWI (CONV_2D, FULLY_CONNECTED as 1x1 CONV_2D), 1HWC (depthwise)
    per_channel: bool
    slices: tuple[WeightSlice, ...]

    @property
    def elements(self) -> int:
        """Weights in the kernel."""
        return sum(s.elements for s in self.slices)


@dataclass(frozen=True)
class GraphOp:
    """One operator of the reference graph: the activation tensors it reads and writes (ModelShapes ids)."""

    kind: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class ModelShapes:
    """What the byte model needs of one model, from one reference conversion (see shapes_from_tflite)."""

    layers: tuple[LayerShape, ...]
    int8_flash: int  # the stored int4-storage file with every weight tensor INT8
    tail: int  # TFLM persistent arena of that file
    activation_bytes: tuple[int, ...]  # runtime bytes of every non-constant tensor
    ops: tuple[GraphOp, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    decode_budget: int | None
    # The kernels unpack each INT4 tensor into an arena scratch buffer (TFLM's reference kernels); CMSIS-NN
    # reads INT4 packed, so a CMSIS-NN target's shapes set this False (and are not sliced for INT4).
    int4_scratch: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        """The layers' names in graph order."""
        return tuple(layer.name for layer in self.layers)

    def layer(self, name: str) -> LayerShape:
        """The layer called name."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no planned layer {name!r}; layers: {', '.join(self.names)}")

    @functools.cached_property
    def live_bytes(self) -> tuple[int, ...]:
        """Aligned bytes of the activations alive at each operator of the reference graph (kept: the
        planner asks once per layer option)."""
        first = {i: 0 for i in self.inputs}
        last = {i: 0 for i in self.inputs}
        for k, op in enumerate(self.ops):
            for i in (*op.inputs, *op.outputs):
                first.setdefault(i, k)
                last[i] = max(last.get(i, k), k)
        for i in self.outputs:
            last[i] = len(self.ops) - 1
        live = [0] * len(self.ops)
        for i, a in first.items():
            for k in range(a, last[i] + 1):
                live[k] += _align(self.activation_bytes[i])
        return tuple(live)

    @functools.cached_property
    def weight_bytes_int8(self) -> int:
        """The padded int8 payload of every weight tensor (what int8_flash holds of the weights)."""
        return sum(_pad4(s.elements) for layer in self.layers for s in layer.slices)


@dataclass(frozen=True)
class SliceStore:
    """How one weight tensor ends up in the file: int8, int4 or lut (index bits, table stride, shared key)."""

    kind: str
    elements: int
    units: int = 1
    stride: int = 0  # lut: values per table
    tables: Hashable | None = None  # lut: what its value tables hold; equal ones share one ancillary tensor
    per_channel: bool = False
    rank: int = 4  # dimensions of the weight tensor
    coded: tuple[int, int] = (0, 0)  # huffman: (bitstream bytes, ancillary data bytes: DCM + tables)

    @property
    def decoded(self) -> bool:
        """Stored behind a DECODE operator (lut, huffman): an output buffer in the arena, DECODE's structs."""
        return self.kind in DECODED

    @property
    def index_bits(self) -> int:
        """LUT index bits (0 unless lut)."""
        return index_bits(self.stride) if self.kind == "lut" else 0

    @property
    def payload(self) -> int:
        """Bytes of its data vector, padded to 4."""
        if self.kind == "int8":
            return _pad4(self.elements)
        if self.kind == "int4":
            return _pad4(-(-self.elements // 2))
        if self.kind == "huffman":
            return _pad4(self.coded[0])
        return _pad4(-(-self.elements * self.index_bits // 8))

    @property
    def ancillary_bytes(self) -> int:
        """lut, huffman: the ancillary tensor's data (DCM + value or decode tables), padded to 4."""
        if self.kind == "huffman":
            return _pad4(self.coded[1])
        return _pad4(DCM_BYTES + self.units * self.stride) if self.kind == "lut" else 0

    @property
    def share_key(self) -> tuple | None:
        """Byte-identical ancillary tensors are stored once (None: assumed unique)."""
        if self.kind != "lut" or self.tables is None:
            return None
        return (self.units, self.stride, self.per_channel, self.tables)


@dataclass(frozen=True)
class Prediction:
    """The predicted stored file: its storage kind (what --storage auto would pick), flash and arena."""

    storage: str
    flash: int
    layers: Mapping[str, tuple[SliceStore, ...]] = field(repr=False, default_factory=dict)
    shapes: ModelShapes | None = field(repr=False, compare=False, default=None)

    @property
    def decoded(self) -> bool:
        """Some tensor sits behind a DECODE operator: the firmware links the DECODE kernel's code."""
        return self.storage in DECODED or self.storage == MIXED

    @functools.cached_property
    def arena(self) -> int:
        """TFLM's arena bytes, worked out on first use: choosing a storage needs only the flash, and the
        planner prices hundreds of plans, each arena a greedy placement of every buffer of the graph."""
        if self.shapes is None:
            raise ValueError("this Prediction was made without its ModelShapes: no arena to work out")
        return arena_of(self.shapes, self.layers)


# ---------------------------------------------------------------- the reference


def _tflm_tail(model: bytes) -> int:
    """The persistent ('tail') part of TFLM's arena for model, from the recording allocator."""
    from deploy.measure.tflm import capture_fd_output, io_quant, tflm_interpreter

    interp = tflm_interpreter(model)
    q = io_quant(interp, "input")
    interp.set_input(np.zeros(q.shape, q.dtype), 0)
    interp.invoke()
    m = re.search(r"Arena allocation tail (\d+) bytes", capture_fd_output(interp.print_allocations))
    if not m:
        raise RuntimeError("TFLM printed no arena tail; is this the recording interpreter?")
    return int(m.group(1))


def shapes_from_tflite(converted: bytes, decode_budget: int | None = 16 * 1024) -> ModelShapes:
    """The byte model's view of a model, from the converter's output for any plan (names still in it).

    Runs the exporter's value-independent steps on it (slicing under decode_budget, the export's default
    16 KiB; compacting), widens INT4 payloads back to INT8 in the count, and reads the graph and
    TFLM's persistent arena.
    """
    from tflite_micro.tensorflow.lite.micro.compression import model_editor

    # The one import of deploy.export from the storage room: the model predicts the exporter's output, so
    # it slices as the exporter does (imported here: deploy.export imports this package).
    from deploy.export.slicing import layer_name, slice_weights
    from deploy.flatbuffer import INT4, compact, is_per_channel, unpack_int4_tensors

    # The slicer names slices after the op's output (a fused activation's name, e.g. stem_relu); the kernel's
    # own name holds its layer (stem_conv): map the one to the other on the unsliced model.
    true_name = {}
    for op in model_editor.read(bytes(converted)).subgraphs[0].operators:
        w = op.inputs[1] if op.opcode_name in WEIGHT_OPS and len(op.inputs) > 1 else None
        if w is not None and w.name:
            true_name[layer_name(str(op.outputs[0].name))] = layer_name(str(op.inputs[1].name))
    sliced = slice_weights(converted, decode_budget).model if decode_budget else bytes(converted)
    model = model_editor.read(sliced)
    sg = model.subgraphs[0]
    index = {id(t): i for i, t in enumerate(sg.tensors)}
    activations: dict[int, int] = {}

    def act(t) -> int:
        """The id of an activation tensor (registered on first sight)."""
        i = index[id(t)]
        if i not in activations:
            n = int(np.prod(t.shape)) if len(t.shape) else 1
            activations[i] = n * np.dtype(t.numpy_dtype).itemsize
        return i

    def constant(t) -> bool:
        return t.buffer is not None and len(t.buffer.data) > 0

    ops, layers, int4_pad = [], {}, 0
    for k, op in enumerate(sg.operators):
        ins = tuple(act(t) for t in op.inputs if t is not None and not constant(t))
        ops.append(GraphOp(op.opcode_name, ins, tuple(act(t) for t in op.outputs)))
        if op.opcode_name not in WEIGHT_OPS or len(op.inputs) < 2 or not constant(op.inputs[1]):
            continue
        w = op.inputs[1]
        shape = tuple(int(s) for s in w.shape)
        n = int(np.prod(shape))
        if w.dtype == INT4:
            int4_pad += _pad4(n) - _pad4(-(-n // 2))
        depthwise = op.opcode_name == "DEPTHWISE_CONV_2D"
        channels = shape[-1] if depthwise else shape[0]
        pc = is_per_channel(w)
        if w.name:
            name = layer_name(str(w.name))
        else:  # a slice: unnamed, its output named after the slicer's name for the layer
            out = layer_name(str(op.outputs[0].name))
            name = true_name.get(out, out)
        entry = layers.setdefault(name, {"op": op.opcode_name, "pc": pc, "slices": [], "shape": list(shape)})
        lo = entry["slices"][-1].hi if entry["slices"] else 0
        units = channels if pc else 1
        entry["slices"].append(WeightSlice(k, lo, lo + channels, n, units, n // units))
    for entry in layers.values():
        if entry["op"] != "DEPTHWISE_CONV_2D":  # slices split axis 0: the layer's kernel has them all
            entry["shape"][0] = entry["slices"][-1].hi
    stored = compact(sliced)
    # The int4 storage's file with INT8 weights: the tail is read there (INT4 ops add their scratch
    # requests, counted per plan), the flash counted from the INT4 file plus the widening.
    plain = compact(unpack_int4_tensors(sliced)) if int4_pad else stored
    sizes = [0] * len(sg.tensors)
    for i, n in activations.items():
        sizes[i] = n
    return ModelShapes(
        layers=tuple(
            LayerShape(name, e["op"], tuple(e["shape"]), e["pc"], tuple(e["slices"]))
            for name, e in layers.items()
        ),
        int8_flash=len(stored) + int4_pad,
        tail=_tflm_tail(plain),
        activation_bytes=tuple(sizes),
        ops=tuple(ops),
        inputs=tuple(act(t) for t in sg.inputs),
        outputs=tuple(act(t) for t in sg.outputs),
        decode_budget=decode_budget,
    )


# ---------------------------------------------------------------- per-tensor storage


# Per layer, per slice: (stride, tables) -- the most distinct values in any LUT unit, and a key of its value
# tables (equal keys: byte-identical ancillary data, stored once; None: unique). Without it every unit is
# assumed to hold the whole symmetric grid, min(2**b - 1, weights per unit) values, the "full" tables.
Distinct = Mapping[str, Sequence[tuple[int, Hashable | None]]]
FULL = "full"  # the tables key of units holding every level of their symmetric grid


def _slice_parts(layer: LayerShape, values: np.ndarray) -> list[np.ndarray]:
    """Each slice's part of a layer's integers in the stored layout (channels on axis 0; depthwise: the
    last axis), its channels moved to axis 0."""
    v = np.asarray(values)
    rows = np.moveaxis(v, v.ndim - 1 if layer.op == "DEPTHWISE_CONV_2D" else 0, 0)
    return [rows[s.lo : s.hi] for s in layer.slices]


def slice_distinct(layer: LayerShape, values: np.ndarray) -> tuple[tuple[int, Hashable], ...]:
    """(stride, tables key) of each slice of a layer from its integer weights, as deploy.storage.lut will
    see them. values: the stored layout (channels on axis 0; depthwise: the last axis)."""
    out = []
    for part in _slice_parts(layer, values):
        part = part.reshape(part.shape[0], -1)
        rows = part if layer.per_channel else part.reshape(1, -1)
        out.append(_tables(rows))
    return tuple(out)


def _tables(rows: np.ndarray) -> tuple[int, bytes]:
    """(stride, key) of the value tables of rows of int8 values: each row's distinct values ascending,
    zero-padded to the longest, as int8 bytes (np.unique per row, done at once: VGG-16 has 4k channels)."""
    r = rows.shape[0]
    present = np.zeros((r, 256), dtype=bool)
    present[np.arange(r)[:, None], rows.astype(np.int64) + 128] = True
    row, col = np.nonzero(present)  # by row, then value: each row's table in order
    counts = present.sum(axis=1)
    stride = int(counts.max())
    table = np.zeros((r, stride), dtype=np.int8)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    table[row, np.arange(row.size) - starts[row]] = col - 128
    return stride, table.tobytes()


def slice_stores(
    layer: LayerShape, bits: int, storage: str, distinct: Sequence[tuple[int, bool]] | None = None
) -> tuple[SliceStore, ...]:
    """How each of the layer's tensors is stored under the whole-model `storage` (int4, lut or int8)."""
    if storage not in ("int4", "lut", "int8"):
        raise ValueError(f"storage {storage!r}: use int4, lut or int8 (auto picks between int4 and lut)")
    out = []
    rank = len(layer.shape)
    for k, s in enumerate(layer.slices):
        if storage == "int8" or (storage == "int4" and bits > 4):
            out.append(SliceStore("int8", s.elements, s.units, per_channel=layer.per_channel, rank=rank))
            continue
        if storage == "int4":
            out.append(SliceStore("int4", s.elements, s.units, per_channel=layer.per_channel, rank=rank))
            continue
        if distinct is not None:
            stride, tables = distinct[k]
        else:
            stride = min(2**bits - 1, s.per_unit)
            tables = (FULL, bits) if 2**bits - 1 <= s.per_unit else None
        if stride > MAX_LUT_STRIDE:
            out.append(SliceStore("int8", s.elements, s.units, per_channel=layer.per_channel, rank=rank))
        else:
            out.append(SliceStore("lut", s.elements, s.units, stride, tables, layer.per_channel, rank))
    return tuple(out)


def huffman_stores(layer: LayerShape, values: np.ndarray) -> tuple[SliceStore, ...]:
    """How deploy.storage.huffman stores each slice of a layer's integers (stored layout, slice_distinct's):
    HUFFMAN where the code and its DECODE structure take fewer bytes than the int8 tensor, else int8."""
    from deploy.storage.huffman import encoded_parts

    axis = np.ndim(values) - 1 if layer.op == "DEPTHWISE_CONV_2D" else 0
    rank = len(layer.shape)
    out = []
    for s, part in zip(layer.slices, _slice_parts(layer, values), strict=True):
        coded = encoded_parts(np.moveaxis(part, 0, axis).astype(np.int8))  # back in the stored order
        st = SliceStore("huffman", s.elements, s.units, per_channel=layer.per_channel, rank=rank, coded=coded)
        raw = SliceStore("int8", s.elements, s.units, per_channel=layer.per_channel, rank=rank)
        out.append(st if store_flash([st]) < store_flash([raw]) else raw)
    return tuple(out)


@dataclass(frozen=True)
class StoredBytes:
    """What some tensors add to the file, split so that sums over layers stay exact: `own` counts once per
    tensor (payloads, DECODE structure, unshared tables); `shared` maps each share_key to the bytes its
    ancillary tensor adds, which a file holds once however many tensors (of any layer) share it."""

    own: int
    shared: Mapping[Hashable, int]
    decoded: bool  # some tensor sits behind a DECODE operator
    lut: bool  # some tensor is LUT-stored


def stored_bytes(stores: Sequence[SliceStore]) -> StoredBytes:
    """StoredBytes of these tensors."""
    own, shared = 0, {}
    for st in stores:
        own += st.payload
        if not st.decoded:
            continue
        own += LUT_TENSOR + LUT_DIM * st.rank
        key = st.share_key
        if key is None:
            own += LUT_ANCILLARY + st.ancillary_bytes
        elif key not in shared:
            shared[key] = LUT_ANCILLARY + st.ancillary_bytes
    return StoredBytes(own, shared, any(st.decoded for st in stores), any(st.kind == "lut" for st in stores))


def bytes_total(parts: Sequence[StoredBytes]) -> int:
    """Bytes these tensors add to one file: each own part, each shared table once."""
    shared: dict[Hashable, int] = {}
    for p in parts:
        shared.update(p.shared)
    return sum(p.own for p in parts) + sum(shared.values())


def store_flash(stores: Sequence[SliceStore]) -> int:
    """Bytes these tensors add to the file: payloads, and for lut the DECODE structure and ancillary data.

    Ancillary tensors shared within the sequence are counted once (across layers, see flash_of).
    """
    return bytes_total([stored_bytes(stores)])


def family_base(shapes: ModelShapes, storage: str) -> int:
    """Flash of the stored file without the weight tensors' storage-dependent bytes (see store_flash)."""
    base = shapes.int8_flash - shapes.weight_bytes_int8
    if storage in DECODED or storage == MIXED:
        return base + LUT_OPCODE  # the DECODE operator code is new
    return base  # int8, int4: compact writes the same structure whatever the weights' types


def check_layers(shapes: ModelShapes, bits: Mapping[str, int]) -> None:
    """KeyError naming the layers a plan has and the model lacks."""
    unknown = sorted(set(bits) - set(shapes.names))
    if unknown:
        raise KeyError(f"plan names layers the model lacks: {unknown}; layers: {', '.join(shapes.names)}")


def resolve(
    shapes: ModelShapes,
    bits: Mapping[str, int],
    storage: str,
    distinct: Distinct | None = None,
    lut_layers: Collection[str] = (),
) -> dict[str, tuple[SliceStore, ...]]:
    """Every layer's tensors under a storage; layers missing from bits stay at 8 bits. MIXED stores the
    lut_layers as LUT and the others as int4 would."""
    check_layers(shapes, bits)
    return {
        layer.name: slice_stores(
            layer,
            int(bits.get(layer.name, 8)),
            layer_storage(storage, layer.name, lut_layers),
            (distinct or {}).get(layer.name),
        )
        for layer in shapes.layers
    }


def layer_storage(storage: str, name: str, lut_layers: Collection[str]) -> str:
    """How one layer's tensors are stored under a storage: MIXED's per layer, the others' whole-model."""
    if storage != MIXED:
        return storage
    return "lut" if name in lut_layers else "int4"


def flash_of(shapes: ModelShapes, stores: Mapping[str, Sequence[SliceStore]], storage: str) -> int:
    """Bytes of the stored file."""
    return layers_flash(shapes, [stored_bytes(stores[layer.name]) for layer in shapes.layers], storage)


def layers_flash(shapes: ModelShapes, parts: Sequence[StoredBytes], storage: str) -> int:
    """Bytes of the stored file whose every layer adds `parts` (stored_bytes of its tensors)."""
    if (storage in DECODED or storage == MIXED) and not any(p.decoded for p in parts):
        # nothing to compress: the storage hands back the widened model, the int8 storage's file
        storage = "int8"
    return family_base(shapes, storage) + bytes_total(parts)


def _greedy(buffers: list[tuple[int, int, int]]) -> int:
    """TFLM's GreedyMemoryPlanner: (size, first op, last op), largest first, at the lowest free offset."""
    n = len(buffers)
    off_at, end_at = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    first_at, last_at = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    top = 0
    # numpy finds the placed buffers whose lifetimes overlap (VGG-16's sliced graph holds thousands)
    for k, (size, first, last) in enumerate(sorted(buffers, key=lambda b: -b[0])):
        live = (last_at[:k] >= first) & (first_at[:k] <= last)
        o, z = off_at[:k][live], end_at[:k][live]
        order = np.lexsort((z, o))
        off = 0
        for a, e in zip(o[order].tolist(), z[order].tolist(), strict=True):
            if off + size <= a:
                break
            off = max(off, e)
        off_at[k], end_at[k], first_at[k], last_at[k] = off, off + size, first, last
        top = max(top, off + size)
    return top


def arena_of(shapes: ModelShapes, stores: Mapping[str, Sequence[SliceStore]]) -> int:
    """TFLM arena bytes: the greedy plan of activations, INT4 scratch and DECODE outputs, plus the tail."""
    extra: dict[int, list[SliceStore]] = {}
    for layer in shapes.layers:
        for s, st in zip(layer.slices, stores[layer.name], strict=True):
            extra.setdefault(s.op, []).append(st)
    # The graph as it will run: one DECODE right before each operator that reads a compressed tensor.
    timeline: list[tuple[GraphOp, list[SliceStore]]] = []
    for k, op in enumerate(shapes.ops):
        luts = [st for st in extra.get(k, []) if st.decoded]
        if luts:
            timeline.append((GraphOp("TFLM_DECODE", (), ()), luts))
        timeline.append((op, [st for st in extra.get(k, []) if st.kind == "int4"]))
    first: dict[int, int] = {i: 0 for i in shapes.inputs}
    last: dict[int, int] = {i: 0 for i in shapes.inputs}
    buffers: list[tuple[int, int, int]] = []
    decodes = added = int4_ops = 0
    for t, (op, sts) in enumerate(timeline):
        if op.kind == "TFLM_DECODE":
            decodes += 1
            added += len(sts)
            buffers += [(_align(st.elements), t, t + 1) for st in sts]  # read by the next operator
            continue
        for i in op.inputs:
            first.setdefault(i, t)
            last[i] = t
        for i in op.outputs:
            first.setdefault(i, t)
            last.setdefault(i, t)
        if sts and shapes.int4_scratch:
            int4_ops += 1
            buffers += [(_align(st.elements), t, t) for st in sts]
    for i in shapes.outputs:
        last[i] = len(timeline) - 1
    buffers += [(_align(shapes.activation_bytes[i]), first[i], last[i]) for i in first]
    every = [st for layer in shapes.layers for st in stores[layer.name]]
    distinct_anc = {st.share_key for st in every if st.kind == "lut" and st.share_key is not None}
    added += sum(1 for st in every if st.decoded and st.share_key is None) + len(distinct_anc)
    tail = shapes.tail + TAIL_DECODE * decodes + TAIL_TENSOR * added + TAIL_INT4_OP * int4_ops
    return _greedy(buffers) + tail


def predict_storage(
    shapes: ModelShapes,
    plan: Mapping[str, int] | object,
    storage: str = "auto",
    distinct: Distinct | None = None,
    decode_code: int = 0,
    lut_layers: Collection[str] = (),
) -> Prediction:
    """The stored file of a plan (layer -> bits, or a BitPlan) under a storage; auto: the smallest of
    int4, lut and (when lut_layers names the plan's LUT layers) MIXED.

    distinct: per layer and slice (stride, tables key), e.g. from slice_distinct; default: full grids.
    decode_code: the DECODE kernel's code, which auto adds to a file with LUT tensors when it weighs them
    (as deploy.export does with the measured code); the predicted flash is the file's alone.
    """
    bits = dict(getattr(plan, "bits", plan))
    if storage not in EXPORT_STORAGES:
        raise ValueError(f"storage {storage!r}: use one of {', '.join(EXPORT_STORAGES)}")
    if storage == MIXED and not lut_layers:
        raise ValueError(f"storage {MIXED!r} needs lut_layers: the layers it stores as LUT")
    kinds = ("int4", "lut", *((MIXED,) if lut_layers else ())) if storage == "auto" else (storage,)
    preds = []
    for kind in kinds:
        stores = resolve(shapes, bits, kind, distinct, lut_layers)
        preds.append(stored_prediction(shapes, stores, {n: stored_bytes(s) for n, s in stores.items()}, kind))
    # ties: int4, as deploy.storage.choose (first of the smallest)
    return min(preds, key=lambda p: p.flash + (decode_code if p.decoded else 0))


def stored_prediction(
    shapes: ModelShapes,
    stores: Mapping[str, tuple[SliceStore, ...]],
    parts: Mapping[str, StoredBytes],
    kind: str,
) -> Prediction:
    """The Prediction of the file whose layers are stored as `stores` (their `parts`) under storage kind;
    a lut file with no LUT tensor is the int8 storage's (the storage hands back the widened model)."""
    flash = layers_flash(shapes, [parts[layer.name] for layer in shapes.layers], kind)
    lut_any = any(p.lut for p in parts.values())
    return Prediction("int8" if kind == "lut" and not lut_any else kind, flash, stores, shapes)


def predict(
    shapes: ModelShapes,
    plan: Mapping[str, int] | object,
    storage: str = "auto",
    distinct: Distinct | None = None,
) -> tuple[int, int]:
    """(flash bytes of the stored .tflite, TFLM arena bytes) of a plan under a storage (predict_storage)."""
    p = predict_storage(shapes, plan, storage, distinct)
    return p.flash, p.arena


# ---------------------------------------------------------------- per option, for edgeq.planner


def layer_ram(shapes: ModelShapes, layer: LayerShape, stores: Sequence[SliceStore]) -> int:
    """The arena a layer's own operators need: the live activations there plus its largest unpack/decode
    buffer, plus its persistent DECODE structs (a max-type figure for edgeq.planner's RAM, see its doc)."""
    live_at = shapes.live_bytes
    peak, tail = 0, 0
    for s, st in zip(layer.slices, stores, strict=True):
        int4 = st.kind == "int4" and shapes.int4_scratch
        scratch = _align(st.elements) if st.decoded or int4 else 0
        peak = max(peak, live_at[s.op] + scratch)
        tail += (TAIL_DECODE + 2 * TAIL_TENSOR) if st.decoded else TAIL_INT4_OP if int4 else 0
    return peak + tail


def ram_floor(shapes: ModelShapes) -> int:
    """The activation peak of the graph with no unpack or decode buffer (edgeq.planner's ram_floor)."""
    return max(shapes.live_bytes, default=0)


def byte_cost(
    shapes: ModelShapes,
    distinct: Mapping[tuple[str, int], Sequence[tuple[int, Hashable | None]]] | None = None,
) -> Callable[[str, tuple[int, ...], int, str, object], tuple[int, int]]:
    """edgeq.planner.ByteCost over this model: (layer, kernel shape, bits, storage, grid) -> (flash, ram).

    storage is how the layer's tensors are stored (int8, int4, lut); flash is what they add to their
    whole-model storage's family_base (lut: ancillary tables shared within the layer counted once),
    ram is layer_ram. distinct: (layer, bits) -> per slice (stride, tables key); default full grids.
    """

    def cost(name: str, shape: tuple[int, ...], bits: int, storage: str, grid: object) -> tuple[int, int]:
        layer = shapes.layer(name)
        if storage not in STORAGE_KINDS:
            raise ValueError(f"storage {storage!r}: use one of {', '.join(STORAGE_KINDS)}")
        if int(np.prod(shape)) != layer.elements:
            raise ValueError(
                f"layer {name!r}: kernel shape {tuple(shape)} has not its {layer.elements} weights"
            )
        if storage == "int4" and bits > 4:
            raise ValueError(f"layer {name!r}: INT4 holds at most 4 bits, not {bits}")
        stores = slice_stores(layer, bits, storage, (distinct or {}).get((name, bits)))
        if storage == "lut" and any(st.kind != "lut" for st in stores):
            raise ValueError(
                f"layer {name!r}: {bits}-bit tables exceed {MAX_LUT_STRIDE} values; not LUT-storable"
            )
        return store_flash(stores), layer_ram(shapes, layer, stores)

    return cost
