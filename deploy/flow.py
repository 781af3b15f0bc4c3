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
    decode_budget: int | None = 16 * 1024  # bytes of decompressed weights per slice; None: no slicing
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


def _allocate(method: str, posts, target: float, spec: PipelineSpec, seed: int):
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
    """sum_j ceil(|l_j| b_j / 8) + 4 bytes per int32 bias, over the model's weight layers."""
    from edgeq.optimize import QUANTIZABLE

    total = 0
    for layer in model.layers:
        if type(layer) not in QUANTIZABLE:
            continue
        kernel, *rest = layer.get_weights()
        total += int(np.ceil(kernel.size * plan_bits.get(layer.name, 8) / 8))
        total += 4 * int(rest[0].size if rest else 0)
    return total


def run(spec: PipelineSpec, opts: RunOptions) -> dict:
    """Run the whole flow for one pipeline and write every artifact into opts.out; returns report.json."""
    import tensorflow as tf
    import tf_keras as keras

    from edgeq import bayes
    from edgeq.informativeness import layer_informativeness
    from edgeq.optimize import project_weights, quantize_model, quantize_scope, weight_layers

    target = check_target(opts.target_bits if opts.target_bits is not None else spec.target_bits)
    method = opts.method or spec.method
    if opts.storage not in export.STORAGES:
        raise EdgeqError(f"unknown --storage {opts.storage!r}; use one of {', '.join(export.STORAGES)}")
    board = None
    if opts.board:
        from deploy.boards import load_board

        board = load_board(opts.board)
    if opts.epochs is not None:
        spec = spec.with_epochs(opts.epochs)
    out = prepare_out(Path(opts.out))
    progress = Progress(opts.quiet, opts.stderr)

    # 1. data
    progress.stage("data", f"loading data for pipeline {spec.name!r}")
    splits = spec.load_data(seed=opts.seed, data=opts.data)
    loss, metrics = _loss_and_metrics(splits.task)

    # 2. the float model
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

    # 3. its Bayesian twin (Flipout), kernel means from the float weights, KL / N
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

    # 4. informativeness -> bit plan
    progress.stage("allocate", f"allocating bits ({method}, target {target:g} mean bits)")
    t0 = time.perf_counter()
    plan = _allocate(method, posts, target, spec, opts.seed)
    allocate_s = time.perf_counter() - t0
    info = layer_informativeness(posts)

    # 5. project onto the plan's grids, then TF-MOT QAT at each layer's bit width
    progress.stage("qat", "quantization-aware fine-tuning with TF-MOT (per-layer bits)")
    qat = quantize_model(project_weights(det, plan), plan)
    qat.compile(keras.optimizers.Adam(spec.qat_lr), loss, metrics)
    if spec.qat_epochs > 0:
        qat.fit(splits.x_train, splits.y_train, epochs=spec.qat_epochs, batch_size=spec.batch_size, verbose=0)

    # 6. export: int8 baseline, the QAT model (INT4 where <= 4 bits), LUT compression, verified
    progress.stage("export", f"converting and compressing (storage {opts.storage})")
    int8_model = export.convert(float_model, splits.x_train)
    uncompressed = export.convert(qat, splits.x_train)
    sliced = slice_weights(uncompressed, opts.decode_budget) if opts.decode_budget else None
    chosen, variants = export.choose_storage(
        sliced.model if sliced else uncompressed, opts.storage, splits.x_test, reference=uncompressed
    )

    # 7. measure in TFLM and LiteRT
    progress.stage("measure", "measuring in TFLM and LiteRT over the whole test split")
    x, y, task = splits.x_test, splits.y_test, splits.task
    bnn_quality = bayes.mc_evaluate(bnn, x, y) if task == "classification" else None
    m_int8 = measure.measure_tflm(int8_model, x, y, task)
    m_dep = measure.measure_tflm(chosen.model, x, y, task)
    m_unc = measure.measure_tflm(uncompressed, x, y, task)
    lite_raw = measure.run_litert(uncompressed, x, "BUILTIN_REF")
    lite_scores = measure.score(lite_raw, y, measure.output_quant(uncompressed), task)
    vs_litert = measure.agreement(m_unc["raw"], lite_raw)
    vs_uncompressed = measure.agreement(m_dep["raw"], m_unc["raw"])

    # 8. write the artifacts (staged, then renamed into place) and the report
    progress.stage("write", f"writing artifacts to {out}")
    from deploy.carrays import write_c_arrays
    from deploy.firmware import render_firmware

    with staging(out) as stage:
        float_model.save(stage / "model_float.keras")
        with quantize_scope():
            qat.save(stage / "model_qat.keras")
        plan.save(stage / "bitplan.json")
        (stage / "model_int8.tflite").write_bytes(int8_model)
        (stage / "model_uncompressed.tflite").write_bytes(uncompressed)
        (stage / "model.tflite").write_bytes(chosen.model)
        np.savez(stage / "test_data.npz", x=x, y=y)
        carr = write_c_arrays(chosen.model, stage, spec.name)
        input_q = measure.io_quant(measure.tflm_interpreter(chosen.model), "input")
        render_firmware(
            chosen.model,
            stage,
            name=spec.name,
            arena_bytes=m_dep["figures"]["arena_bytes"],
            input_quant=input_q,
            c_arrays=carr,
        )
        rep = report.build(
            spec=spec,
            opts=opts,
            target=target,
            method=method,
            plan=plan,
            sizes=sizes,
            info=info,
            float_scores=_keras_score(float_model, x, y, task),
            det_scores=_keras_score(det, x, y, task),
            qat_scores=_keras_score(qat, x, y, task),
            bnn_quality=bnn_quality,
            int8=m_int8,
            deployed=m_dep,
            uncompressed=m_unc,
            chosen=chosen,
            variants=variants,
            lite_scores=lite_scores,
            vs_litert=vs_litert,
            vs_uncompressed=vs_uncompressed,
            litert_latency_us=measure.litert_latency_us(uncompressed, x[0]),
            packing_limit=packing_limit(float_model, plan.bits),
            allocate_s=allocate_s,
            stage_times=progress.done(),
            slicing=sliced,
            board=board,
            carrays=carr,
        )
        report.write(stage, rep)
    return rep
