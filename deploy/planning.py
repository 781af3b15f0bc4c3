"""The planner as an allocation method ("planner"): the twin's uncertainty against the exporter's bytes (#19).

For every planned layer and bit width the options carry the grid QAT will really use (edgeq.optimize.
interval_ranges: the symmetric range fitted to the float kernel, BatchNorm folded, weighted by the twin's
1/sigma^2, as prepare_qat fixes it), its uncertainty cost sum (Q(w) - w)^2 / sigma^2 on the weights QAT
starts from, and the bytes deploy.storage.cost predicts for it under each storage family: int4 (INT4
at <= 4 bits, INT8 above), lut (TFLM LUT tables for every tensor with <= 128 values per unit) and int4+lut
(each layer LUT or INT4/INT8, the layer's own choice: LUT's bytes where its decode buffer fits the arena).
Each family is planned on its own with edgeq.planner.plan_for_target and the least-uncertainty plan kept.
Without a flash budget the target bits mean "no more flash than the uniform plan at that many bits", that
plan stored as --storage auto would store it.

A plan is accepted only if the storage it assumes is the one --storage auto will pick, by a margin, and
(for lut plans, whose tables depend on the trained weights) if it fits the budget by that margin; the
storage and the bytes assumed per layer are in plan.meta. The reference the byte model needs is one
conversion of the model at 8 bits (a few seconds).

The allocator assumes what `edgeq run` does by default: --storage auto, the 16 KiB decode budget,
QAT from the float weights, Dense as FULLY_CONNECTED; planner_allocator(...) makes one for other settings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deploy.export.slicing import DEFAULT_DECODE_BUDGET
from deploy.storage.cost import (
    MIXED,
    LayerShape,
    ModelShapes,
    Prediction,
    SliceStore,
    StoredBytes,
    check_layers,
    family_base,
    layer_ram,
    layer_storage,
    predict_storage,
    ram_floor,
    shapes_from_tflite,
    slice_distinct,
    slice_stores,
    store_flash,
    stored_bytes,
    stored_prediction,
)
from edgeq.allocators import ALLOCATORS, Allocator
from edgeq.errors import PlanError
from edgeq.pipeline import PipelineSpec
from edgeq.plan import BitPlan
from edgeq.planner import Grid, Option, Plan, plan_for_target, uncertainty_costs
from edgeq.posterior import LayerPosterior
from edgeq.threads import per_core
from edgeq.training import Trained

FAMILIES = ("int4", "lut")  # the whole-model storages --storage auto chooses between
QAT_BITS = range(2, 9)
# Safety margin for bytes that depend on the trained weights (LUT tables and index widths move a little in
# QAT): the larger of these, against the budget and between the two storages' files.
MARGIN_BYTES = 64
MARGIN_FRACTION = 0.005
REFERENCE_SAMPLES = 8  # calibration rows for the reference conversion: its ranges don't change its bytes


@dataclass(frozen=True)
class LayerGrid:
    """One layer at one bit width: the grid QAT will use, its uncertainty cost, the tables it will store."""

    grid: Grid
    cost: float
    distinct: tuple[tuple[int, Hashable], ...]  # per slice: (LUT stride, tables key), deploy.storage.cost


def reference_shapes(
    trained: Trained, decode_budget: int | None = DEFAULT_DECODE_BUDGET, keep_dense: bool = True
) -> ModelShapes:
    """The byte model's reference: the float model as QAT builds it (every layer 8 bits), converted once.

    keep_dense: Dense as FULLY_CONNECTED (the run's default) or as 1x1 CONV_2D (--dense-as-conv).
    Kept per (trained, settings) in this process: a search plans many targets of one twin.
    """
    return _per_twin(_SHAPES, trained, (decode_budget, keep_dense), _reference_shapes)


_SHAPES: dict[tuple, tuple[Trained, ModelShapes]] = {}


def _per_twin(store: dict, trained: Trained, args: tuple, make):
    """make(trained, *args), kept in store per (trained, args): the last 4 of them in this process."""
    key = (id(trained), *args)
    hit = store.get(key)
    if hit is not None and hit[0] is trained:
        return hit[1]
    value = make(trained, *args)
    if len(store) >= 4:
        store.pop(next(iter(store)))
    store[key] = (trained, value)  # the Trained is kept too, so its id is not reused while cached
    return value


def int8_arena(trained: Trained, keep_dense: bool = True) -> int:
    """The predicted TFLM arena of the trained model with every layer stored int8, unsliced (reference
    kernels): what the model needs before any decoding or unpacking."""
    shapes = reference_shapes(trained, None, keep_dense)
    return predict_storage(shapes, {name: 8 for name in trained.sizes}, "int4").arena


def _reference_shapes(trained: Trained, decode_budget: int | None, keep_dense: bool) -> ModelShapes:
    # one conversion per twin: the decode budget only changes how its tensors are sliced
    converted = _per_twin(_CONVERTED, trained, (keep_dense,), _reference_model)
    return shapes_from_tflite(converted, decode_budget)


_CONVERTED: dict[tuple, tuple[Trained, bytes]] = {}


def _reference_model(trained: Trained, keep_dense: bool) -> bytes:
    """The float model as QAT builds it at 8 bits, converted (kept per twin in _CONVERTED)."""
    from deploy.export.convert import convert
    from edgeq.optimize import quantize_model

    plan = BitPlan.from_bits({name: 8 for name in trained.sizes})
    qat = quantize_model(trained.float_model, plan, keep_dense=keep_dense)
    return convert(qat, trained.splits.x_train, samples=REFERENCE_SAMPLES, via_saved_model=False)


def start_kernels(
    model, posteriors: Sequence[LayerPosterior] = ()
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Per quantizable layer: the kernel QAT starts from (BatchNorm folded as quantize_model folds it) and
    the twin's sigma scaled alike (None without a posterior)."""
    from edgeq.layers import QUANTIZABLE
    from edgeq.optimize import _bn_pairs  # the rule quantize_model folds by: the grids must see the same

    folded_by = {conv: bn for bn, conv in _bn_pairs(model).items()}
    sigmas = {p.name: p.sigma for p in posteriors}
    out = {}
    for layer in model.layers:
        if type(layer) not in QUANTIZABLE:
            continue
        kernel = np.asarray(layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel)
        kernel = kernel.astype(np.float64)
        sigma = sigmas.get(layer.name)
        sigma = None if sigma is None else np.asarray(sigma, dtype=np.float64).reshape(kernel.shape)
        if layer.name in folded_by:
            bn = model.get_layer(folded_by[layer.name])
            gamma, _, _, var = bn.get_weights()
            scale = gamma / np.sqrt(var + bn.epsilon)
            kernel = kernel * scale
            sigma = None if sigma is None else sigma * np.abs(scale)
        out[layer.name] = (kernel, sigma)
    return out


def integers(kernel: np.ndarray, scale: np.ndarray | float, bits: int) -> np.ndarray:
    """The integers (int8) the converter stores for kernel on a symmetric grid (TF's fake quant rounds half
    up)."""
    lv = 2 ** (bits - 1) - 1
    t = kernel / scale  # then in place: VGG-16 prices 14.7M weights at 7 widths
    t += 0.5
    np.floor(t, out=t)
    np.clip(t, -lv, lv, out=t)
    return t.astype(np.int8)


def stored_layout(q: np.ndarray, op: str) -> np.ndarray:
    """Keras kernel integers in the layout deploy.storage.cost.slice_distinct reads (output channels first;
    depthwise: channels last)."""
    if op == "DEPTHWISE_CONV_2D":
        return q.reshape(1, *q.shape[:2], -1)
    return np.moveaxis(q, -1, 0)


def layer_ranges(trained: Trained, bits: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
    """interval_ranges of every planned layer at each bit width: the pricing's slowest step (the
    uncertainty-weighted search, edgeq.quantizers.RangeSearch), the same for every storage family.

    Kept per (trained, bits) in this process, as reference_shapes is: a search plans many targets of one twin.
    """
    from edgeq.optimize import interval_ranges_at

    def search(t: Trained, widths: tuple[int, ...]) -> dict[int, dict[str, np.ndarray]]:
        return interval_ranges_at(t.float_model, list(widths), t.posteriors)

    return _per_twin(_RANGES, trained, (tuple(bits),), search)


_RANGES: dict[tuple, tuple[Trained, dict[int, dict[str, np.ndarray]]]] = {}


def layer_grids(
    trained: Trained,
    shapes: ModelShapes,
    bits: Sequence[int],
    ranges: Mapping[int, Mapping[str, np.ndarray]] | None = None,
) -> dict[str, dict[int, LayerGrid]]:
    """Every planned layer's grid, cost and LUT tables at each bit width (interval_ranges' grids; pass
    layer_ranges' result as ranges to price several storage families from one search)."""
    from edgeq.layers import QUANTIZABLE

    kernels = start_kernels(trained.float_model, trained.posteriors)
    names = [p.name for p in trained.posteriors]
    missing = sorted(set(names) - set(shapes.names))
    if missing:
        raise PlanError(
            f"the converted model has no weight tensor for layers {missing}; the planner needs every "
            "planned layer to be one conv/dense operator"
        )
    model = trained.float_model
    ranges = ranges if ranges is not None else layer_ranges(trained, bits)
    per_channel_of = {n: QUANTIZABLE[type(model.get_layer(n))] for n in names}

    def grids_of(name: str) -> dict[int, LayerGrid]:
        kernel, sigma = kernels[name]
        per_channel = per_channel_of[name]
        layer = shapes.layer(name)
        grids, tables = [], []
        for b in bits:
            lv = 2 ** (b - 1) - 1
            r = np.atleast_1d(np.asarray(ranges[b][name], dtype=np.float64))
            r = np.where(r > 0, r, 1.0)  # FixedRangeQuantizer's rule for an all-zero channel
            scale = r / lv
            axis = kernel.ndim - 1 if per_channel else None
            grids.append(Grid("symmetric", b, scale=tuple(scale), axis=axis, fit="interval"))
            q = stored_layout(integers(kernel, scale if per_channel else scale[0], b), layer.op)
            tables.append(slice_distinct(layer, q))
        costs = uncertainty_costs(LayerPosterior(name, kernel, sigma), grids)  # 1/sigma^2 once for all bits
        return {b: LayerGrid(g, float(c), t) for b, g, c, t in zip(bits, grids, costs, tables, strict=True)}

    return dict(zip(names, per_core(grids_of, names), strict=True))  # layers are independent: see per_core


def _fixed_distinct(trained: Trained, shapes: ModelShapes, names: Sequence[str]) -> dict:
    """LUT tables of the layers QAT keeps at TF-MOT's 8 bits (LastValueQuantizer: max|w| per channel)."""
    kernels = start_kernels(trained.float_model, trained.posteriors)
    out = {}
    for name in names:
        layer = shapes.layer(name)
        if name not in kernels:  # a layer edgeq does not quantize: the converter keeps it int8, as stored
            out[name] = _dense_distinct(layer)
            continue
        kernel, _ = kernels[name]
        axes = tuple(range(kernel.ndim - 1)) if layer.per_channel else None
        m = np.max(np.abs(kernel), axis=axes)
        scale = np.where(m > 0, m, 1.0) / 127
        out[name] = slice_distinct(layer, stored_layout(integers(kernel, scale, 8), layer.op))
    return out


def _dense_distinct(layer: LayerShape) -> tuple[tuple[int, None], ...]:
    """Per slice, as many distinct values per unit as an 8-bit grid allows (tables unique): how a layer the
    converter quantizes itself (Conv1D, SeparableConv2D, a custom layer) is priced; LUT keeps it INT8."""
    out = []
    for sl in layer.slices:
        out.append((min(255, max(1, sl.per_unit)), None))
    return tuple(out)


@dataclass(frozen=True)
class Planned:
    """What plan_layers found: the plan, its storage and bytes, and the uniform plan it had to beat."""

    plan: BitPlan
    prediction: Prediction
    budget: int
    uniform: Prediction | None


def _margin(budget: int) -> int:
    return max(MARGIN_BYTES, math.ceil(MARGIN_FRACTION * budget))


def family_shapes(
    trained: Trained,
    decode_budget: int | None = DEFAULT_DECODE_BUDGET,
    keep_dense: bool = True,
    kernels: str = "reference",
    shapes: ModelShapes | None = None,
) -> dict[str, ModelShapes]:
    """The byte model's reference per storage family, as the export stores it for the kernel set: LUT is
    sliced under the decode budget for both; INT4 only where the kernels unpack it (reference), so under
    CMSIS-NN the INT4 family is priced unsliced and with no unpack scratch in the arena."""
    sliced = shapes or reference_shapes(trained, decode_budget, keep_dense)
    if kernels != "cmsis-nn":
        return {"int4": sliced, "lut": sliced, MIXED: sliced}
    packed = _per_twin(_PACKED, trained, (keep_dense,), _packed_shapes)
    # int4+lut: sliced as LUT needs, its INT4 tensors read packed (CMSIS-NN)
    mixed = _per_twin(_UNPACKED, trained, (id(sliced),), lambda t, _: _no_scratch(sliced))
    return {"int4": packed, "lut": sliced, MIXED: mixed}


def _no_scratch(shapes: ModelShapes) -> ModelShapes:
    return dataclasses.replace(shapes, int4_scratch=False)


def _packed_shapes(trained: Trained, keep_dense: bool) -> ModelShapes:
    """CMSIS-NN's INT4 reference: unsliced, no unpack scratch (kept per twin: _pricing is cached by it)."""
    return dataclasses.replace(reference_shapes(trained, None, keep_dense), int4_scratch=False)


_PACKED: dict[tuple, tuple[Trained, ModelShapes]] = {}
_UNPACKED: dict[tuple, tuple[Trained, ModelShapes]] = {}


_KNOWN_PLANS = 4096  # priced plans a _Pricing keeps


@dataclass(frozen=True)
class _Pricing:
    """A plan's exact file and arena per storage family, the way auto would store it (decoder code counted
    when it weighs LUT against INT4)."""

    shapes: Mapping[str, ModelShapes]
    grids: Mapping[str, Mapping[str, Mapping[int, LayerGrid]]]
    fixed: Mapping[str, Mapping[str, Sequence]]
    decode_code: int
    # (family, bits) -> Prediction: the planner asks again for the plans it already priced (each family's
    # pass, the other family's bytes, every target of a search); a VGG-16 arena takes a good part of a second
    _known: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    _layers: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # see _layer
    # see option: (layer, bits, kind) per shapes -> (its Option, its shareable table bytes)
    _options: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def exact(
        self, bits: Mapping[str, int], storage: str = "auto", lut_layers: frozenset[str] = frozenset()
    ) -> Prediction:
        """The file of a plan under a storage; auto: the variant the export's auto keeps by flash (the
        int4+lut one only for a plan naming its LUT layers)."""
        kinds = (*FAMILIES, *((MIXED,) if lut_layers else ())) if storage == "auto" else (storage,)
        preds = [self._stored(k, bits, lut_layers) for k in kinds]
        return min(preds, key=lambda p: p.flash + self.code(p))  # ties: int4, as the export

    def _stored(self, family: str, bits: Mapping[str, int], lut_layers: frozenset[str]) -> Prediction:
        lut_layers = lut_layers if family == MIXED else frozenset()
        key = (family, tuple(sorted(bits.items())), lut_layers)
        pred = self._known.get(key)
        if pred is None:
            if len(self._known) >= _KNOWN_PLANS:
                self._known.clear()
            shapes = self.shapes[family]
            check_layers(shapes, bits)
            layers = {
                n: self._layer(family, n, bits.get(n), layer_storage(family, n, lut_layers))
                for n in shapes.names
            }
            stores = {n: st for n, (st, _) in layers.items()}
            parts = {n: b for n, (_, b) in layers.items()}
            pred = self._known[key] = stored_prediction(shapes, stores, parts, family)
        return pred

    def _layer(
        self, family: str, name: str, bits: int | None, storage: str
    ) -> tuple[tuple[SliceStore, ...], StoredBytes]:
        """One layer's tensors at bits (None: not planned, 8 bits) stored as `storage`, and what they add to
        the file; a plan differs from the last one priced in a layer or two, so each layer's stores are
        kept, not the plan's (VGG-16's sliced layers hold thousands of tensors)."""
        key = (family, name, bits, storage)
        found = self._layers.get(key)
        if found is None:
            if bits is None:
                distinct, b = self.fixed[family].get(name), 8
            else:
                distinct, b = self.grids[family][name][bits].distinct, int(bits)
            stores = slice_stores(self.shapes[family].layer(name), b, storage, distinct)
            found = self._layers[key] = (stores, stored_bytes(stores))
        return found

    def code(self, p: Prediction) -> int:
        return self.decode_code if p.storage in ("lut", MIXED) else 0

    def option(self, family: str, name: str, bits: int, kind: str, size: int) -> Option:
        """The planner's Option for one layer at bits, its tensors stored as kind (int4 or lut) in a file of
        the family; kept per shapes, since the int4+lut pass offers the int4 and lut passes' options."""
        shapes = self.shapes[family]
        key = (id(shapes), name, bits, kind)
        found = self._options.get(key)
        if found is not None:
            return found[0]
        g = self.grids[family][name][bits]
        layer = shapes.layer(name)
        stores = slice_stores(layer, bits, kind, g.distinct)
        kinds = sorted({st.kind for st in stores})
        label = "lut" if "lut" in kinds else kinds[0]  # int4, or int8 (above 4 bits, or too many values)
        flash, ram = store_flash(stores), layer_ram(shapes, layer, stores)
        option = Option(name, bits, label, g.grid, flash, ram, g.cost, size)
        self._options[key] = (option, sum(stored_bytes(stores).shared.values()))
        return option

    def shared_bytes(self, family: str, name: str, bits: int, kind: str) -> int:
        """The bytes of the LUT tables option(family, name, bits, kind) counts that other layers may share:
        the most a plan's sum of option flashes overcounts the file by, per layer (the planner's slack)."""
        return self._options[(id(self.shapes[family]), name, bits, kind)][1]


def _pricing(trained: Trained, shapes: Mapping[str, ModelShapes], bits: Sequence[int], code: int) -> _Pricing:
    """Every family's grids and tables at these bits. Kept per (trained, shapes objects, bits, code) in this
    process: a search or a bisection plans many targets of one twin, and pricing LeNet-5 takes seconds.
    (The cached _Pricing holds its shapes, so their ids are not reused while the key lives.)"""
    key = (tuple((k, id(s)) for k, s in shapes.items()), tuple(bits), code)
    return _per_twin(_PRICES, trained, (key,), lambda t, _key: _price(t, shapes, bits, code))


_PRICES: dict[tuple, tuple[Trained, _Pricing]] = {}


def _price(trained: Trained, shapes: Mapping[str, ModelShapes], bits: Sequence[int], code: int) -> _Pricing:
    grids, fixed = {}, {}
    ranges = layer_ranges(trained, bits)  # once: the grids do not depend on how the bytes are stored
    for k, sh in shapes.items():
        # reference kernels: one sliced model; int4+lut is sliced as lut is (its tables are the same)
        same = "lut" if k == MIXED else next((j for j in grids if shapes[j] is sh), None)
        grids[k] = grids[same] if same else layer_grids(trained, sh, bits, ranges)
        fixed[k] = (
            fixed[same] if same else _fixed_distinct(trained, sh, [n for n in sh.names if n not in grids[k]])
        )
    return _Pricing(shapes, grids, fixed, code)


def plan_layers(
    trained: Trained,
    target_bits: float,
    spec: PipelineSpec,
    *,
    shapes: ModelShapes | None = None,
    flash_budget: int | None = None,
    ram_budget: int | None = None,
    decode_budget: int | None = DEFAULT_DECODE_BUDGET,
    keep_dense: bool = True,
    decode_code: int = 0,
    kernels: str = "reference",
    zeros: bool = False,
) -> Planned:
    """The least-uncertainty plan within the flash budget (default: the uniform plan's at target_bits)
    and, if given, TFLM's arena within ram_budget.

    zeros (`--prune auto`): each layer may also set ZERO_FRACTIONS of its least informative weights to 0
    and be stored HUFFMAN-coded (the huffman family; the zeros cost their (mu/sigma)^2 in uncertainty).

    shapes: the byte model's reference (reference_shapes; built here when None, from decode_budget and
    keep_dense, which must be the export's). decode_code: the DECODE kernel's flash on the target
    (deploy.firmware.code_size), charged to a plan that stores any layer as LUT, as the export does.
    kernels: the target's kernel set (family_shapes: what is sliced, whether INT4 needs arena scratch).
    """
    by_family = family_shapes(trained, decode_budget, keep_dense, kernels, shapes)
    shapes = by_family["lut"]
    lo, hi, allowed, uniform_bits = _bit_choices(trained, spec)
    planned = list(allowed)
    pricing = _pricing(trained, by_family, sorted({b for bs in allowed.values() for b in bs}), decode_code)
    exact, code = pricing.exact, pricing.code
    fixed = list(pricing.fixed["lut"])  # no posterior (depthwise): QAT keeps 8 bits
    sizes = {p.name: p.size for p in trained.posteriors}

    if flash_budget is None:
        budget, uniform = _target_budget(pricing, uniform_bits, target_bits, lo)
    else:
        budget, uniform = int(flash_budget), None
    margin = _margin(budget)
    target_uniform = uniform_bits(int(target_bits)) if float(target_bits).is_integer() else None

    best: tuple[Plan, Prediction, str] | None = None
    for family in FAMILIES:
        fshapes, distinct = by_family[family], pricing.fixed[family]
        options, slack = {}, 0
        for name in planned:
            options[name] = [pricing.option(family, name, b, family, sizes[name]) for b in allowed[name]]
            slack += max(pricing.shared_bytes(family, name, b, family) for b in allowed[name])
        base = (
            family_base(fshapes, family)
            + (decode_code if family == "lut" else 0)
            + sum(store_flash(slice_stores(fshapes.layer(n), 8, family, distinct[n])) for n in fixed)
        )

        def accept(plan: Plan, family: str = family) -> bool:
            bits = plan.bits
            ex = exact(bits)
            if ex.storage != family:  # auto would store it the other way: that family's plan
                return False
            other = exact(bits, "lut" if family == "int4" else "int4")
            flash = ex.flash + code(ex)  # the budget is the firmware's: the decoder's code counts
            if bits == target_uniform:
                return flash <= budget and (ram_budget is None or ex.arena <= ram_budget)
            if ram_budget is not None and ex.arena > ram_budget:  # the options' RAM is only an estimate
                return False
            # lut bytes depend on the trained tables: keep a margin to the budget; the int4 ones are exact
            room = margin if family == "lut" else 0
            return flash <= budget - room and other.flash + code(other) - flash > margin

        # the options' sums overcount LUT tables shared across layers; accept() checks the exact file
        plan = _front_plan(
            options,
            target_bits,
            base,
            fshapes,
            budget + (slack if family == "lut" else 0),
            accept,
            math.inf if best is None else best[0].cost,
        )
        if plan is None:
            continue
        pred = exact(plan.bits)
        total = pred.flash + code(pred)
        if best is None or (plan.cost, total) < (best[0].cost, best[1].flash + code(best[1])):
            best = (plan, pred, family)
    found = _mixed_plan(
        pricing,
        by_family[MIXED],
        planned,
        allowed,
        sizes,
        fixed,
        budget,
        ram_budget,
        target_bits,
        margin,
        math.inf if best is None else best[0].cost,
    )
    if found is not None and (best is None or found[0].cost < best[0].cost):
        best = (*found, MIXED)
    if zeros:
        found = _zeros_plan(
            trained,
            shapes,
            pricing,
            allowed,
            fixed,
            budget - margin,
            ram_budget,
            target_bits,
            margin,
            math.inf if best is None else best[0].cost,
        )
        if found is not None and (best is None or found[0].cost < best[0].cost):
            best = (*found, "huffman")
    if best is None:
        ram = "" if ram_budget is None else f" and {ram_budget:,} B of arena"
        kinds = "int4, lut, int4+lut or huffman" if zeros else "int4, lut or int4+lut"
        raise PlanError(
            f"no plan of {lo}..{hi} bits fits {budget:,} B of flash{ram} under {kinds} storage; "
            f"raise the target bits or the {'flash' if ram_budget is None else 'flash or RAM'} budget"
        )
    plan, pred, family = best
    layers_storage = {
        name: [st.kind if st.kind != "lut" else f"lut{st.index_bits}" for st in stores]
        for name, stores in pred.layers.items()
    }
    lut_layers = {n for n, kinds in layers_storage.items() if any(k.startswith("lut") for k in kinds)}
    meta = {
        "target_bits": target_bits,
        "storage": pred.storage,
        # int4+lut: the operators (of the sliced model) whose weights the export stores as LUT
        "lut_ops": lut_ops(by_family[MIXED], lut_layers) if family == MIXED else [],
        "zeros": {o.layer: o.zeros for o in plan.options if o.zeros},
        "storage_per_layer": layers_storage,
        "predicted": {"flash_bytes": pred.flash, "arena_bytes": pred.arena, "storage": pred.storage},
        "flash_budget": budget,
        "uniform_flash": uniform.flash if uniform else None,
        "margin_bytes": margin,
        "decode_code_bytes": code(pred),
        "assumes": {
            "storage": "auto",
            "kernels": kernels,
            "decode_budget": shapes.decode_budget,
            "qat_start": "float",
            "weight_ops": sorted({layer.op for layer in shapes.layers}),
        },
        "fixed_8_bit_layers": fixed,
    }
    return Planned(plan.to_bitplan("planner", meta=meta), pred, budget, uniform)


def _target_budget(
    pricing: _Pricing, uniform_bits: Callable[[int], dict[str, int]], target_bits: float, lo: int
) -> tuple[int, Prediction | None]:
    """The flash a target buys: the uniform plans' flash (decoder code counted) interpolated between the
    bits around it, or below the smallest uniform plan its flash scaled; and the uniform plan at an
    integer target."""
    exact, code = pricing.exact, pricing.code
    if target_bits < lo:
        f_lo = exact(uniform_bits(lo))
        return int(math.floor((f_lo.flash + code(f_lo)) * target_bits / lo)), None
    fl, ce = math.floor(target_bits), math.ceil(target_bits)
    f_lo = exact(uniform_bits(fl))
    f_hi = f_lo if ce == fl else exact(uniform_bits(ce))
    lo_b, hi_b = f_lo.flash + code(f_lo), f_hi.flash + code(f_hi)
    return int(math.floor(lo_b + (target_bits - fl) * (hi_b - lo_b))), f_lo if ce == fl else None


def target_budget(
    trained: Trained,
    target_bits: float,
    spec: PipelineSpec,
    *,
    decode_budget: int | None = DEFAULT_DECODE_BUDGET,
    keep_dense: bool = True,
    decode_code: int = 0,
    kernels: str = "reference",
    **_: Any,
) -> int:
    """The flash budget plan_layers gives target_bits (planner_settings' keywords; the others ignored)."""
    by_family = family_shapes(trained, decode_budget, keep_dense, kernels)
    lo, _, allowed, uniform_bits = _bit_choices(trained, spec)
    pricing = _pricing(trained, by_family, sorted({b for bs in allowed.values() for b in bs}), decode_code)
    return _target_budget(pricing, uniform_bits, target_bits, lo)[0]


def _bit_choices(
    trained: Trained, spec: PipelineSpec
) -> tuple[int, int, dict[str, list[int]], Callable[[int], dict[str, int]]]:
    """(lowest bits, highest bits, each planned layer's bit widths (pinned: its one), the uniform plan)."""
    lo, hi = max(2, spec.min_bits), min(8, spec.max_bits)
    if lo > hi:
        raise PlanError(f"min_bits {spec.min_bits} > max_bits {spec.max_bits}: no bit width to plan")
    pins = {n: int(b) for n, b in (spec.pin or {}).items()}
    bad = {n: b for n, b in pins.items() if b not in QAT_BITS}
    if bad:
        raise PlanError(f"pinned bits {bad}: quantization-aware training takes 2..8 bits")
    planned = [p.name for p in trained.posteriors]
    allowed = {n: [pins[n]] if n in pins else list(range(lo, hi + 1)) for n in planned}

    def uniform_bits(b: int) -> dict[str, int]:
        return {n: pins.get(n, min(max(b, lo), hi)) for n in planned}

    return lo, hi, allowed, uniform_bits


def _mixed_plan(
    pricing: _Pricing,
    shapes: ModelShapes,
    planned: Sequence[str],
    allowed: Mapping[str, Sequence[int]],
    sizes: Mapping[str, int],
    fixed: Sequence[str],
    budget: int,
    ram_budget: int | None,
    target_bits: float,
    margin: int,
    bound: float = math.inf,
) -> tuple[Plan, Prediction] | None:
    """The least-uncertainty int4+lut plan (of cost at most bound): each layer LUT or INT4/INT8 at each
    bit width, so LUT's bytes go where its decode buffer fits the arena (on ResNet-8 the early layers'
    activations leave no room for one, the last stack's do). Kept only where --storage auto, given its LUT
    layers, would store it so: smaller by the margin than the int4 and lut files of the same bits that fit
    the arena."""
    distinct = pricing.fixed[MIXED]
    options, slack = {}, 0
    for name in planned:
        opts = [pricing.option(MIXED, name, b, "int4", sizes[name]) for b in allowed[name]]
        luts = [pricing.option(MIXED, name, b, "lut", sizes[name]) for b in allowed[name]]
        # a lut option none of whose tensors a table can hold is stored int8: the int4 option covers it
        options[name] = opts + [o for o in luts if o.storage == "lut"]
        # (a lut option left out stores no table: its shared bytes are 0)
        slack += max(pricing.shared_bytes(MIXED, name, b, k) for b in allowed[name] for k in ("int4", "lut"))
    code = pricing.decode_code
    base = (
        family_base(shapes, MIXED)
        + code
        + sum(store_flash(slice_stores(shapes.layer(n), 8, "int4", distinct[n])) for n in fixed)
    )

    def accept(plan: Plan) -> bool:
        lut_layers = frozenset(o.layer for o in plan.options if o.storage == "lut")
        if not lut_layers or len(lut_layers) == len(plan.options):
            return False  # all INT4 or all LUT: the int4 and lut families' plans
        bits = plan.bits
        ex = pricing.exact(bits, MIXED, lut_layers)
        flash = ex.flash + code
        if flash > budget - margin or (ram_budget is not None and ex.arena > ram_budget):
            return False
        # auto keeps the least flash among the variants that fit the arena (deploy.storage.choose)
        others = [pricing.exact(bits, k) for k in FAMILIES]
        return all(
            o.flash + pricing.code(o) - flash > margin
            for o in others
            if ram_budget is None or o.arena <= ram_budget
        )

    # the options' sums overcount shared tables; accept() is exact
    plan = _front_plan(options, target_bits, base, shapes, budget + slack, accept, bound)
    if plan is None:
        return None
    lut_layers = frozenset(o.layer for o in plan.options if o.storage == "lut")
    return plan, pricing.exact(plan.bits, MIXED, lut_layers)


def lut_ops(shapes: ModelShapes, lut_layers: Collection[str]) -> list[int]:
    """The operators of the sliced model that read the weights of lut_layers (ExportOptions.lut_ops)."""
    return sorted(s.op for layer in shapes.layers if layer.name in lut_layers for s in layer.slices)


def lut_ops_for(plan: BitPlan, decode_budget: int | None) -> tuple[int, ...]:
    """ExportOptions.lut_ops for exporting a plan under a decode budget: the int4+lut plan's operators,
    which index the model sliced under the plan's own budget; () for another budget or another plan
    (--storage auto then weighs only the whole-model storages)."""
    assumed = plan.meta.get("assumes", {}).get("decode_budget")
    return tuple(plan.meta.get("lut_ops", ())) if decode_budget == assumed else ()


ZERO_FRACTIONS = (0.0, 0.5, 0.75, 0.9)  # --prune auto: the shares of a layer's weights the planner may zero


def zero_options(
    trained: Trained, shapes: ModelShapes, grids: Mapping[str, Mapping[int, LayerGrid]], allowed
) -> dict[str, list[tuple[Option, tuple]]]:
    """Per planned layer, (option, its slices' stores) at each bit width and ZERO_FRACTIONS share of zeros,
    HUFFMAN-coded where that pays (deploy.storage.cost.huffman_stores on the integers QAT starts from).

    A zeroed weight costs (w / sigma)^2 in place of its quantization error, the weights zeroed are the
    least informative ones (edgeq.prune.informativeness_masks, as the run's masks will be)."""
    from deploy.storage.cost import huffman_stores
    from edgeq.prune import informativeness_masks

    kernels = start_kernels(trained.float_model, trained.posteriors)
    posts = {p.name: p for p in trained.posteriors}
    out: dict[str, list[tuple[Option, tuple]]] = {}
    for name, widths in allowed.items():
        layer = shapes.layer(name)
        kernel, sigma = kernels[name]
        w2 = 1.0 if sigma is None else 1.0 / sigma**2
        masks = {
            z: informativeness_masks([posts[name]], z)[name].reshape(kernel.shape) > 0 for z in ZERO_FRACTIONS
        }
        opts = []
        for b in widths:
            g = grids[name][b]
            scale = np.asarray(g.grid.scale, dtype=np.float64)
            scale = scale if g.grid.axis is not None else scale[0]
            q = integers(kernel, scale, b)
            extra = (kernel**2 - (q * scale - kernel) ** 2) * w2  # zeroing a weight instead of rounding it
            for z, keep in masks.items():
                cost = g.cost + float(np.sum(np.where(keep, 0.0, extra)))
                stores = huffman_stores(layer, stored_layout(np.where(keep, q, 0), layer.op))
                flash, ram = store_flash(stores), layer_ram(shapes, layer, stores)
                size = posts[name].size
                opts.append(
                    (Option(name, b, "huffman", g.grid, flash, ram, max(cost, 0.0), size, zeros=z), stores)
                )
        out[name] = opts
    return out


def _zeros_plan(
    trained: Trained,
    shapes: ModelShapes,
    pricing: _Pricing,
    allowed,
    fixed: Sequence[str],
    budget: int,
    ram_budget: int | None,
    target_bits: float,
    margin: int,
    bound: float = math.inf,
) -> tuple[Plan, Prediction] | None:
    """The least-uncertainty plan (of cost at most bound) of the huffman family (zero_options) within
    budget, with some zeros and smaller, by the margin, than --storage auto's int4/lut file of the same
    bits (else auto stores that)."""
    from deploy.storage.cost import flash_of

    options = zero_options(trained, shapes, pricing.grids["lut"], allowed)
    stores_of = {(o.layer, o.bits, o.zeros): st for opts in options.values() for o, st in opts}
    plain = {n: slice_stores(shapes.layer(n), 8, "int8") for n in fixed}
    code = pricing.decode_code

    def stored(plan: Plan) -> Prediction:
        stores = {**plain, **{o.layer: stores_of[(o.layer, o.bits, o.zeros)] for o in plan.options}}
        return Prediction("huffman", flash_of(shapes, stores, "huffman"), stores, shapes)

    def accept(plan: Plan) -> bool:
        if not any(o.zeros for o in plan.options):
            return False  # a dense plan: the int4 and lut families' (auto tries HUFFMAN only on zeros)
        pred = stored(plan)
        if ram_budget is not None and pred.arena > ram_budget:
            return False
        other = pricing.exact(plan.bits)
        return pred.flash + code <= budget and other.flash + pricing.code(other) - pred.flash - code > margin

    base = family_base(shapes, "huffman") + code + sum(store_flash(st) for st in plain.values())
    plan = _front_plan(
        {n: [o for o, _ in opts] for n, opts in options.items()},
        target_bits,
        base,
        shapes,
        budget,
        accept,
        bound,
    )
    return None if plan is None else (plan, stored(plan))


class _Costlier(Exception):
    """A family's walk of its front reached plans costlier than another family's plan already found."""


def _front_plan(
    options, target_bits: float, base: int, shapes: ModelShapes, budget: int, accept, bound: float = math.inf
) -> Plan | None:
    """One family's least-uncertainty plan within budget that accept() takes, of cost at most bound (None:
    there is none). The front is walked cheapest first, so the walk ends at the first plan over the bound:
    the families' plans are compared by cost, and one over it could not be kept (at VGG-16 shapes the lut
    family's walk checked 3,201 exact files for nothing)."""

    def bounded(plan: Plan) -> bool:
        if plan.cost > bound:
            raise _Costlier
        return accept(plan)

    try:
        return plan_for_target(
            options,
            target_bits,
            flash_base=base,
            ram_base=shapes.tail,
            ram_floor=ram_floor(shapes),
            flash_budget=budget,
            accept=bounded,
        )
    except (PlanError, _Costlier):
        return None


NEAR_BUDGET = (1.0, 0.99, 0.98, 0.96)  # fractions of a search's flash budget the planner is screened at


def uniform_flash(
    trained: Trained,
    spec: PipelineSpec,
    shapes: Mapping[str, ModelShapes],
    bits: Sequence[int],
    decode_code: int = 0,
) -> dict[int, int]:
    """Bits -> the predicted flash of the uniform plan at those bits (auto storage, decoder code counted;
    shapes per family, see family_shapes): the figures plan_layers interpolates its budget between."""
    pins = {n: int(b) for n, b in (spec.pin or {}).items()}
    planned = [p.name for p in trained.posteriors]
    pricing = _pricing(trained, shapes, sorted(set(bits) | set(pins.values())), decode_code)
    out = {}
    for b in bits:
        pred = pricing.exact({n: pins.get(n, b) for n in planned})
        out[b] = pred.flash + pricing.code(pred)
    return out


def targets_for_budget(
    trained: Trained,
    spec: PipelineSpec,
    flash_budget: int,
    *,
    decode_budget: int | None = DEFAULT_DECODE_BUDGET,
    keep_dense: bool = True,
    decode_code: int = 0,
    fractions: Sequence[float] = NEAR_BUDGET,
    kernels: str = "reference",
    **_: Any,
) -> list[float]:
    """Planner targets whose flash budgets are these fractions of flash_budget (highest target that stays
    within each), so a search screens the planner's least-uncertainty plans just under its budget; takes
    planner_settings' keywords (the ones it has no use for are ignored, as target_budget does).

    A fraction below the smallest uniform plan's flash gives a target below min_bits: plan_layers then
    budgets that share of the uniform plan's flash (only a plan with zeros, --prune auto, can reach it).
    """
    shapes = family_shapes(trained, decode_budget, keep_dense, kernels)
    lo, hi = max(2, spec.min_bits), min(8, spec.max_bits)
    flash = uniform_flash(trained, spec, shapes, range(lo, hi + 1), decode_code)
    targets = []
    for f in fractions:
        budget = f * flash_budget
        best = None
        for b in range(lo, hi):
            u0, u1 = flash[b], flash[b + 1]
            if u0 <= budget:  # the budget reaches past b: as far along [b, b+1] as it reaches
                step = 1.0 if u1 <= budget or u1 <= u0 else (budget - u0) / (u1 - u0)
                best = b + step
        if best is None and lo == hi and flash[lo] <= budget:
            best = float(lo)
        if best is None and budget < flash[lo]:  # below every uniform plan: plan_layers scales lo's flash
            best = max(1.0, lo * budget / flash[lo])
        if best is not None:
            targets.append(round(best, 4))
    return sorted(set(targets))


ABOVE_RAM_FLOOR = (0.0, 0.25, 0.5, 1.0)  # bits above the smallest target within a RAM budget, screened


def targets_for_ram(
    trained: Trained,
    spec: PipelineSpec,
    ram_budget: int,
    *,
    decode_budget: int | None = DEFAULT_DECODE_BUDGET,
    keep_dense: bool = True,
    decode_code: int = 0,
    kernels: str = "reference",
    steps: Sequence[float] = ABOVE_RAM_FLOOR,
    precision: float = 1 / 16,
) -> list[float]:
    """Planner targets for a search with an arena budget and no flash budget: the smallest target whose
    plan fits the arena (bisection: a higher target only widens the flash the planner may use), and
    `steps` above it, so the plans screened are the least-uncertainty ones near the RAM-feasible edge
    (the paper methods' fixed targets can step straight over it: on digits, all-INT4 plans need an unpack
    buffer the budget lacks and the next uniform plan is all int8). None when no target fits."""
    lo, top = float(max(2, spec.min_bits)), float(min(8, spec.max_bits))
    hi = top
    kw = {"decode_budget": decode_budget, "keep_dense": keep_dense, "decode_code": decode_code}

    def fits(t: float) -> bool:
        try:
            plan_layers(trained, t, spec, ram_budget=ram_budget, kernels=kernels, **kw)
        except PlanError:
            return False
        return True

    if not fits(hi):
        return []
    if not fits(lo):
        while hi - lo > precision:  # invariant: lo does not fit, hi does
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return sorted({round(min(hi + s, top), 4) for s in steps})


def planner_settings(
    decode_budget: int | None = DEFAULT_DECODE_BUDGET,
    ram_budget: int | None = None,
    keep_dense: bool = True,
    kernels: str = "reference",
    count_code: bool = True,
    zeros: bool = False,
) -> dict:
    """plan_layers' keywords for the run's export settings: decode budget, Dense form, arena budget, the
    kernel set (what is sliced and buffered, whose DECODE code a LUT plan pays) and whether the budget
    counts that code (False: a model-file budget)."""
    from deploy.firmware.code_size import decode_code_bytes

    return {
        "ram_budget": ram_budget,
        "decode_budget": decode_budget,
        "keep_dense": keep_dense,
        "decode_code": decode_code_bytes(kernels) if count_code else 0,
        "kernels": kernels,
        "zeros": zeros,
    }


def planner_allocator(
    decode_budget: int | None = DEFAULT_DECODE_BUDGET,
    ram_budget: int | None = None,
    keep_dense: bool = True,
    kernels: str = "reference",
    count_code: bool = True,
    zeros: bool = False,
) -> Allocator:
    """The planner as an Allocator for the run's export settings (planner_settings)."""
    settings = planner_settings(decode_budget, ram_budget, keep_dense, kernels, count_code, zeros)

    def allocate(trained: Trained, target_bits: float, spec: PipelineSpec, seed: int) -> BitPlan:
        return plan_layers(trained, target_bits, spec, **settings).plan

    return Allocator("planner", allocate, "uncertainty x bytes planner (int4/LUT)", "*")


PLANNER = planner_allocator()
ALLOCATORS.setdefault("planner", PLANNER)


def stored_layers(model: bytes, shapes: ModelShapes) -> dict[str, list[str]]:
    """How a stored model keeps each layer's tensors: int8, int4 or lut<index bits>, per slice.

    Names are stripped from stored models, so weight operators are matched to the reference's slices in
    graph order (DECODE operators skipped).
    """
    from deploy.flatbuffer import INT4, describe, read

    info = describe(model)
    lut_bits = {t.index: t.lut.bits for t in info.tensors if t.role == "lut-indices"}
    editor = read(model)
    sg = editor.subgraphs[0]
    index = {id(t): i for i, t in enumerate(sg.tensors)}
    decoded = {}
    for op in sg.operators:
        if op.opcode_name == "TFLM_DECODE":
            for k, y in enumerate(op.outputs):
                decoded[id(y)] = lut_bits.get(index[id(op.inputs[2 * k])])
    kinds = []
    for op in sg.operators:
        if op.opcode_name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") or len(op.inputs) < 2:
            continue
        w = op.inputs[1]
        if id(w) in decoded:
            kinds.append(f"lut{decoded[id(w)]}")
        elif w.buffer is not None and len(w.buffer.data):
            kinds.append("int4" if w.dtype == INT4 else "int8")
    slices = sorted((s.op, layer.name) for layer in shapes.layers for s in layer.slices)
    if len(kinds) != len(slices):
        raise PlanError(f"the stored model has {len(kinds)} weight operators, the reference {len(slices)}")
    out: dict[str, list[str]] = {}
    for (_, name), kind in zip(slices, kinds, strict=True):
        out.setdefault(name, []).append(kind)
    return out


def check_exported(plan: BitPlan, model: bytes, shapes: ModelShapes) -> list[str]:
    """What differs between the storage a planner plan assumed and the stored model ([] when nothing).

    Each tensor must be stored the way the plan assumed (int8, int4 or lut); LUT indices may come out
    narrower than predicted (QAT can leave fewer distinct values) but never wider than the layer's bits.
    """
    want = plan.meta.get("storage_per_layer")
    if not want:
        return ["the plan has no meta['storage_per_layer']; only planner plans can be checked"]
    got = stored_layers(model, shapes)
    problems = []
    for name, kinds in want.items():
        have = got.get(name, [])
        bits = plan.bits.get(name, 8)
        same = len(have) == len(kinds) and all(
            a.rstrip("0123456789") == b.rstrip("0123456789") for a, b in zip(kinds, have, strict=True)
        )
        wide = [k for k in have if k.startswith("lut") and int(k[3:]) > bits]
        if not same or wide:
            problems.append(f"layer {name!r} ({bits} bits): planned {kinds}, stored {have}")
    return problems
