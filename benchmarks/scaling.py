"""Benchmark: wall time and peak memory of edgeq's stages against parameter count, digits to VGG-16.

    python benchmarks/scaling.py [--models digits,lenet5,resnet8,vgg7,vgg16] [--images 1024]
                                 [--out benchmarks/results] [--quick]
    python benchmarks/scaling.py --one MODEL STAGE [--images N]      # one stage alone, JSON on stdout

Models: edgeq.models' digits_cnn (8x8x1, 24k parameters), lenet5 (28x28x1, 582k), resnet8, vgg7 and vgg16
(32x32x3), 10 classes, each with its pipeline's settings (pipelines/*.py: batch size, learning rates,
init sigma; VGG-16 has no pipeline and takes VGG-7's). Inputs and labels are synthetic (uniform [0, 1)
pixels, random labels, seeded): these are timing and memory figures, not accuracies. Every stage runs
edgeq's own code, each (model, stage) in a fresh process:

- twin: one epoch of the Bayesian twin on --images images, as edgeq.training.train fits it
  (bayes.train_bayesian over bayes.to_bayesian of the float model, the pipeline's batch size and lr);
  also the steady rate per 1,000 images (the epoch after its first batch, which traces the graph);
- qiu, rb, planner: deploy.app.allocate_for at 4 mean bits on the (untrained) twin's posteriors of the
  model's real shapes, as make_candidate calls it (the planner converts the model once at 8 bits);
- calibrate: what a search's screening does before export at 0 QAT epochs: prepare_qat of the uniform
  4-bit plan, then fine_tune with 0 epochs (one pass over the --images images at learning rate 0);
- export: deploy.export.export of that calibrated 4-bit model, --storage int4 at the 16 KiB decode budget,
  reference kernels (convert, slice, store, verify bit for bit in TFLM on a few rows);
- tflm: deploy.measure.tflm.arena_bytes, then one TFLM interpreter over a few images (seconds per inference).

A stage's prerequisites (the float model, the untrained twin, QAT) are rebuilt in its own process and not
timed; the tflm stage reads the model the export stage wrote. Memory: each process's peak RSS
(getrusage in the process, at its end) less that of a process that only imported the same stack
(TensorFlow, TFP, TF-MOT, tflite_micro, edgeq and deploy), measured once. BLAS and the process are pinned
to at most 2 cores. Writes benchmarks/results/scaling.md, .json, .png (--quick: digits and LeNet-5 on 256
images, into scaling_quick.*).
"""

from __future__ import annotations

import os

# Two cores is the target machine: pin BLAS threads before numpy loads (children inherit these).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import argparse
import dataclasses
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lenet5_front import beside  # noqa: E402
from provenance import commit, machine  # noqa: E402

from edgeq.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# name -> (edgeq.models builder, pipeline whose settings it takes, input shape, data set)
MODELS: dict[str, tuple[str, str, tuple[int, ...], str]] = {
    "digits": ("digits_cnn", "digits", (8, 8, 1), "digits"),
    "lenet5": ("lenet5", "mnist_lenet5", (28, 28, 1), "mnist"),
    "resnet8": ("resnet8", "cifar10_resnet8", (32, 32, 3), "cifar10"),
    "vgg7": ("vgg7", "cifar10_vgg7", (32, 32, 3), "cifar10"),
    "vgg16": ("vgg16", "cifar10_vgg7", (32, 32, 3), "cifar10"),  # no VGG-16 pipeline: VGG-7's settings
}
QUICK_MODELS = ("digits", "lenet5")
STAGES = ("twin", "qiu", "rb", "planner", "calibrate", "export", "tflm")
LABELS = {
    "twin": "twin epoch",
    "qiu": "QIU",
    "rb": "RB",
    "planner": "planner",
    "calibrate": "calibration",
    "export": "export int4",
    "tflm": "TFLM measure",
}
# The real splits' sizes (train, test) a run of each pipeline trains and verifies on (edgeq.data: digits
# 70/15/15 of 1,797; MNIST and CIFAR-10 with 10% of train held out for validation).
REAL_SPLITS = {"digits": (1_257, 270), "mnist": (54_000, 10_000), "cifar10": (45_000, 10_000)}
TARGET_BITS = 4.0
NUM_CLASSES = 10
# The 100-machine estimate's network: 10 Gb/s per machine, 50 us per message (stated in the results).
BANDWIDTH_BPS = 10e9 / 8
HOP_LATENCY_S = 50e-6
MACHINES = 100


# ---------------------------------------------------------------- one stage, in its own process


def _import_stack() -> None:
    """Everything a stage imports before it works: what the idle baseline process holds too."""
    import tensorflow  # noqa: F401
    import tensorflow_model_optimization  # noqa: F401
    import tensorflow_probability  # noqa: F401
    import tf_keras  # noqa: F401
    from tflite_micro.python.tflite_micro import runtime  # noqa: F401

    import deploy.app  # noqa: F401
    import deploy.export  # noqa: F401
    import deploy.measure.tflm  # noqa: F401
    import deploy.search  # noqa: F401
    import edgeq.bayes  # noqa: F401
    import edgeq.optimize  # noqa: F401


def _status_kib(field: str) -> int | None:
    """A VmRSS/VmHWM line of /proc/self/status in KiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0): the stage's own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def spec_for(model: str):
    """The pipeline's PipelineSpec with this model's builder (VGG-16 takes VGG-7's settings)."""
    from edgeq import models
    from edgeq.pipeline import load_pipeline

    builder, pipeline, _, _ = MODELS[model]
    spec = load_pipeline(ROOT / "pipelines" / f"{pipeline}.py")
    return dataclasses.replace(spec, name=f"scaling_{model}", build_model=getattr(models, builder))


def synthetic_splits(model: str, images: int, test: int, seed: int = 0):
    """Uniform [0, 1) images of the model's input shape with random labels (timing, not accuracy)."""
    from edgeq.data import Splits

    shape = MODELS[model][2]
    rng = np.random.default_rng(seed)
    x = rng.random((images + test, *shape), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, images + test).astype("int64")
    y[:NUM_CLASSES] = np.arange(NUM_CLASSES)  # every class present: Splits.num_classes reads the labels
    return Splits(x[:images], y[:images], x[images:], y[images:], x[images:], y[images:])


def epoch_timer():
    """A Keras callback that times the (single) epoch and the part after its first batch."""
    import tf_keras as keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.begin = self.first = self.end = None
            self.batches = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.begin = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.batches += 1
            if self.first is None:
                self.first = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.end = time.perf_counter()

        def figures(self, images: int, batch: int) -> dict[str, Any]:
            """The epoch's seconds and the steady seconds per 1,000 images (None with one batch)."""
            after = images - min(batch, images)
            steady = (self.end - self.first) / after * 1000 if self.batches > 1 and after > 0 else None
            return {"epoch_s": self.end - self.begin, "steady_s_per_1000": steady, "batches": self.batches}

    return EpochTimer()


def untrained(spec, splits):
    """A Trained from the pipeline's float model (untrained) and its untrained twin: the real shapes."""
    from edgeq import bayes
    from edgeq.layers import weight_layers
    from edgeq.training import Trained, build_float

    float_model = build_float(spec, splits, 0)
    sizes = weight_layers(float_model)
    bnn = bayes.to_bayesian(float_model, num_examples=len(splits.x_train), init_sigma=spec.init_sigma)
    posts = tuple(p for p in bayes.posteriors(bnn) if p.name in sizes)
    return Trained(splits, float_model, bnn, bayes.to_deterministic(bnn, float_model), posts, sizes)


def run_options(work: Path):
    """The run's defaults (reference kernels, 16 KiB decode budget, QAT from the float weights)."""
    from deploy.app import RunOptions
    from deploy.target import load_target

    return RunOptions(out=work / "unused", method="planner", target=load_target(kernels="reference"))


def calibrated(trained, spec, opts, timer=None):
    """make_candidate's QAT model of the uniform 4-bit plan, calibrated (0 epochs); the seconds of each."""
    from deploy.app import qat_model
    from edgeq.allocators import allocate
    from edgeq.training import fine_tune

    plan = allocate("uniform", trained, TARGET_BITS, spec, 0)
    t0 = time.perf_counter()
    qat = qat_model(trained, plan, opts)
    t1 = time.perf_counter()
    fine_tune(qat, trained.splits, spec, 0, [timer] if timer is not None else [])
    return qat, t1 - t0, time.perf_counter() - t1


def exported(qat, splits, opts):
    """deploy.export.export at --storage int4 with the run's target settings, as make_candidate sets them."""
    from deploy.export import ExportOptions, export

    t = opts.target
    options = ExportOptions("int4", t.decode_budget, t.model_ram, kernels=t.kernels, count_code=t.counts_code)
    return export(qat, splits.x_train, splits.x_test, options)


class Window:
    """Times a block and reads this process's RSS at its start and its peak inside it."""

    def __enter__(self) -> Window:
        self.start_kib = _status_kib("VmRSS")
        self.reset = _reset_peak()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.peak_kib = _status_kib("VmHWM") if self.reset else None


def stage_twin(model: str, spec, splits, opts, work: Path, rows: tuple[int, int]) -> tuple[Window, dict]:
    """One epoch of the twin, built and fitted as edgeq.training.train does."""
    from edgeq import bayes
    from edgeq.training import build_float, loss_and_metrics

    float_model = build_float(spec, splits, 0)
    images = len(splits.x_train)
    timer, twins = epoch_timer(), []

    def twin():
        twins.append(bayes.to_bayesian(float_model, num_examples=images, init_sigma=spec.init_sigma))
        return twins[-1]

    with Window() as w:
        bayes.train_bayesian(
            twin,
            splits.x_train,
            splits.y_train,
            loss=loss_and_metrics(splits.task, spec.from_logits)[0],
            epochs=1,
            batch_size=spec.batch_size,
            lr=spec.bnn_lr,
            callbacks=[timer],
        )
    details = timer.figures(images, spec.batch_size)
    details.update(
        params=int(float_model.count_params()),
        build_and_fit_s=w.seconds,
        twin_trainable=int(sum(int(np.prod(v.shape)) for v in twins[0].trainable_weights)),
        batch_size=spec.batch_size,
        bnn_epochs=spec.bnn_epochs,
    )
    w.seconds = details["epoch_s"]  # the epoch; building the twin and compiling are in build_and_fit_s
    return w, details


def stage_allocation(method: str):
    """allocate_for(method) at TARGET_BITS, as make_candidate calls it."""

    def run(model: str, spec, splits, opts, work: Path, rows: tuple[int, int]) -> tuple[Window, dict]:
        from deploy.app import allocate_for

        trained = untrained(spec, splits)
        with Window() as w:
            plan = allocate_for(method, trained, TARGET_BITS, spec, opts)
        return w, {
            "params": int(trained.float_model.count_params()),
            "mean_bits": round(plan.mean_bits(trained.sizes), 4),
            "bits": dict(plan.bits),
        }

    return run


def stage_calibrate(model: str, spec, splits, opts, work: Path, rows: tuple[int, int]) -> tuple[Window, dict]:
    """prepare_qat of the uniform 4-bit plan and the 0-epoch calibration pass."""
    trained = untrained(spec, splits)
    timer = epoch_timer()
    with Window() as w:
        _, prepare_s, pass_s = calibrated(trained, spec, opts, timer)
    return w, {
        "params": int(trained.float_model.count_params()),
        "prepare_qat_s": prepare_s,
        "pass_s": pass_s,
        "steady_s_per_1000": timer.figures(len(splits.x_train), spec.batch_size)["steady_s_per_1000"],
        "batch_size": spec.batch_size,
    }


def stage_export(model: str, spec, splits, opts, work: Path, rows: tuple[int, int]) -> tuple[Window, dict]:
    """deploy.export.export of the calibrated 4-bit model at --storage int4; the model goes to work/."""
    trained = untrained(spec, splits)
    qat, _, _ = calibrated(trained, spec, opts)
    verify = dataclasses.replace(splits, x_test=splits.x_test[: rows[0]])
    with Window() as w:
        ex = exported(qat, verify, opts)
    (work / f"{model}.tflite").write_bytes(ex.deployed.model)
    return w, {
        "params": int(trained.float_model.count_params()),
        "model_bytes": len(ex.deployed.model),
        "uncompressed_bytes": len(ex.uncompressed),
        "storage": ex.deployed.kind,
        "sliced": ex.sliced is not None,
        "verify_rows": rows[0],
    }


def stage_tflm(model: str, spec, splits, opts, work: Path, rows: tuple[int, int]) -> tuple[Window, dict]:
    """arena_bytes of the exported model, then one interpreter over a few images."""
    from deploy.measure.tflm import arena_bytes, invoke_all, tflm_interpreter

    path = work / f"{model}.tflite"
    details: dict[str, Any] = {}
    if path.is_file():  # the export stage's model
        data = path.read_bytes()
    else:  # run alone (--one): export first, untimed
        trained = untrained(spec, splits)
        qat, _, _ = calibrated(trained, spec, opts)
        data = exported(
            qat, dataclasses.replace(splits, x_test=splits.x_test[: rows[0]]), opts
        ).deployed.model
        details["params"] = int(trained.float_model.count_params())
    x = splits.x_test[: rows[1]]
    with Window() as w:
        arena = arena_bytes(data)
        t1 = time.perf_counter()
        interp = tflm_interpreter(data)
        t2 = time.perf_counter()
        invoke_all(interp, x)
        t3 = time.perf_counter()
    details.update(
        arena_bytes=arena,
        arena_s=t1 - w.t0,
        load_s=t2 - t1,
        s_per_inference=(t3 - t2) / len(x),
        inferences=len(x),
        model_bytes=len(data),
    )
    return w, details


RUNNERS = {
    "twin": stage_twin,
    "qiu": stage_allocation("qiu"),
    "rb": stage_allocation("rb"),
    "planner": stage_allocation("planner"),
    "calibrate": stage_calibrate,
    "export": stage_export,
    "tflm": stage_tflm,
}


def one_stage(model: str, stage: str, images: int, verify_rows: int, tflm_images: int, work: Path) -> dict:
    """Run one stage of one model in this process: its seconds, details and memory figures."""
    _import_stack()
    spec = spec_for(model)
    splits = synthetic_splits(model, images, max(verify_rows, tflm_images, NUM_CLASSES))
    w, details = RUNNERS[stage](model, spec, splits, run_options(work), work, (verify_rows, tflm_images))
    return {
        "model": model,
        "stage": stage,
        "seconds": w.seconds,
        "details": details,
        "images": images,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "stage_start_rss_kib": w.start_kib,
        "stage_peak_rss_kib": w.peak_kib,
    }


def idle() -> dict:
    """The baseline: a process that only imported the stack; also the search's sizes the estimate needs."""
    _import_stack()
    from deploy.planning import NEAR_BUDGET
    from deploy.search import DEFAULT_TARGETS, SCREEN_SAMPLES

    search = {"planner": len(NEAR_BUDGET), "qiu": len(DEFAULT_TARGETS), "rb": len(DEFAULT_TARGETS)}
    return {
        "stage": "idle",
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "search": {"candidates": search, "screen_samples": SCREEN_SAMPLES},
    }


# ---------------------------------------------------------------- the parent: children, table, plot


def child(args: list[str], timeout: float) -> dict:
    """Run this script on one stage in a fresh process; its JSON, or {'error': ...}."""
    with tempfile.NamedTemporaryFile(prefix="edgeq-scaling-", suffix=".json", delete=False) as f:
        result = Path(f.name)
    try:
        proc = subprocess.run(
            [sys.executable, __file__, *args, "--result", str(result)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not result.stat().st_size:
            tail = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()][-1:] or ["no output"]
            return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
        return json.loads(result.read_text())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        result.unlink(missing_ok=True)


def fit_slopes(rows: list[dict], key: str = "seconds", stages=STAGES) -> dict[str, float | None]:
    """Per stage: the least-squares slope of log(seconds) against log(parameters) (None under 2 models).

    key: "seconds" (the table's) or a details figure such as "steady_s_per_1000".
    """
    out: dict[str, float | None] = {}
    for stage in stages:
        pts = [(r["params"], _figure(r, stage, key)) for r in rows if _ok(r, stage)]
        pts = [(p, s) for p, s in pts if p and s and s > 0]
        if len({p for p, _ in pts}) < 2:
            out[stage] = None
            continue
        x, y = np.log10([p for p, _ in pts]), np.log10([s for _, s in pts])
        out[stage] = round(float(np.polyfit(x, y, 1)[0]), 3)
    return out


def _figure(row: dict, stage: str, key: str) -> float | None:
    st = row["stages"][stage]
    return st["seconds"] if key == "seconds" else st["details"].get(key)


def _ok(row: dict, stage: str) -> bool:
    return stage in row["stages"] and "error" not in row["stages"][stage]


def _detail(row: dict, stage: str, key: str) -> Any:
    return row["stages"][stage]["details"].get(key) if _ok(row, stage) else None


def estimates(rows: list[dict], search: dict) -> list[dict]:
    """Per model: a search's twin training and screening on 1 machine and on 100, from these measurements.

    Twin: the pipeline's epochs on the real training split at the measured steady rate; data-parallel over
    100 machines as edgeq's multi-worker mode does it (the batch is the global batch, so the steps per epoch
    stay), compute per step / 100 plus a ring all-reduce of the twin's gradients per step. Screening: every
    candidate a search screens (planner at NEAR_BUDGET targets, QIU and RB at DEFAULT_TARGETS) is allocated
    once serially (distinct_jobs) and again in its worker, calibrated on the training split, exported with
    the whole test split verified (the converted and the int4 model each run it) and measured in TFLM on
    SCREEN_SAMPLES (measure_tflm: one load, the rows, one more invoke, 5 + 50 for the latency).
    Candidates are independent, so 100 machines take ceil(C / 100) rounds of the slowest.
    """
    per_method = search["candidates"]
    candidates = sum(per_method.values())
    out = []
    for r in rows:
        n_train, n_test = REAL_SPLITS[r["data"]]
        est: dict[str, Any] = {"model": r["model"], "params": r["params"], "train": n_train, "test": n_test}
        rate, batch = _detail(r, "twin", "steady_s_per_1000"), _detail(r, "twin", "batch_size")
        if rate and batch:
            epochs = _detail(r, "twin", "bnn_epochs")
            steps = math.ceil(n_train / batch)
            step_s = rate * batch / 1000
            grads = 4 * _detail(r, "twin", "twin_trainable")
            comm = 2 * (MACHINES - 1) / MACHINES * grads / BANDWIDTH_BPS + 2 * (MACHINES - 1) * HOP_LATENCY_S
            est["twin"] = {
                "epochs": epochs,
                "one_s": epochs * steps * step_s,
                "many_s": epochs * steps * (step_s / MACHINES + comm),
                "comm_share": comm / (step_s / MACHINES + comm),
            }
        need = ("qiu", "rb", "planner", "calibrate", "export", "tflm")
        if all(_ok(r, s) for s in need):
            sec = {s: r["stages"][s]["seconds"] for s in need}
            t_inf = _detail(r, "tflm", "s_per_inference")
            cal_rate = _detail(r, "calibrate", "steady_s_per_1000") or (
                _detail(r, "calibrate", "pass_s") / r["images"] * 1000
            )
            calib = _detail(r, "calibrate", "prepare_qat_s") + cal_rate * n_train / 1000
            verify_extra = max(0, n_test - _detail(r, "export", "verify_rows")) * 2 * t_inf
            measure = _detail(r, "tflm", "load_s") + (min(search["screen_samples"], n_test) + 56) * t_inf
            serial = sum(n * sec[m] for m, n in per_method.items())
            each = {m: sec[m] + calib + sec["export"] + verify_extra + measure for m in per_method}
            est["screen"] = {
                "candidates": candidates,
                "serial_allocation_s": serial,
                "per_candidate_s": {m: round(v, 1) for m, v in each.items()},
                "calibration_s": calib,
                "verify_extra_s": verify_extra,
                "measure_s": measure,
                "one_s": serial + sum(n * each[m] for m, n in per_method.items()),
                "many_s": serial + math.ceil(candidates / MACHINES) * max(each.values()),
                "verify_share": verify_extra / max(each.values()),
            }
        out.append(est)
    return out


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _cell(row: dict, stage: str) -> str:
    st = row["stages"].get(stage)
    if st is None:
        return "—"
    if "error" in st:
        return "failed"
    return f"{st['seconds']:.2f} / {st['mib']:,.0f}"


def markdown(res: dict) -> str:
    """The results file: provenance, the table, the fitted slopes, the 100-machine estimate."""
    rows = res["rows"]
    lines = [
        "# Scaling: wall time and peak memory of edgeq's stages against parameter count",
        "",
        f"Command: `{res['command']}`  ",
        f"Commit: {res['commit']}; machine: {res['machine']['cpu']}, {res['machine']['nproc']} cores "
        f"(pinned to {res['cores']}), Python {res['machine']['python']}; {_dur(res['seconds'])} in all; "
        f"ran beside it: {res['beside']}.",
        "",
        f"Synthetic data: uniform [0, 1) images of each model's input shape and random labels (seed 0), "
        f"{res['images']:,} training images: these are timing and memory figures, not accuracies. Untrained "
        "float models and twins (the real shapes and code paths; an untrained twin's posteriors for the "
        f"allocation). Each (model, stage) ran in a fresh process; MiB = its peak RSS less the "
        f"{res['idle_mib']:,.0f} MiB of a process that only imported the same stack (TensorFlow, TFP, "
        "TF-MOT, tflite_micro, edgeq, deploy), so it includes the stage's untimed prerequisites (float "
        "model, twin, QAT model) held in memory; the third table gives what the stage itself added. Stages: "
        "twin = one Bayesian-twin epoch (bayes.train_bayesian, the pipeline's batch size); QIU, RB, "
        f"planner = deploy.app.allocate_for at {TARGET_BITS:g} mean bits; calibration = prepare_qat of the "
        "uniform 4-bit plan + fine_tune with 0 epochs (one pass at lr 0 over the training images); export = "
        "deploy.export.export, --storage int4, 16 KiB decode budget, reference kernels, verified on "
        f"{res['verify_rows']} rows; TFLM = arena_bytes + one interpreter over {res['tflm_images']} images.",
        "",
        "## Seconds / MiB per stage",
        "",
        "| model | parameters | " + " | ".join(LABELS[s] for s in STAGES) + " |",
        "|---|---:|" + "---:|" * len(STAGES),
    ]
    for r in rows:
        cells = " | ".join(_cell(r, s) for s in STAGES)
        lines.append(f"| {r['model']} | {r['params']:,} | {cells} |")
    lines += [
        "",
        f"![seconds and MiB against parameters]({res['plot']})",
        "",
        "## Rates and sizes",
        "",
        "| model | twin s / 1,000 images | calibration s / 1,000 images | TFLM s / inference | arena B "
        "| int4 model B | sliced | mean bits QIU / RB / planner |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        twin = _detail(r, "twin", "steady_s_per_1000")
        cal = _detail(r, "calibrate", "steady_s_per_1000")
        inf = _detail(r, "tflm", "s_per_inference")
        arena, size = _detail(r, "tflm", "arena_bytes"), _detail(r, "export", "model_bytes")
        bits = " / ".join(str(_detail(r, m, "mean_bits") or "—") for m in ("qiu", "rb", "planner"))
        lines.append(
            f"| {r['model']} | {_num(twin, '.2f')} | {_num(cal, '.2f')} | {_num(inf, '.4f')} | "
            f"{_num(arena, ',')} | {_num(size, ',')} | {_detail(r, 'export', 'sliced')} | {bits} |"
        )
    lines += [
        "",
        "## What each stage itself added (MiB: its peak less the RSS at its start, prerequisites excluded)",
        "",
        "| model | " + " | ".join(LABELS[s] for s in STAGES) + " |",
        "|---|" + "---:|" * len(STAGES),
    ]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(_num(_rise(r, s), ",.0f") for s in STAGES) + " |")
    lines += ["", "## Growth", ""]
    lines += growth_lines(res)
    lines += ["", "## On 100 machines (an estimate from these measurements)", ""]
    lines += estimate_lines(res)
    failed = [(r["model"], s, st["error"]) for r in rows for s, st in r["stages"].items() if "error" in st]
    if failed:
        lines += ["", "## Failed stages", ""]
        lines += [f"- {m} {s}: {e}" for m, s, e in failed]
    return "\n".join(lines) + "\n"


def _rise(row: dict, stage: str) -> float | None:
    """MiB the stage added over the RSS it started at (None where the peak could not be reset)."""
    st = row["stages"].get(stage, {})
    if "error" in st or st.get("stage_peak_rss_kib") is None or st.get("stage_start_rss_kib") is None:
        return None
    return max(0.0, (st["stage_peak_rss_kib"] - st["stage_start_rss_kib"]) / 1024)


def _num(v: Any, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def growth_lines(res: dict) -> list[str]:
    """Computed sentences: each stage's log-log slope, the fastest-growing stage, the slowest at the top."""
    slopes = {s: v for s, v in res["slopes"].items() if v is not None}
    rows = res["rows"]
    if not slopes:
        return ["Fewer than two models measured: no slope to fit."]
    models = ", ".join(r["model"] for r in rows)
    out = [
        f"Least-squares slope of log10(seconds) against log10(parameters) over {models} (numpy.polyfit; "
        f"{res['images']:,} training images for every model, so the twin and calibration slopes are per "
        "image): "
        + "; ".join(f"{LABELS[s]} {v:.2f}" for s, v in slopes.items())
        + ". A slope of 1 is linear in the parameter count.",
    ]
    rates = res.get("rate_slopes", {})
    if rates:
        out.append(
            "Per image at the steady rate (after the first batch, which traces the graph): "
            + "; ".join(f"{LABELS[s]} {v:.2f}" for s, v in rates.items())
            + "."
        )
    fastest = max(slopes, key=slopes.get)
    out.append(
        f"Fastest-growing stage: {LABELS[fastest]} (slope {slopes[fastest]:.2f}: ten times the parameters "
        f"take {10 ** slopes[fastest]:.1f} times as long)."
    )
    top = max(rows, key=lambda r: r["params"])
    done = {s: top["stages"][s]["seconds"] for s in STAGES if _ok(top, s)}
    if done:
        slow = max(done, key=done.get)
        out.append(
            f"At the largest model, {top['model']} ({top['params']:,} parameters), the slowest stage is "
            f"{LABELS[slow]} ({done[slow]:.1f} s)."
        )
    heavy = {s: top["stages"][s]["mib"] for s in STAGES if _ok(top, s)}
    if heavy:
        big = max(heavy, key=heavy.get)
        out.append(f"Its largest memory is {LABELS[big]}'s: {heavy[big]:,.0f} MiB above the idle process.")
    if len(rows) < 3:
        out.append("Only two models: each slope is the line through two points.")
    return out


def estimate_lines(res: dict) -> list[str]:
    """The 100-machine estimate: the twin under data parallelism, the screening stage spread over machines."""
    est = [e for e in res["estimates"] if "twin" in e or "screen" in e]
    if not est:
        return ["No model has the stages the estimate needs."]
    n = res["search"]["candidates"]
    out = [
        "This is an estimate extrapolated from the seconds above, not a measurement on 100 machines. "
        f"Assumed network: {BANDWIDTH_BPS * 8 / 1e9:g} Gb/s per machine, {HOP_LATENCY_S * 1e6:g} us per "
        "message. The twin: the pipeline's twin epochs on its real training split at the measured steady "
        "rate. Data-parallel on 100 machines, edgeq's multi-worker mode keeps the pipeline's batch as the "
        "global batch: each step's compute is split 100 ways (optimistic: about one image per replica) and "
        "each step adds a ring all-reduce of the twin's gradients (4 B per trainable twin weight: means and "
        f"scales). Screening: a search's candidates (planner at {n['planner']} near-budget targets, QIU and "
        f"RB at {n['qiu']} targets each, before de-duplication) are allocated once serially in the main "
        "process (distinct_jobs) and again in their worker (make_candidate), each at the seconds measured "
        "here (a process caches the planner's reference conversion, so its repeats cost somewhat less), "
        "then each is calibrated on the "
        "real training split, exported with the whole test split verified in TFLM (converted and int4 model "
        "each run it; --storage auto builds and verifies more kinds) and measured on "
        f"{res['search']['screen_samples']:,} test images. Candidates are embarrassingly parallel: "
        "ceil(candidates / 100) rounds of the slowest candidate, after the serial allocation.",
        "",
        "| model | twin: epochs | 1 machine | 100 machines | all-reduce share of a step | screening: "
        "candidates | 1 machine | 100 machines | serial allocation | whole-test-split verify share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in est:
        t, s = e.get("twin"), e.get("screen")
        tw = (
            f"{t['epochs']} | {_dur(t['one_s'])} | {_dur(t['many_s'])} | {100 * t['comm_share']:.0f}%"
            if t
            else "— | — | — | —"
        )
        sc = (
            f"{s['candidates']} | {_dur(s['one_s'])} | {_dur(s['many_s'])} | "
            f"{_dur(s['serial_allocation_s'])} | {100 * s['verify_share']:.0f}%"
            if s
            else "— | — | — | — | —"
        )
        out.append(f"| {e['model']} | {tw} | {sc} |")
    worst = [e for e in est if "twin" in e and "screen" in e]
    if worst:
        e = max(worst, key=lambda e: e["params"])
        t, s = e["twin"], e["screen"]
        idle_machines = max(0, MACHINES - s["candidates"])
        out += [
            "",
            f"For {e['model']} on 100 machines, the twin's training would {_change(t['one_s'], t['many_s'])} "
            f"(the all-reduce being {100 * t['comm_share']:.0f}% of a step), and screening would "
            f"{_change(s['one_s'], s['many_s'])}: with {s['candidates']} candidates, {idle_machines} of the "
            "100 machines have nothing to screen, and the serial allocation stays.",
        ]
    return out


def _change(one: float, many: float) -> str:
    """'speed up about N-fold, a to b' or 'slow down, a to b'."""
    if many < one:
        return f"speed up about {one / many:.0f}-fold, {_dur(one)} to {_dur(many)}"
    return f"slow down, {_dur(one)} to {_dur(many)}"


def plot(path: Path, res: dict) -> None:
    """Log-log: seconds against parameters per stage, and MiB above idle per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, ylabel in (
        (axes[0], "seconds", "wall seconds"),
        (axes[1], "mib", "peak RSS above the idle process (MiB)"),
    ):
        for stage in STAGES:
            pts = sorted(
                (r["params"], r["stages"][stage][key])
                for r in res["rows"]
                if _ok(r, stage) and r["stages"][stage][key] > 0
            )
            if pts:
                slope = res["slopes"].get(stage) if key == "seconds" else None
                label = LABELS[stage] + (f" (slope {slope:.2f})" if slope is not None else "")
                ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for r in res["rows"]:
            top = ("data", "axes fraction")
            ax.annotate(r["model"], (r["params"], 0.02), xycoords=top, fontsize=7, rotation=90, alpha=0.7)
    axes[0].set_title(f"time per stage ({res['images']:,} images for twin and calibration)")
    axes[1].set_title("peak memory per stage")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line (--one: one stage in this process, for the parent or by hand)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None, help=f"comma-separated, of {','.join(MODELS)} (default all)")
    ap.add_argument("--images", type=int, default=None, help="twin and calibration images (default 1024)")
    ap.add_argument("--verify-rows", type=int, default=None, help="rows the export verifies (default 4)")
    ap.add_argument("--tflm-images", type=int, default=None, help="images TFLM times (default 5)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    ap.add_argument("--quick", action="store_true", help="digits and LeNet-5, 256 images: scaling_quick.*")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per stage process")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "STAGE"), help=f"one stage of {', '.join(STAGES)}")
    ap.add_argument("--idle", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quick = args.quick
    defaults = {"images": (256, 1024), "verify_rows": (2, 4), "tflm_images": (3, 5)}
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    return args


def _bad(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _emit(data: dict, result: str | None) -> None:
    text = json.dumps(data, indent=1) + "\n"
    if result:
        Path(result).write_text(text)
    else:
        print(text, end="")


def main(argv: list[str] | None = None) -> int:
    """Run every (model, stage) in its own process and write scaling.md, .json and .png."""
    args = parse(argv)
    if args.images < 1 or args.verify_rows < 1 or args.tflm_images < 1:
        return _bad("--images, --verify-rows and --tflm-images must be at least 1")
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 2:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
    if args.idle:
        _emit(idle(), args.result)
        return 0
    if args.one:
        model, stage = args.one
        if model not in MODELS:
            return _bad(f"unknown model {model!r}; use one of {', '.join(MODELS)}")
        if stage not in STAGES:
            return _bad(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
        with tempfile.TemporaryDirectory(prefix="edgeq-scaling-") as tmp:
            work = Path(args.work or tmp)
            res = one_stage(model, stage, args.images, args.verify_rows, args.tflm_images, work)
        _emit(res, args.result)
        return 0
    names = (
        args.models.split(",") if args.models is not None else list(QUICK_MODELS if args.quick else MODELS)
    )
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        return _bad(f"unknown model {unknown[0]!r}; use one of {', '.join(MODELS)}")

    started_at = commit()  # the code that runs: later commits must not relabel it
    t_start = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - t_start:6.0f} s] {text}", file=sys.stderr, flush=True)

    base = child(["--idle"], args.timeout)
    if "error" in base:
        log(f"idle process failed: {base['error']}")
        return 1
    idle_kib = base["peak_rss_kib"]
    log(f"idle process (imports only): {idle_kib / 1024:,.0f} MiB")
    sizes = ["--images", str(args.images), "--verify-rows", str(args.verify_rows)]
    sizes += ["--tflm-images", str(args.tflm_images)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeq-scaling-") as work:
        for name in names:
            row: dict[str, Any] = {
                "model": name,
                "data": MODELS[name][3],
                "images": args.images,
                "stages": {},
            }
            for stage in STAGES:
                log(f"{name} {stage} ...")
                got = child(["--one", name, stage, *sizes, "--work", work], args.timeout)
                if "error" not in got:
                    got["mib"] = max(0.0, (got["peak_rss_kib"] - idle_kib) / 1024)
                    row["params"] = row.get("params") or got["details"].get("params")
                    log(f"{name} {stage}: {got['seconds']:.2f} s, {got['mib']:,.0f} MiB above idle")
                else:
                    log(f"{name} {stage}: FAILED ({got['error']})")
                row["stages"][stage] = got
            row["params"] = row.get("params") or 0
            rows.append(row)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    stem = "scaling_quick" if args.quick else "scaling"
    res = {
        "command": "python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": started_at,
        "machine": machine(),
        "cores": cores,
        "images": args.images,
        "verify_rows": args.verify_rows,
        "tflm_images": args.tflm_images,
        "idle_mib": idle_kib / 1024,
        "synthetic": "uniform [0, 1) images and random labels: timing and memory, not accuracy",
        "rows": rows,
        "plot": f"{stem}.png",
    }
    res["slopes"] = fit_slopes(rows)
    steady = fit_slopes(rows, "steady_s_per_1000", ("twin", "calibrate"))
    res["rate_slopes"] = {k: v for k, v in steady.items() if v is not None}
    res["search"] = base["search"]
    res["estimates"] = estimates(rows, base["search"])
    res["seconds"] = round(time.monotonic() - t_start, 1)
    res["beside"] = beside()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(out / f"{stem}.png", res)
    atomic_write_text(out / f"{stem}.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(out / f"{stem}.md", markdown(res))
    log(f"wrote {out / stem}.md, .json, .png")
    return 1 if any("error" in st for r in rows for st in r["stages"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
