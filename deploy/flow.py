"""The edgeq flow: data, float, Bayesian twin, plan, QAT, export, measure, report."""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from deploy import export, measure, report
from deploy.slicing import slice_weights
from edgeq.errors import EdgeqError, ModelError, PlanError
from edgeq.pipeline import PipelineSpec

STAGES = ("data", "float", "bayes", "allocate", "qat", "export", "measure", "write")


@dataclass(frozen=True)
class RunOptions:
    """What the user chose on the command line."""

    out: Path
    target_bits: float | None = None
    seed: int = 0
    method: str | None = None
    storage: str = "auto"
    data: str | None = None
    epochs: int | None = None  # caps every training stage (smoke runs)
    board: str | None = None
    arena_limit: int | None = None  # RAM a search allows the arena; --storage auto weighs flash against it
    decompress_to: str = "arena"  # or "alt": DECODE writes into the interpreter's alternate memory
    decode_budget: int | None = 16 * 1024  # bytes of decompressed weights per slice; None: no slicing
    keep_dense: bool = False  # Dense as FULLY_CONNECTED instead of 1x1 CONV_2D (see quantize_model)
    quiet: bool = False
    stderr: object = None  # where progress goes (the CLI passes the real terminal)


def check_target(bits: float) -> float:
    """--target-bits must lie in [1, 8]."""
    if not 1.0 <= bits <= 8.0:
        raise PlanError(f"--target-bits {bits} is outside [1, 8]; pick a mean bit width such as 4")
    return bits


def prepare_out(out: Path) -> Path:
    """Create the output folder and prove it is writable before any work starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".edgeq-probe-"):
            pass
    except OSError as e:
        raise EdgeqError(f"cannot write to output folder {out} ({e.strerror}); choose another --out") from e
    return out


@contextmanager
def staging(out: Path):
    """A hidden folder inside out; its files are renamed into out only if the block succeeds."""
    stage = Path(tempfile.mkdtemp(prefix=".edgeq-staging-", dir=out))
    try:
        yield stage
        for item in sorted(stage.iterdir()):
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            item.replace(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class Progress:
    """Shows which stage is running (rich on a terminal, plain lines otherwise)."""

    def __init__(self, quiet: bool, stream=None):
        self.quiet = quiet
        self.stream = stream
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}
        self._last: tuple[str, float] | None = None

    def stage(self, name: str, what: str) -> None:
        self._close()
        self._last = (name, time.perf_counter())
        if not self.quiet:
            from rich.console import Console

            i = STAGES.index(name) + 1
            console = Console(file=self.stream) if self.stream is not None else Console(stderr=True)
            console.print(f"[bold cyan][{i}/{len(STAGES)}][/] {what}", highlight=False)

    def _close(self) -> None:
        if self._last:
            self.times[self._last[0]] = round(time.perf_counter() - self._last[1], 2)

    def done(self) -> dict[str, float]:
        self._close()
        self._last = None
        return self.times


def _loss_and_metrics(task: str):
    import tf_keras as keras

    if task == "regression":
        return keras.losses.MeanSquaredError(), ["mae"]
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]


def _keras_score(model, x, y, task: str) -> dict[str, float]:
    pred = model.predict(x, verbose=0, batch_size=256)
    if task == "regression":
        err = pred.reshape(-1) - y.reshape(-1)
        return {"mae": float(np.mean(np.abs(err))), "mse": float(np.mean(err**2))}
    return {"accuracy": float(np.mean(pred.argmax(1) == y))}


def allocate_plan(method: str, posts, target: float, spec: PipelineSpec, seed: int):
    """The BitPlan of one allocation method (qiu, qinu, rb, uniform) at one target."""
    from edgeq import allocate

    pin = dict(spec.pin) or None
    if method in ("qiu", "qinu"):
        return allocate.quantile_inform(
            posts,
            target,
            min_bits=spec.min_bits,
            max_bits=spec.max_bits,
            pin=pin,
            quantizer="uniform" if method == "qiu" else "quantile",
        )
    if method == "rb":
        return allocate.random_bits(posts, target, min_bits=spec.min_bits, max_bits=spec.max_bits, seed=seed)
    if method == "uniform":
        return allocate.uniform_plan(posts, int(round(target)))
    raise PlanError(f"unknown method {method!r}; use qiu, qinu, rb or uniform")


def packing_limit(model, plan_bits: dict[str, int]) -> int:
    """sum_j ceil(|l_j| b_j / 8) + 4 bytes per int32 bias, over the weight layers (unplanned ones at 8 bits).

    Works on plain models and on TF-MOT QAT models, whose wrappers hold the original layer in `.layer`.
    """
    from edgeq.optimize import QUANTIZABLE

    total = 0
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if type(inner) not in QUANTIZABLE:
            continue
        kernel = inner.depthwise_kernel if hasattr(inner, "depthwise_kernel") else inner.kernel
        total += int(np.ceil(int(np.prod(kernel.shape)) * plan_bits.get(inner.name, 8) / 8))
        bias = getattr(inner, "bias", None)
        total += 4 * int(bias.shape[0]) if bias is not None else 0
    return total


@dataclass
class Trained:
    """The stages that run once per pipeline: data, the float model and its Bayesian twin."""

    splits: object
    float_model: object
    bnn: object
    det: object  # M_det: the float architecture carrying the posterior means
    posteriors: list
    sizes: dict[str, int]
    loss: object
    metrics: list


@dataclass
class Candidate:
    """One bit plan carried through QAT and export: what a sweep compares and a run deploys."""

    method: str
    target: float
    plan: object
    qat: object
    uncompressed: bytes
    chosen: export.Storage
    variants: list
    sliced: object | None
    allocate_s: float


def train(spec: PipelineSpec, opts: RunOptions, progress: Progress) -> Trained:
    """Stages 1-3: load data, train the float model, train its Bayesian twin."""
    import tensorflow as tf
    import tf_keras as keras

    from edgeq import bayes
    from edgeq.optimize import weight_layers

    progress.stage("data", f"loading data for pipeline {spec.name!r}")
    splits = spec.load_data(seed=opts.seed, data=opts.data)
    loss, metrics = _loss_and_metrics(splits.task)

    progress.stage("float", "training the float Keras model")
    keras.utils.set_random_seed(opts.seed)
    tf.config.experimental.enable_op_determinism()
    float_model = spec.build_model(splits.input_shape, splits.num_classes)
    sizes = weight_layers(float_model)
    if not sizes:
        raise ModelError(
            f"model {float_model.name!r} has no layer edgeq can quantize (Conv2D, DepthwiseConv2D, Dense)"
        )
    float_model.compile(keras.optimizers.Adam(spec.lr), loss, metrics)
    float_model.fit(
        splits.x_train,
        splits.y_train,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        validation_data=(splits.x_val, splits.y_val),
        verbose=0,
    )

    # The twin: TFP Flipout layers, kernel means from the float weights, KL / N.
    progress.stage("bayes", "training the Bayesian twin (TFP Flipout)")
    bnn = bayes.train_bayesian(
        lambda: bayes.to_bayesian(float_model, num_examples=len(splits.x_train), init_sigma=spec.init_sigma),
        splits.x_train,
        splits.y_train,
        loss=loss,
        epochs=spec.bnn_epochs,
        batch_size=spec.batch_size,
        lr=spec.bnn_lr,
    )
    posts = [p for p in bayes.posteriors(bnn) if p.name in sizes]
    det = bayes.to_deterministic(bnn, float_model)
    return Trained(splits, float_model, bnn, det, posts, sizes, loss, metrics)


def fine_tune(qat, trained: Trained, spec: PipelineSpec, epochs: int) -> None:
    """TF-MOT QAT for `epochs`; with 0 epochs, one pass at learning rate 0 only calibrates the ranges.

    The quantizers' ranges (activations' moving averages, kernels' last values) are set in training
    mode, so even a model that is not fine-tuned needs one pass before conversion.
    """
    import tf_keras as keras

    from edgeq.optimize import bake_levels

    s = trained.splits
    if epochs > 0:
        qat.compile(keras.optimizers.Adam(spec.qat_lr), trained.loss, trained.metrics)
        qat.fit(s.x_train, s.y_train, epochs=epochs, batch_size=spec.batch_size, verbose=0)
    else:
        qat.compile(keras.optimizers.SGD(0.0), trained.loss, trained.metrics)
        qat.fit(s.x_train, s.y_train, epochs=1, batch_size=spec.batch_size, verbose=0)
    bake_levels(qat)


def make_candidate(
    trained: Trained,
    spec: PipelineSpec,
    opts: RunOptions,
    method: str,
    target: float,
    qat_epochs: int,
    progress: Progress | None = None,
) -> Candidate:
    """Stages 4-6 for one (method, target): allocate, project + QAT, convert, slice, store, verify."""
    from edgeq.optimize import project_weights, quantize_model

    if progress:
        progress.stage("allocate", f"allocating bits ({method}, target {target:g} mean bits)")
    t0 = time.perf_counter()
    plan = allocate_plan(method, trained.posteriors, target, spec, opts.seed)
    allocate_s = time.perf_counter() - t0
    deterministic = sorted(set(trained.sizes) - {p.name for p in trained.posteriors})
    if deterministic:  # TFP has no variational DepthwiseConv2D: those layers stay 8-bit, outside the plan
        plan.meta["deterministic_layers_at_8_bits"] = deterministic
    if progress:
        progress.stage(
            "qat", f"quantization-aware fine-tuning with TF-MOT ({qat_epochs} epochs, per-layer bits)"
        )
    # Start QAT from the plan's own grids (uniform on [P5, P95], or the quantile levels).
    qat = quantize_model(project_weights(trained.det, plan), plan, keep_dense=opts.keep_dense)
    fine_tune(qat, trained, spec, qat_epochs)
    if progress:
        progress.stage("export", f"converting, slicing and storing the weights ({opts.storage})")
    s = trained.splits
    uncompressed = export.convert(qat, s.x_train)
    sliced = slice_weights(uncompressed, opts.decode_budget) if opts.decode_budget else None
    chosen, variants = export.choose_storage(
        sliced.model if sliced else uncompressed,
        opts.storage,
        s.x_test,
        reference=uncompressed,
        arena_limit=opts.arena_limit,
    )
    return Candidate(method, target, plan, qat, uncompressed, chosen, variants, sliced, allocate_s)


def _validate(spec: PipelineSpec, opts: RunOptions):
    """Check every option before any work starts; returns (spec, target, method, board, out, progress)."""
    target = check_target(opts.target_bits if opts.target_bits is not None else spec.target_bits)
    method = opts.method or spec.method
    if opts.decompress_to not in ("arena", "alt"):
        raise EdgeqError(f"unknown --decompress-to {opts.decompress_to!r}; use arena or alt")
    if opts.storage not in export.STORAGES:
        raise EdgeqError(f"unknown --storage {opts.storage!r}; use one of {', '.join(export.STORAGES)}")
    board = None
    if opts.board:
        from deploy.boards import load_board

        board = load_board(opts.board)
    if opts.epochs is not None:
        spec = spec.with_epochs(opts.epochs)
    out = prepare_out(Path(opts.out))
    return spec, target, method, board, out, Progress(opts.quiet, opts.stderr)


def run(spec: PipelineSpec, opts: RunOptions) -> dict:
    """Run the whole flow for one pipeline and write every artifact into opts.out; returns report.json."""
    spec, target, method, board, out, progress = _validate(spec, opts)
    trained = train(spec, opts, progress)
    cand = make_candidate(trained, spec, opts, method, target, spec.qat_epochs, progress)
    return deploy_candidate(trained, cand, spec, opts, board, out, progress)


def deploy_candidate(
    trained: Trained,
    cand: Candidate,
    spec: PipelineSpec,
    opts: RunOptions,
    board,
    out: Path,
    progress: Progress,
    extra: dict | None = None,
) -> dict:
    """Stages 6-8 for the chosen candidate: int8 baseline, measurements, artifacts, report."""
    from deploy.carrays import write_c_arrays
    from deploy.firmware import render_firmware
    from deploy.tflm import io_quant, tflm_interpreter
    from edgeq import bayes
    from edgeq.informativeness import layer_informativeness
    from edgeq.optimize import quantize_scope

    progress.stage("measure", "measuring the int8 baseline and the deployed model in TFLM and LiteRT")
    s = trained.splits
    int8_model = export.convert(trained.float_model, s.x_train)
    float_flash = len(export.convert_float(trained.float_model))
    x, y, task = s.x_test, s.y_test, s.task
    bnn_quality = bayes.mc_evaluate(trained.bnn, x, y) if task == "classification" else None
    m_int8 = measure.measure_tflm(int8_model, x, y, task)
    m_int8["figures"]["latency_litert_us"] = round(measure.litert_latency_us(int8_model, x[0]), 2)
    alt = measure.alt_decompression_size(cand.chosen.model) if opts.decompress_to == "alt" else 0
    m_dep = measure.measure_tflm(cand.chosen.model, x, y, task, alt_decompression=alt)
    m_unc = measure.measure_tflm(cand.uncompressed, x, y, task)
    # LiteRT cannot load TFLM_DECODE, so it runs the uncompressed model; the deployed one is held to that.
    litert = measure.check_litert(cand.uncompressed, x, y, task, m_unc["raw"])

    progress.stage("write", f"writing artifacts to {out}")
    with staging(out) as stage:
        trained.float_model.save(stage / "model_float.keras")
        with quantize_scope():
            cand.qat.save(stage / "model_qat.keras")
        cand.plan.save(stage / "bitplan.json")
        (stage / "model_int8.tflite").write_bytes(int8_model)
        (stage / "model_uncompressed.tflite").write_bytes(cand.uncompressed)
        (stage / "model.tflite").write_bytes(cand.chosen.model)
        np.savez(stage / "test_data.npz", x=x, y=y)
        carr = write_c_arrays(cand.chosen.model, stage, spec.name)
        render_firmware(
            cand.chosen.model,
            stage,
            name=spec.name,
            arena_bytes=m_dep["figures"]["arena_bytes"],
            input_quant=io_quant(tflm_interpreter(cand.chosen.model), "input"),
            c_arrays=carr,
            alt_decompression_bytes=alt,
        )
        rep = report.build(
            spec=spec,
            opts=opts,
            target=cand.target,
            method=cand.method,
            plan=cand.plan,
            sizes=trained.sizes,
            info=layer_informativeness(trained.posteriors),
            float_scores={**_keras_score(trained.float_model, x, y, task), "flash_bytes": float_flash},
            det_scores=_keras_score(trained.det, x, y, task),
            qat_scores=_keras_score(cand.qat, x, y, task),
            bnn_quality=bnn_quality,
            int8=m_int8,
            deployed=m_dep,
            uncompressed=m_unc,
            chosen=cand.chosen,
            variants=cand.variants,
            litert=litert,
            vs_uncompressed=measure.agreement(m_dep["raw"], m_unc["raw"]),
            packing_limit=packing_limit(trained.float_model, cand.plan.bits),
            allocate_s=cand.allocate_s,
            stage_times=progress.done(),
            board=board,
            carrays=carr,
            slicing=cand.sliced,
        )
        if extra:
            rep.update(extra)
        report.write(stage, rep)
    return rep
