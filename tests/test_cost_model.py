"""deploy.storage.cost against the real exporter, and the planner as an allocation method, on digits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from deploy.app import RunOptions, make_candidate, shrink_auto, train_pipeline
from deploy.channels import information
from deploy.export import ExportOptions, export
from deploy.export.slicing import layer_name
from deploy.firmware.code_size import decode_code_bytes
from deploy.flatbuffer import (
    channel_axis,
    is_per_channel,
    max_distinct,
    read,
    tensor_values,
    weight_inputs,
)
from deploy.measure.tflm import arena_bytes
from deploy.planning import (
    PLANNER,
    check_exported,
    layer_grids,
    plan_layers,
    planner_settings,
    reference_shapes,
    stored_layers,
)
from deploy.storage.cost import (
    byte_cost,
    predict,
    predict_storage,
    slice_distinct,
)
from edgeq.allocators import ALLOCATORS, check_method
from edgeq.errors import PlanError
from edgeq.optimize import prepare_qat
from edgeq.pipeline import load_pipeline
from edgeq.plan import BitPlan
from edgeq.planner import STORAGE_BITS, model_options
from edgeq.prune import channel_plan, kept_count
from edgeq.training import fine_tune, pruned_view

ROOT = Path(__file__).resolve().parents[1]
FLASH_TOL = 0.01  # of the file, or 64 B: the target
ARENA_TOL = 0.02
PLANS = (
    {"conv1": 4, "conv2": 4, "fc1": 4, "fc2": 4},
    {"conv1": 3, "conv2": 3, "fc1": 3, "fc2": 3},
    {"conv1": 8, "conv2": 3, "fc1": 2, "fc2": 6},
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    spec = load_pipeline(ROOT / "pipelines" / "digits.py").with_epochs(2)
    # the full net (no channels removed): the asserts below know its 4608-weight conv2
    opts = RunOptions(out=tmp_path_factory.mktemp("cost"), prune_channels=0.0)
    trained = train_pipeline(spec, opts)
    return spec, opts, trained, reference_shapes(trained)


def _realised_distinct(shapes, converted: bytes) -> dict:
    """Per layer and slice, the LUT strides and tables of the converter's integers (what LUT will store)."""
    out = {}
    for t, _ in weight_inputs(read(converted)):
        name = layer_name(str(t.name))
        out[name] = slice_distinct(shapes.layer(name), tensor_values(t))
    return out


@pytest.mark.parametrize("bits", PLANS, ids=lambda b: "-".join(map(str, b.values())))
def test_predictions_match_the_exported_files(digits, bits):
    spec, _, trained, shapes = digits
    qat = prepare_qat(
        trained.det, trained.float_model, BitPlan.from_bits(bits), trained.posteriors, keep_dense=True
    )
    fine_tune(qat, trained.splits, spec, 1)
    s = trained.splits
    ex = export(qat, s.x_train, s.x_test[:5], ExportOptions("auto"))
    distinct = _realised_distinct(shapes, ex.uncompressed)
    for v in ex.variants:
        p = predict_storage(shapes, bits, v.kind, distinct)
        assert abs(p.flash - len(v.model)) <= max(64, FLASH_TOL * len(v.model)), (
            v.kind,
            p.flash,
            len(v.model),
        )
        real_arena = arena_bytes(v.model)
        assert abs(p.arena - real_arena) <= ARENA_TOL * real_arena, (v.kind, p.arena, real_arena)
        assert stored_layers(v.model, shapes) == {
            n: [st.kind if st.kind != "lut" else f"lut{st.index_bits}" for st in sts]
            for n, sts in p.layers.items()
        }
    # auto weighs the DECODE kernel's measured code against the bytes LUT saves, as the export does
    decode = decode_code_bytes("reference")
    assert predict_storage(shapes, bits, "auto", distinct, decode).storage == ex.deployed.kind
    files = {v.kind: len(v.model) for v in ex.variants}
    by_bytes = predict_storage(shapes, bits, "auto", distinct).storage
    assert files[by_bytes] == min(files.values())  # without the code: the smaller file, as --flash-budget
    # under int4 storage 2 and 3 bits cost what 4 bits cost: packed INT4 is n/2 bytes whatever b
    assert predict(shapes, {n: 2 for n in bits}, "int4") == predict(shapes, {n: 4 for n in bits}, "int4")


def test_byte_cost_serves_the_planner(digits):
    _, _, trained, shapes = digits
    opts = model_options(list(trained.posteriors), byte_cost(shapes), channel_axis={"conv1": -1, "conv2": -1})
    conv2 = {(o.storage, o.bits): o.flash_bytes for o in opts["conv2"]}
    assert conv2[("int4", 2)] == conv2[("int4", 4)] == 4608 // 2
    assert conv2[("int8", 5)] == 4608
    # LUT: b-bit indices, but per channel a table and the scales again, and a DECODE operator
    assert conv2[("lut", 2)] < conv2[("lut", 3)] < conv2[("lut", 4)]
    assert conv2[("lut", 4)] > conv2[("int4", 4)]
    assert set(STORAGE_BITS) == {"int8", "int4", "lut"}


def test_planner_grids_are_the_ones_qat_fixes(digits):
    from edgeq.optimize import interval_ranges

    _, _, trained, shapes = digits
    grids = layer_grids(trained, shapes, [3])
    ranges = interval_ranges(
        trained.float_model, BitPlan.from_bits({n: 3 for n in grids}), trained.posteriors
    )
    for name, by_bits in grids.items():
        np.testing.assert_allclose(np.asarray(by_bits[3].grid.scale) * 3, np.atleast_1d(ranges[name]))


@pytest.mark.parametrize("target", (4.0, 3.0))
def test_planner_exports_what_it_planned_within_the_uniform_flash(digits, target):
    spec, opts, trained, shapes = digits
    assert check_method("planner") is ALLOCATORS["planner"] is PLANNER
    cand = make_candidate(trained, spec, opts, "planner", target, 1)  # the allocator through the table
    uniform = make_candidate(trained, spec, opts, "uniform", target, 1)
    dep, uni = cand.exported.deployed, uniform.exported.deployed
    assert len(dep.model) <= len(uni.model)
    predicted = cand.plan.meta["predicted"]
    assert dep.kind == cand.plan.meta["storage"] == predicted["storage"]
    assert check_exported(cand.plan, dep.model, shapes) == []
    assert abs(len(dep.model) - predicted["flash_bytes"]) <= max(64, FLASH_TOL * len(dep.model))
    assert abs(arena_bytes(dep.model) - predicted["arena_bytes"]) <= ARENA_TOL * arena_bytes(dep.model)
    # The run's planner charges a LUT plan the DECODE kernel's code (the reference kernels' here): at target
    # 3 the 3-bit uniform plan is stored as INT4, whose bytes hold 4 bits as well, so it plans 4 bits.
    decode = decode_code_bytes(opts.target.kernels)
    assert plan_layers(trained, target, spec, shapes=shapes, decode_code=decode).plan.bits == cand.plan.bits
    # every layer holds its planned bits: at most 2**b - 1 values per channel (the converter stores <= 4-bit
    # layers on the INT4 grid, so a 3-bit channel holds 7 of -7..7, not -3..3)
    for t, _ in weight_inputs(read(cand.exported.uncompressed)):
        b = cand.plan.bits[layer_name(str(t.name))]
        assert max_distinct(tensor_values(t), is_per_channel(t), channel_axis(t)) <= 2**b - 1


def test_plan_for_target_takes_a_budget_and_a_test():
    from edgeq.planner import Grid, Option, plan_for_target

    def opt(layer: str, bits: int, flash: int, cost: float) -> Option:
        return Option(layer, bits, "int8", Grid("symmetric", bits, scale=(0.1,)), flash, 0, cost, 100)

    options = {
        "a": [opt("a", 2, 25, 9.0), opt("a", 4, 50, 3.0), opt("a", 8, 100, 0.0)],
        "b": [opt("b", 2, 25, 8.0), opt("b", 4, 50, 2.0), opt("b", 8, 100, 0.0)],
    }
    assert plan_for_target(options, 4).bits == {"a": 4, "b": 4}  # budget: the uniform 4-bit plan's 100 B
    assert plan_for_target(options, 4, flash_budget=150).bits == {"a": 8, "b": 4}
    # the test is asked cheapest first and may refuse what the options' sums allow
    asked = []
    plan = plan_for_target(
        options, 4, flash_budget=150, accept=lambda p: asked.append(p.bits) or p.flash <= 100
    )
    assert plan.bits == {"a": 4, "b": 4} and asked[0] == {"a": 8, "b": 4}


def test_the_planner_prices_the_cmsis_nn_target_as_the_export_stores_it(digits):
    # CMSIS-NN reads INT4 packed: the export leaves INT4 weights unsliced and the arena needs no unpack
    # scratch; the planner's INT4 family is priced the same way (its arena is the host-calibrated figure
    # less that scratch: the device's own is measured under QEMU, tests/test_qemu_firmware.py).
    from dataclasses import replace

    from deploy.target import Target

    spec, opts, trained, _ = digits
    cmsis = replace(opts, target=Target(kernels="cmsis-nn"))
    cand = make_candidate(trained, spec, cmsis, "planner", 4.0, 1)
    ref = make_candidate(trained, spec, opts, "planner", 4.0, 1)
    assert cand.exported.sliced is None and ref.exported.sliced is not None
    predicted = cand.plan.meta["predicted"]
    assert cand.plan.meta["assumes"]["kernels"] == "cmsis-nn"
    assert abs(len(cand.exported.deployed.model) - predicted["flash_bytes"]) <= 64
    assert predicted["arena_bytes"] < ref.plan.meta["predicted"]["arena_bytes"] / 2


def test_an_arena_budget_alone_screens_the_planner_from_the_smallest_target_that_fits(digits):
    from deploy.planning import targets_for_ram

    spec, _, trained, shapes = digits
    arena = {b: plan_layers(trained, b, spec, shapes=shapes).prediction.arena for b in (4, 8)}
    assert arena[8] < arena[4]  # all int8: no INT4 unpack buffer in the reference kernels' arena
    budget = (arena[4] + arena[8]) // 2
    targets = targets_for_ram(trained, spec, budget)
    first = targets[0]
    assert 4 < first <= 8 and len(targets) >= 2
    assert plan_layers(trained, first, spec, ram_budget=budget).prediction.arena <= budget
    with pytest.raises(PlanError):  # the edge: 1/16 bit lower, nothing fits the arena
        plan_layers(trained, first - 1 / 16, spec, ram_budget=budget)
    assert targets_for_ram(trained, spec, arena[8] // 2) == []  # below every plan's arena


def test_a_plan_with_zeros_is_stored_huffman_as_predicted(digits):
    # --prune auto: below the smallest dense plan (target 1.5: 3/4 of the uniform 2-bit plan's flash) only
    # zeros reach the budget; with the start weights kept (0 QAT epochs) the file is what was predicted
    from dataclasses import replace

    from deploy.target import Target

    spec, opts, trained, shapes = digits
    planned = plan_layers(trained, 1.5, spec, shapes=shapes, zeros=True)
    with pytest.raises(PlanError):
        plan_layers(trained, 1.5, spec, shapes=shapes)  # dense: nothing fits
    zeros = planned.plan.meta["zeros"]
    assert zeros and planned.prediction.storage == planned.plan.meta["storage"] == "huffman"
    # a model-file budget, as a --flash-budget without a board sets: the DECODE kernel's code is not counted
    model_file = replace(opts, prune="auto", target=Target(flash_budget=planned.budget))
    assert not model_file.target.counts_code
    cand = make_candidate(trained, spec, model_file, "planner", 1.5, 0, plan=planned.plan)
    dep = cand.exported.deployed
    assert dep.kind == "huffman" and cand.prune == "auto"
    assert abs(len(dep.model) - planned.prediction.flash) <= max(64, FLASH_TOL * len(dep.model))
    assert abs(arena_bytes(dep.model) - planned.prediction.arena) <= ARENA_TOL * arena_bytes(dep.model)
    for t, _ in weight_inputs(read(cand.exported.uncompressed)):
        name = layer_name(str(t.name))
        values = tensor_values(t)
        assert np.sum(values == 0) >= np.floor(zeros.get(name, 0.0) * values.size)  # the planned zeros


def test_a_mixed_plan_puts_lut_where_it_pays_and_is_stored_as_planned(digits):
    # int4+lut: per layer, LUT indices or packed INT4/INT8. At 3 bits LUT stores fc1's 18,432 weights in
    # 3 bits where INT4 takes 4, while conv1 and fc2 are too small to pay for their tables and DECODE
    # operators; CMSIS-NN reads the INT4 ones packed. A model-file budget: no DECODE code counted.
    from dataclasses import replace

    from deploy.planning import family_shapes, lut_ops_for
    from deploy.storage.cost import MIXED
    from deploy.target import Target

    spec, opts, trained, _ = digits
    planned = plan_layers(trained, 3.0, spec, kernels="cmsis-nn")
    meta = planned.plan.meta
    kinds = {k.rstrip("0123456789") for ks in meta["storage_per_layer"].values() for k in ks}
    assert meta["storage"] == planned.prediction.storage == MIXED and "lut" in kinds and kinds - {"lut"}
    shapes = family_shapes(trained, kernels="cmsis-nn")[MIXED]
    lut_layers = {n for n, ks in meta["storage_per_layer"].items() if ks[0].startswith("lut")}
    assert meta["lut_ops"] == sorted(s.op for n in lut_layers for s in shapes.layer(n).slices)
    # the operators index the model sliced under the plan's decode budget; exported unsliced, auto weighs
    # only the whole-model storages
    assert lut_ops_for(planned.plan, shapes.decode_budget) == tuple(meta["lut_ops"])
    assert lut_ops_for(planned.plan, None) == ()
    model_file = replace(opts, target=Target(kernels="cmsis-nn", flash_budget=planned.budget))
    cand = make_candidate(trained, spec, model_file, "planner", 3.0, 1, plan=planned.plan)
    dep = cand.exported.deployed
    files = {v.kind: len(v.model) for v in cand.exported.variants}
    assert dep.kind == MIXED and files[MIXED] == min(files.values()) and {"int4", "lut"} <= set(files)
    assert check_exported(cand.plan, dep.model, shapes) == []
    assert abs(len(dep.model) - planned.prediction.flash) <= max(64, FLASH_TOL * len(dep.model))
    assert abs(arena_bytes(dep.model) - planned.prediction.arena) <= ARENA_TOL * arena_bytes(dep.model)


def test_the_per_layer_storage_is_the_planners_to_choose(digits):
    from deploy.storage import StorageError, check_storage, lut

    _, _, trained, shapes = digits
    with pytest.raises(StorageError, match="the planner chooses it under --storage auto"):
        check_storage("int4+lut")
    with pytest.raises(StorageError, match="plan.meta"):
        lut.build_mixed(b"", ())
    with pytest.raises(ValueError, match="lut_layers"):
        predict_storage(shapes, {n: 4 for n in trained.sizes}, "int4+lut")


def test_a_pruned_view_costs_the_removed_weights_of_the_layer_and_its_consumer(digits):
    _, _, trained, _ = digits
    assert trained.channels == {}  # the full net
    view = pruned_view(trained, {"conv1": 0.25})
    post = {p.name: p for p in trained.posteriors}
    keep = channel_plan(list(trained.posteriors), {"conv1": 0.25}).keep["conv1"]
    gone = np.setdiff1d(np.arange(16), keep)
    assert gone.size == 4 and view.channels == {"conv1": (12, 16)}
    sq = {n: np.square(p.mu / p.sigma) for n, p in post.items()}
    # conv1's dropped filters and conv2's input rows that read them (HWIO)
    expect = sq["conv1"][..., gone].sum() + sq["conv2"][:, :, gone, :].sum()
    assert information(trained.posteriors) - information(view.posteriors) == pytest.approx(expect, rel=1e-9)
    shapes = {p.name: p.mu.shape for p in view.posteriors}
    assert shapes["conv1"][-1] == 12 and shapes["conv2"][2] == 12 and shapes["fc1"] == post["fc1"].mu.shape
    assert view.sizes["conv2"] == 3 * 3 * 12 * 32 and view.float_model.get_layer("conv1").filters == 12


def test_channels_auto_keeps_the_choice_that_validates_best_within_the_unpruned_budget(digits):
    """--prune-channels auto (shrink_auto): every choice planned within the full net's budget at the
    target and validated; the best one fine-tuned with its own twin and planned within that budget."""
    spec, opts, trained, _ = digits
    opts = replace(opts, prune_channels="auto")
    t = opts.target
    settings = planner_settings(t.decode_budget, t.model_ram, opts.keep_dense, t.kernels, t.counts_code)
    small, target, choice = shrink_auto(trained, spec, opts, 3.0)
    assert choice.budget == plan_layers(trained, 3.0, spec, **settings).budget
    trials = choice.trials
    assert trials[0].fractions == {"conv1": 0.0, "conv2": 0.0, "fc1": 0.0} and trials[0].removed_cost == 0
    assert len(trials) >= 4  # the start and one step for each free layer, at least
    fitting = [t for t in trials if t.flash is not None]
    assert all(t.flash <= choice.budget for t in fitting) and all(np.isfinite(t.val_loss) for t in fitting)
    best = min(trials, key=lambda t: t.val_loss)
    assert choice.fractions == {n: f for n, f in best.fractions.items() if f}
    one = {t.fractions["fc1"]: t for t in trials[:4] if not t.fractions["conv1"] + t.fractions["conv2"]}
    # what fc1's removed channels free buys bits: the smaller model's plan costs less on what stays
    assert one[0.25].plan_cost < one[0.0].plan_cost and one[0.25].mean_bits > one[0.0].mean_bits
    assert one[0.25].removed_cost > 0 and trained.float_model.get_layer("fc1").units == 64  # copies tuned
    if not choice.fractions:
        assert small is trained and target == 3.0
        return
    had = {n: int(trained.float_model.get_layer(n).get_weights()[0].shape[-1]) for n in choice.fractions}
    assert small.channels == {n: (kept_count(had[n], f), had[n]) for n, f in choice.fractions.items()}
    assert small.bnn is not None and target > 3.0  # its own twin; the channels' bytes went to bits
    assert plan_layers(small, target, spec, **settings).budget <= choice.budget
