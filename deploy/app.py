"""The edgeq run: the one place where training, allocation, export, measurement and reporting meet.

    data -> train (float, twin) -> allocate -> QAT -> export -> measure -> write (artifacts, report)

Every stage hands the next a frozen value (Trained, Candidate, Measured, Report); command-line flags and
their wording live in deploy.cli, the search over plans in deploy.search.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

import deploy.planning  # noqa: F401  (registers the "planner" allocation method: it prices deploy's bytes)
import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from deploy import report
from deploy.artifacts import check_space, prepare_out, staging
from deploy.channels import CHANNEL_FRACTIONS, ChannelChoice, choose_channels
from deploy.export import Exported, ExportOptions, convert, convert_float, export
from deploy.measure import Measurement, alt_decompression_size, measure_litert, measure_tflm
from deploy.measure.litert import RESOLVERS
from deploy.measure.tflm import kernel_set_arena
from deploy.planning import (
    int8_arena,
    lut_ops_for,
    plan_layers,
    planner_settings,
    target_budget,
    targets_for_budget,
)
from deploy.storage import AUTO, check_storage
from deploy.target import Target
from edgeq.allocators import allocate, check_method
from edgeq.errors import PlanError
from edgeq.pipeline import PipelineSpec, check_spec, load_splits
from edgeq.plan import BitPlan
from edgeq.scoring import keras_score
from edgeq.training import Trained, build_float, fine_tune, train
from edgeq.validate import check_splits

OnStage = Callable[[str, str], None]
# The byte planner: the least uncertainty cost within the flash of the uniform plan at the target bits
# (benchmarks/results/planner_runs.md). The paper's methods stay a flag away (--method qiu|qinu|rb|bb).
DEFAULT_METHOD = "planner"
STAGES = ("data", "float", "bayes", "channels", "allocate", "qat", "export", "measure", "write", "device")
# What a run may write at the top of --out (a search adds pareto.*): checked for foreign files up front.
ARTIFACTS = tuple(
    """model_float.keras model_qat.keras bitplan.json model_int8.tflite model_uncompressed.tflite model.tflite
    model_data.h model_data.cc firmware test_data.npz report.json report.md report.html bits_per_layer.png
    flash_bytes.png pareto.json pareto.png device_report.json qemu""".split()
)


def stages_for(target: Target | None, channels: bool = False) -> tuple[str, ...]:
    """The stages a run goes through: "device" only on a virtual board, which the run measures on;
    "channels" only with --prune-channels."""
    on_device = target is not None and target.simulator is not None
    return tuple(s for s in STAGES if (s != "device" or on_device) and (s != "channels" or channels))


def _silent(name: str, text: str) -> None:
    pass


@dataclass(frozen=True)
class RunOptions:
    """What a run was asked for (the CLI builds it from flags; the Python API passes it directly)."""

    out: Path
    target_bits: float | None = None  # None: the pipeline's
    seed: int = 0
    method: str | None = None  # None: the pipeline's
    storage: str = AUTO
    data: str | None = None
    epochs: int | None = None  # caps every training stage (smoke runs)
    # Dense deploys as FULLY_CONNECTED (False: as a 1x1 CONV_2D, see quantize_model). On a Cortex-M4 the
    # conv form cost the digits model's first dense layer 1.35M instructions against 115K (reference
    # kernels) and 8 B of arena per unit; it only buys bit-exact agreement with LiteRT (<= 1 LSB otherwise).
    keep_dense: bool = True
    qat_start: str = "float"  # QAT from the float weights, or "twin": from the Bayesian twin's means
    distribute: str | None = None  # "multi-worker": the twin trains on the workers TF_CONFIG names
    target: Target = field(default_factory=Target)
    # --prune: the fraction of each planned layer's weights zeroed before QAT, the least informative
    # (|mu|/sigma) first, kept at zero through QAT; storage auto then tries PRUNE and HUFFMAN as well.
    # "auto": the planner picks each layer's fraction with its bits (deploy.planning.ZERO_FRACTIONS)
    prune: float | str | None = None
    # --prune-channels: the fraction of each hidden layer's output channels removed after the twin, the
    # least informative first; the smaller model is fine-tuned and gets its own twin (edgeq.training.shrink).
    # None: the pipeline's (PipelineSpec.prune_channels); 0: none; "auto": the planner chooses each layer's
    # share with its bits, within the unpruned model's flash at the target (deploy.channels)
    prune_channels: float | str | None = None
    force: bool = False  # replace files in out that edgeq did not write (see deploy.artifacts)


def check_target_bits(bits: float) -> float:
    """A mean bit width must lie in [1, 8]."""
    if not (np.isfinite(bits) and 1.0 <= bits <= 8.0):
        raise PlanError(f"--target-bits {bits} is outside [1, 8]; pick a mean bit width such as 4")
    return float(bits)


PRUNE_AUTO = "auto"


def channels_of(spec: PipelineSpec, opts: RunOptions) -> float | str | None:
    """The share of output channels this run removes: --prune-channels, else the pipeline's (None: none;
    "auto": the planner chooses each layer's, deploy.channels)."""
    if opts.prune_channels is not None:
        return check_prune(opts.prune_channels, "--prune-channels")
    fraction = spec.prune_channels
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction < 1.0):
        raise PlanError(
            f"pipeline {spec.name!r} sets prune_channels={fraction!r}, outside [0, 1); fix the pipeline "
            "script, or override it with --prune-channels FRACTION|none"
        )
    return float(fraction) or None


def check_prune(fraction: float | str | None, flag: str = "--prune") -> float | str | None:
    """--prune, --prune-channels: None (none), a fraction of each layer's weights (channels) in [0, 1), or
    "auto" (the planner's choice per layer)."""
    if fraction is None or fraction == PRUNE_AUTO:
        return fraction
    if not (np.isfinite(fraction) and 0.0 <= fraction < 1.0):
        what = "output channels to remove" if flag == "--prune-channels" else "weights to zero"
        raise PlanError(
            f"{flag} {fraction:g} is outside [0, 1); pass the fraction of each layer's {what}, "
            "e.g. 0.5, or none"
        )
    return float(fraction) or None


@dataclass(frozen=True)
class Candidate:
    """One bit plan carried through QAT and export: what a search compares and a run deploys."""

    method: str
    target_bits: float
    plan: BitPlan
    qat: object
    exported: Exported
    qat_epochs: int
    allocate_s: float
    prune: float | None = None  # the fraction of each planned layer's weights --prune zeroed

    @property
    def key(self) -> tuple:
        """Candidates with the same key are the same model: the method and its per-layer bits."""
        return plan_key(self.method, self.plan)


def plan_key(method: str, plan: BitPlan) -> tuple:
    """The identity of a plan within a search: its method, its per-layer bits and (--prune auto) zeros."""
    zeros = tuple(sorted((plan.meta.get("zeros") or {}).items()))
    return (method, *sorted(plan.bits.items()), *((("zeros", zeros),) if zeros else ()))


def prepare(spec: PipelineSpec, opts: RunOptions) -> tuple[PipelineSpec, float, str]:
    """Check every option before any work starts: (spec with the epoch cap, target bits, method)."""
    target = check_target_bits(opts.target_bits if opts.target_bits is not None else spec.target_bits)
    method = check_method(opts.method or spec.method or DEFAULT_METHOD).name
    check_storage(opts.storage)
    check_prune(opts.prune)
    for flag, value, what in (
        ("--prune", opts.prune, "zeros"),
        ("--prune-channels", channels_of(spec, opts), "channels"),
    ):
        if value == PRUNE_AUTO and method != "planner":
            raise PlanError(
                f"{flag} auto lets the planner choose each layer's {what}; it needs --method planner (the "
                f"default), not {method!r}: pass a fraction such as {flag} 0.5 instead"
            )
    check_spec(spec, opts.data)
    if opts.epochs is not None:
        if opts.epochs < 1:
            raise PlanError(f"--epochs {opts.epochs} must be at least 1")
        spec = spec.with_epochs(opts.epochs)
    if opts.target.simulator == "qemu":  # before training: the tools, the tree
        from deploy.device.simulate import check_simulator

        check_simulator(opts.target.kernels)
    prepare_out(Path(opts.out), ARTIFACTS, force=opts.force)
    return spec, target, method


def train_pipeline(spec: PipelineSpec, opts: RunOptions, on_stage: OnStage = _silent) -> Trained:
    """Stages 1-3: the pipeline's data, the float model, its Bayesian twin."""
    on_stage("data", f"loading data for pipeline {spec.name!r}")
    splits = load_splits(spec, opts.seed, opts.data)
    check_splits(splits)  # the arrays alone first: building the model reads the labels' range
    model = build_float(spec, splits, opts.seed)
    shape = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else None
    outputs = int(model.outputs[0].shape[-1] or 1) if getattr(model, "outputs", None) else None
    check_splits(splits, shape, outputs, splits.task)
    channels = channels_of(spec, opts)
    if channels:  # auto: the largest share it may choose
        largest = CHANNEL_FRACTIONS[-1] if channels == PRUNE_AUTO else channels
        check_pruned_form(model, largest, splits.x_train)
    # Models (float, QAT, two .tflite), C arrays in four copies, the test split, reports and plots.
    need = 64 * model.count_params() + splits.x_test.nbytes + splits.y_test.nbytes + (1 << 20)
    check_space(Path(opts.out), need)
    from edgeq.distribute import strategy_for

    strategy = strategy_for(opts.distribute)
    trained = train(spec, splits, opts.seed, on_stage, model=model, strategy=strategy)
    if channels and channels != PRUNE_AUTO:  # auto: run() chooses the channels at its target
        from edgeq.training import shrink

        trained = shrink(spec, trained, channels, opts.seed, on_stage, strategy)
    return trained


def settle_target(trained: Trained, opts: RunOptions, on_stage: OnStage = _silent) -> RunOptions:
    """opts with the target's decode budget settled for the trained model (Target.settle_decode)."""
    if not opts.target.decode_unsettled:
        return opts
    arena = int8_arena(trained, opts.keep_dense)
    target = opts.target.settle_decode(arena)
    if target.decode_budget != opts.target.decode_budget:
        on_stage(
            "allocate",
            f"decode budget {target.decode_budget // 1024} KiB: no slice's decoded weights need more "
            f"RAM than the int8 model's arena ({arena:,} B predicted)",
        )
    return replace(opts, target=target)


# --prune-channels auto fine-tunes each choice of channels it screens for this share of the float stage's
# epochs (at least one): digits 5 of 30, LeNet-5 1 of 8
SCREEN_SHARE = 1 / 6


def screen_epochs(spec: PipelineSpec) -> int:
    return max(1, int(spec.epochs * SCREEN_SHARE)) if spec.epochs > 0 else 0


def shrink_auto(
    trained: Trained,
    spec: PipelineSpec,
    opts: RunOptions,
    target_bits: float,
    on_stage: OnStage = _silent,
    *,
    budget: int | None = None,
) -> tuple[Trained, float, ChannelChoice]:
    """--prune-channels auto: the share of each free layer's channels whose plan within the target's flash
    (or `budget`, as the run's planner counts it) validates best (deploy.channels), the smaller model
    fine-tuned with its own twin (shrink), and the target that gives it that flash."""
    from edgeq.distribute import strategy_for
    from edgeq.prune import free_layers
    from edgeq.training import shrink

    t = opts.target
    # dense plans: a choice is validated without --prune auto's masks (the run's own plan may add zeros)
    settings = planner_settings(t.decode_budget, t.model_ram, opts.keep_dense, t.kernels, t.counts_code)
    budget = target_budget(trained, target_bits, spec, **settings) if budget is None else int(budget)
    planned = {p.name for p in trained.posteriors}
    free = [n for n in free_layers(trained.float_model) if n in planned]
    shares = ", ".join(f"{f:g}" for f in CHANNEL_FRACTIONS)
    on_stage(
        "channels",
        f"choosing the share of channels ({shares}) {len(free)} layers lose within {budget:,} B (target "
        f"{target_bits:g}): each choice planned, fine-tuned {screen_epochs(spec)} epochs and validated",
    )
    choice = choose_channels(
        trained,
        free,
        budget,
        lambda view, b: plan_layers(view, target_bits, spec, flash_budget=b, **settings),
        _validation_loss(spec, opts),
    )
    if all(trial.flash is None for trial in choice.trials):
        raise PlanError(
            f"no choice of channels the walk tried has a plan within {budget:,} B (target {target_bits:g}); "
            "raise --target-bits"
        )
    if not choice.fractions:
        on_stage("channels", f"every channel kept ({len(choice.trials)} choices validated)")
        return trained, target_bits, choice
    small = shrink(spec, trained, choice.fractions, opts.seed, on_stage, strategy_for(opts.distribute))
    target = targets_for_budget(small, spec, budget, fractions=(1.0,), **settings)
    if not target:
        raise PlanError(f"the pruned model has no plan within {budget:,} B; pass --prune-channels FRACTION")
    return small, target[0], choice


def _validation_loss(spec: PipelineSpec, opts: RunOptions) -> Callable[[Trained, object], float]:
    """deploy.channels' Score: a view's float model (a copy) fine-tuned screen_epochs as the float stage
    trains, its plan's QAT model calibrated (no QAT epochs), the loss on the validation split."""
    import tf_keras as keras

    from edgeq.training import compile_float, train_float

    short = replace(spec, epochs=screen_epochs(spec))

    def score(view: Trained, planned) -> float:
        s = view.splits
        compile_float(view.float_model, short, s)
        keras.utils.set_random_seed(opts.seed)  # every choice fine-tuned on the same shuffles
        tuned = train_float(short, s, opts.seed, view.float_model)
        qat = qat_model(replace(view, float_model=tuned), planned.plan, opts)
        fine_tune(qat, s, spec, 0)
        return float(qat.evaluate(s.x_val, s.y_val, batch_size=spec.batch_size, verbose=0)[0])

    return score


def check_pruned_form(model, fraction: float, x: np.ndarray) -> None:
    """Refuse, before any training, a model --prune-channels cannot shrink: a merge ties its channels, a
    layer cannot be passed through, or its smaller form does not rebuild or convert to TFLite."""
    from deploy.export.convert import ExportError, convert
    from edgeq.prune import PruningError, trial_prune

    small = trial_prune(model, fraction)
    try:
        convert(small, x, samples=2, via_saved_model=False)
    except ExportError as e:
        raise PruningError(
            f"model {model.name!r} with {fraction:g} of its channels removed does not convert: {e}; "
            "use a smaller --prune-channels, or --prune for weight sparsity"
        ) from e


def allocate_for(
    method: str, trained: Trained, target_bits: float, spec: PipelineSpec, opts: RunOptions
) -> BitPlan:
    """The method's BitPlan; the planner prices its options with this run's export settings."""
    if method == "planner":  # the table's entry assumes the defaults: 16 KiB slices, FULLY_CONNECTED
        from deploy.planning import planner_allocator

        t = opts.target
        zeros = opts.prune == PRUNE_AUTO
        planner = planner_allocator(
            t.decode_budget, t.model_ram, opts.keep_dense, t.kernels, t.counts_code, zeros=zeros
        )
        return planner.allocate(trained, target_bits, spec, opts.seed)
    return allocate(method, trained, target_bits, spec, opts.seed)


def make_candidate(
    trained: Trained,
    spec: PipelineSpec,
    opts: RunOptions,
    method: str,
    target_bits: float,
    qat_epochs: int,
    on_stage: OnStage = _silent,
    plan: BitPlan | None = None,
) -> Candidate:
    """Stages 4-6 for one (method, target) or a given plan: allocate, project + QAT, export."""

    on_stage("allocate", f"allocating bits ({method}, target {target_bits:g} mean bits)")
    t0 = time.perf_counter()
    plan = plan or allocate_for(method, trained, target_bits, spec, opts)
    allocate_s = time.perf_counter() - t0
    on_stage("qat", f"quantization-aware fine-tuning with TF-MOT ({qat_epochs} epochs, per-layer bits)")
    # QAT starts from the float weights (or the twin's means) on fixed grids whose ranges minimise the
    # twin's uncertainty-weighted error; quantile levels are projected (benchmarks/results/lowbit_qat.md).
    qat = qat_model(trained, plan, opts)
    masks = prune_masks(trained, plan, opts.prune)
    if masks:
        from edgeq.prune import KeepMasks, apply_masks

        # KeepMasks zeroes the pruned weights when the fit begins and after every batch; once more after
        # bake_levels, since a level grid need not hold 0
        fine_tune(qat, trained.splits, spec, qat_epochs, [KeepMasks(masks)])
        apply_masks(qat, masks)
    else:
        fine_tune(qat, trained.splits, spec, qat_epochs)
    on_stage("export", f"converting, slicing and storing the weights ({opts.storage})")
    s = trained.splits
    t = opts.target
    options = ExportOptions(
        opts.storage,
        t.decode_budget,
        t.model_ram,
        kernels=t.kernels,
        count_code=t.counts_code,
        sparse=bool(masks),
        lut_ops=lut_ops_for(plan, t.decode_budget),  # a planner plan's int4+lut layers
    )
    exported = export(qat, s.x_train, s.x_test, options)
    pruned = opts.prune if masks else None
    return Candidate(method, target_bits, plan, qat, exported, qat_epochs, allocate_s, pruned)


def qat_model(trained: Trained, plan: BitPlan, opts: RunOptions):
    """The TF-MOT QAT model of a plan, from the float weights (or the twin's means), not yet fine-tuned."""
    from edgeq.optimize import prepare_qat

    return prepare_qat(
        trained.det,
        trained.float_model,
        plan,
        trained.posteriors,
        start=opts.qat_start,
        keep_dense=opts.keep_dense,
    )


def prune_masks(trained: Trained, plan: BitPlan, fraction: float | str | None) -> dict[str, np.ndarray]:
    """--prune's masks: per planned layer with a posterior, 0 at its least informative weights (auto: the
    share the planner chose for the layer, plan.meta["zeros"])."""
    if not fraction:
        return {}
    from edgeq.prune import informativeness_masks

    posts = [p for p in trained.posteriors if p.name in plan.layers]
    if fraction != PRUNE_AUTO:
        return informativeness_masks(posts, fraction)
    zeros = plan.meta.get("zeros") or {}
    return {p.name: informativeness_masks([p], zeros[p.name])[p.name] for p in posts if zeros.get(p.name)}


@dataclass(frozen=True)
class Measured:
    """Every model of a run in every runtime, measured once on the test split."""

    float_scores: Mapping[str, float]
    float_flash: int
    det_scores: Mapping[str, float]
    qat_scores: Mapping[str, float]
    bnn_quality: object | None
    int8_model: bytes = field(repr=False)
    int8: Measurement
    int8_litert_latency_us: float
    deployed: Measurement
    uncompressed: Measurement
    litert: tuple[Measurement, ...]  # on the uncompressed model: LiteRT cannot load DECODE
    board_arena: int = 0  # the arena for the target's kernel set, as the host can tell (kernel_set_arena)


def measure_run(trained: Trained, cand: Candidate, target: Target) -> Measured:
    """The int8 baseline, the deployed model and its uncompressed twin in TFLM, and LiteRT beside them."""
    from edgeq import bayes

    s = trained.splits
    x, y, task = s.x_test, s.y_test, s.task
    int8_model = convert(trained.float_model, s.x_train)
    ex, model = cand.exported, cand.exported.deployed.model
    alt = alt_decompression_size(model) if target.decompress_to == "alt" else 0
    int8_litert = measure_litert(int8_model, x[:1], y[:1], task, RESOLVERS[1])
    deployed = measure_tflm(model, x, y, task, alt_decompression=alt)
    board_arena = kernel_set_arena(model, target.kernels, deployed.arena_bytes, alt_decompression=alt)
    return Measured(
        float_scores=keras_score(trained.float_model, x, y, task),
        float_flash=len(convert_float(trained.float_model)),
        det_scores=keras_score(trained.det, x, y, task),
        qat_scores=keras_score(cand.qat, x, y, task),
        bnn_quality=bayes.mc_evaluate(trained.bnn, x, y) if task == "classification" else None,
        int8_model=int8_model,
        int8=measure_tflm(int8_model, x, y, task),
        int8_litert_latency_us=int8_litert.latency_us,
        deployed=deployed,
        uncompressed=measure_tflm(ex.uncompressed, x, y, task),
        litert=tuple(measure_litert(ex.uncompressed, x, y, task, r) for r in RESOLVERS),
        board_arena=board_arena,
    )


def write_artifacts(
    stage: Path, trained: Trained, cand: Candidate, measured: Measured, name: str, target: Target
):
    """Models, plan, test data, C arrays and the firmware project into the staging folder; the C arrays."""
    from deploy.export.carrays import write_c_arrays
    from deploy.firmware import render_firmware
    from deploy.measure.tflm import io_quant, tflm_interpreter
    from edgeq.optimize import quantize_scope

    deployed = cand.exported.deployed.model
    trained.float_model.save(stage / "model_float.keras")
    with quantize_scope():
        cand.qat.save(stage / "model_qat.keras")
    cand.plan.save(stage / "bitplan.json")
    (stage / "model_int8.tflite").write_bytes(measured.int8_model)
    (stage / "model_uncompressed.tflite").write_bytes(cand.exported.uncompressed)
    (stage / "model.tflite").write_bytes(deployed)
    np.savez(stage / "test_data.npz", x=trained.splits.x_test, y=trained.splits.y_test)
    carrays = write_c_arrays(deployed, stage, name)
    render_firmware(
        deployed,
        stage,
        name=name,
        arena_bytes=measured.board_arena,  # kArenaSize for the kernel set the firmware links
        input_quant=io_quant(tflm_interpreter(deployed), "input"),
        c_arrays=carrays,
        board=target.board,
        alt_decompression_bytes=measured.deployed.alt_decompression_bytes,
        kernels=target.kernels,
    )
    return carrays


class StageClock:
    """Wraps an on_stage callback and records how long each stage took."""

    def __init__(self, on_stage: OnStage = _silent):
        self.on_stage = on_stage
        self.seconds: dict[str, float] = {}
        self._open: tuple[str, float] | None = None

    def __call__(self, name: str, text: str) -> None:
        self.close()
        self._open = (name, time.perf_counter())
        self.on_stage(name, text)

    def close(self) -> dict[str, float]:
        """End the open stage; the seconds of every stage so far."""
        if self._open:
            self.seconds[self._open[0]] = round(time.perf_counter() - self._open[1], 2)
            self._open = None
        return dict(self.seconds)


def deploy(
    trained: Trained,
    cand: Candidate,
    spec: PipelineSpec,
    opts: RunOptions,
    clock: StageClock,
    search: report.SearchSummary | None = None,
) -> report.Report:
    """Stages 7-8 for the chosen candidate: measure it, write every artifact and the report, all at once."""
    clock("measure", "measuring the int8 baseline and the deployed model in TFLM and LiteRT")
    measured = measure_run(trained, cand, opts.target)
    out = Path(opts.out)
    clock("write", f"writing artifacts to {out}")
    with staging(out, force=opts.force) as stage:
        carrays = write_artifacts(stage, trained, cand, measured, spec.name, opts.target)
        device = None
        if opts.target.simulator == "qemu":
            name = opts.target.board.name
            clock("device", f"cross-compiling the firmware and running the test split on {name} (QEMU)")
            from deploy.device.simulate import run_on_qemu

            device = run_on_qemu(stage, opts.target.kernels)
        facts = report.RunFacts(
            spec.name, opts.seed, spec.source, cand, trained, measured, opts.target, carrays, device
        )
        rep = report.build(facts, stage_seconds=clock.close(), search=search)
        report.write(stage, rep)
    return rep


def run(spec: PipelineSpec, opts: RunOptions, on_stage: OnStage = _silent) -> report.Report:
    """One plan for one pipeline, end to end; every artifact written into opts.out."""
    spec, target_bits, method = prepare(spec, opts)
    clock = StageClock(on_stage)
    trained = train_pipeline(spec, opts, clock)
    opts = settle_target(trained, opts, clock)
    choice = None
    if channels_of(spec, opts) == PRUNE_AUTO:
        trained, target_bits, choice = shrink_auto(trained, spec, opts, target_bits, clock)
    cand = make_candidate(trained, spec, opts, method, target_bits, spec.qat_epochs, clock)
    if choice is not None:  # the choice and every alternative validated, in bitplan.json and the report
        plan = replace(cand.plan, meta={**cand.plan.meta, "channel_choice": choice.to_dict()})
        cand = replace(cand, plan=plan)
    return deploy(trained, cand, spec, opts, clock)
