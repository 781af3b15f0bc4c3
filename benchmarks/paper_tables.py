"""Benchmark: the papers' LeNet-5 / MNIST table (and the regression MLP's) measured on exported TFLM models.

    python benchmarks/paper_tables.py --data /work/shared/data/mnist.npz [--quick] [--out benchmarks/results]

Trains the float model and its Bayesian twin once (deploy.app.train_pipeline), then per method (float,
TF-MOT int8 QAT, uniform, QIU, QINU, RB, Bayesian Bits) allocates, fine-tunes with TF-MOT QAT, exports
through the same converter / slicing / storage path as `edgeq run`, and measures the exported .tflite
in the TFLM interpreter over the whole test split. Writes lenet5_mnist.{json,md,png} and
regression_mlp.{json,md} (`*_quick.*` with --quick: a few hundred training images, 1 epoch per stage,
500 test images).
"""

from __future__ import annotations

import os

# Two cores is the target machine: pin the thread pools before numpy and TensorFlow load.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ.setdefault(_var, "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import commit, machine  # noqa: E402  (benchmarks/ is on sys.path as the script dir)

import edgeq  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from deploy import measure, storage  # noqa: E402
from deploy.app import Candidate, RunOptions, make_candidate, train_pipeline  # noqa: E402
from deploy.export import ExportOptions, export  # noqa: E402
from deploy.export.limits import packing_limit  # noqa: E402
from edgeq.data import Splits, load_diabetes, load_npz  # noqa: E402
from edgeq.io import atomic_write_text  # noqa: E402
from edgeq.pipeline import PipelineSpec  # noqa: E402
from edgeq.plan import BitPlan, LayerBits  # noqa: E402
from edgeq.training import Trained, fine_tune, loss_and_metrics  # noqa: E402

# The papers' own LeNet-5 / MNIST figures (accuracy %, mean bits): QI/RB paper and Bayesian Bits.
PAPER = {
    "float": {"accuracy": 99.23, "mean_bits": 32.0},
    "qiu": {"accuracy": 99.05, "mean_bits": 3.17},
    "qinu": {"accuracy": 98.44, "mean_bits": 3.17},
    "rb": {"accuracy": 98.75, "mean_bits": 3.95},
    "bb": {"accuracy": 96.40, "mean_bits": 4.0},
}
LABELS = {
    "float": "float (Keras; TFLM runs the float .tflite)",
    "int8": "TF-MOT int8 QAT",
    "uniform": "uniform",
    "qiu": "QIU (Quantile Inform, uniform)",
    "qinu": "QINU (Quantile Inform, non-uniform)",
    "rb": "RB (Random Bits)",
    "bb": "BB (Bayesian Bits)",
}
MODULES = ("benchmarks", "edgeq", "deploy")
QAT_BITS = (2, 8)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Training budget and sizes of one benchmark run."""

    epochs: int
    bnn_epochs: int
    qat_epochs: int
    bb_epochs: int
    bb_lams: tuple[float, ...]
    pareto_targets: tuple[float, ...]
    n_train: int | None  # None: the whole training split
    n_test: int | None  # None: the whole test split
    n_pareto_test: int | None  # test images for the (calibrated-only) Pareto points
    n_calibrate: int  # training images for the 0-epoch calibration pass of Pareto points
    n_verify: int  # test images on which each storage variant is verified bit-exact (TFLM is slow)
    n_bb_train: int | None  # training images for each BB lambda fit (None: all)


# Full: 6 float, 3 BNN and 1 QAT epoch(s) fit the 2 shared cores' time box (the issue suggests 8 / 5 / 2).
FULL = Budget(6, 3, 1, 1, (0.05, 0.2, 1.0), (2, 4, 6, 8), None, None, 500, 1000, 1000, 15000)
QUICK = Budget(1, 1, 1, 1, (0.05, 5.0), (2,), 300, 500, 500, 300, 30, None)  # CI smoke: one Pareto target


class Stages:
    """One progress line per stage (rich), with the elapsed time."""

    def __init__(self, total: int):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.total, self.i, self.t0 = total, 0, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.i += 1
        self.console.print(
            f"[bold cyan][{self.i}/{self.total}][/] {what}  [dim]({time.perf_counter() - self.t0:.0f} s)[/]",
            highlight=False,
        )


def _subset(splits: Splits, n_train: int | None, n_test: int | None) -> Splits:
    """The first n_train training and n_test val/test examples (None keeps the whole split)."""
    nt = len(splits.x_train) if n_train is None else n_train
    ne = len(splits.x_test) if n_test is None else n_test
    return Splits(
        splits.x_train[:nt],
        splits.y_train[:nt],
        splits.x_val[:ne],
        splits.y_val[:ne],
        splits.x_test[:ne],
        splits.y_test[:ne],
        splits.task,
    )


def _keras_scores(model, splits: Splits) -> dict[str, float]:
    """Keras accuracy, or MAE and MSE, on the test split."""
    pred = model.predict(splits.x_test, verbose=0, batch_size=256)
    if splits.task == "regression":
        err = pred.reshape(-1) - splits.y_test.reshape(-1)
        return {"mae_keras": float(np.mean(np.abs(err))), "mse_keras": float(np.mean(err**2))}
    return {"accuracy_keras": float(np.mean(pred.argmax(1) == splits.y_test))}


def _mean_bits(bits: dict[str, int], sizes: dict[str, int]) -> float:
    """Paper eq. 8 over the quantized weight tensors."""
    return sum(bits[n] * sizes[n] for n in bits) / sum(sizes[n] for n in bits)


def _measure(model_bytes: bytes, splits: Splits) -> dict:
    """TFLM figures of one exported model over the whole (given) test split."""
    m = measure.measure_tflm(model_bytes, splits.x_test, splits.y_test, splits.task)
    return {
        **{f"{k}_tflm": v for k, v in m.scores.items()},
        "flash_bytes": m.flash_bytes,
        "arena_bytes": m.arena_bytes,
        "latency_tflm_us": m.latency_us,
    }


def _export(qat, trained: Trained, opts: RunOptions, n_verify: int) -> tuple[bytes, storage.Storage]:
    """The exporter path of deploy.app.make_candidate: convert, slice, choose storage, verify bit-exact."""
    s = _subset(trained.splits, None, n_verify)
    ex = export(qat, s.x_train, s.x_test, ExportOptions(opts.storage, opts.target.decode_budget))
    return ex.uncompressed, ex.deployed


def _row(
    method: str,
    target: float | None,
    model,
    bits: dict[str, int],
    sizes: dict[str, int],
    cand_model: bytes,
    storage: str,
    qat,
    trained: Trained,
    seconds: float,
    extra: dict | None = None,
) -> dict:
    """One table row: plan figures, Keras and TFLM scores, sizes, arena, latency."""
    from edgeq.bops import bops

    t0 = time.perf_counter()
    figs = _measure(cand_model, trained.splits)
    row = {
        "method": method,
        "target_bits": target,
        "bits": dict(bits),
        "mean_bits": round(_mean_bits(bits, sizes), 4),
        "bops": int(bops(model, bits, activation_bits=8)),
        **_keras_scores(qat, trained.splits),
        **{k: v for k, v in figs.items() if k.endswith("_tflm")},
        "latency_tflm_us": round(float(figs["latency_tflm_us"]), 1),
        "flash_bytes": int(figs["flash_bytes"]),
        "packing_limit_bytes": int(packing_limit(model, bits)),
        "arena_bytes": int(figs["arena_bytes"]),
        "storage": storage,
        "method_seconds": round(seconds, 1),
        "measure_seconds": round(time.perf_counter() - t0, 1),
        "test_images": int(len(trained.splits.x_test)),
    }
    row.update(extra or {})
    return row


def float_row(trained: Trained) -> dict:
    """The float model: Keras accuracy, and the float .tflite (converter without optimizations) in TFLM."""
    import tensorflow as tf

    from edgeq.bops import bops

    t0 = time.perf_counter()
    conv = tf.lite.TFLiteConverter.from_keras_model(trained.float_model)
    tfl = conv.convert()
    secs = time.perf_counter() - t0
    bits = {n: 32 for n in trained.sizes}
    row = _row(
        "float",
        None,
        trained.float_model,
        bits,
        trained.sizes,
        tfl,
        "float32",
        trained.float_model,
        trained,
        secs,
    )
    row["bops"] = int(bops(trained.float_model, bits, activation_bits=32))  # float activations too
    return row


def candidate_row(
    trained: Trained,
    spec: PipelineSpec,
    opts: RunOptions,
    method: str,
    target: float,
    n_verify: int,
) -> dict:
    """One edgeq method (uniform/qiu/qinu/rb) at one target, through deploy.app.make_candidate."""
    t0 = time.perf_counter()
    # make_candidate verifies the storage variants on its test split: a subset; scores use the whole split.
    verify = dataclasses.replace(trained, splits=_subset(trained.splits, None, n_verify))
    cand: Candidate = make_candidate(verify, spec, opts, method, target, spec.qat_epochs)
    secs = time.perf_counter() - t0
    return _row(
        method,
        target,
        trained.float_model,
        cand.plan.bits,
        trained.sizes,
        cand.exported.deployed.model,
        cand.exported.deployed.kind,
        cand.qat,
        trained,
        secs,
    )


def int8_row(trained: Trained, spec: PipelineSpec, opts: RunOptions, n_verify: int) -> dict:
    """TF-MOT int8 QAT from the float model: quantize_model with every layer at 8 bits, same exporter."""
    from edgeq.optimize import quantize_model

    t0 = time.perf_counter()
    # A plain 8-bit plan (no edgeq projection): the baseline is TF-MOT's own int8 QAT.
    plan = BitPlan({n: LayerBits(8) for n in trained.sizes}, method="int8")
    qat = quantize_model(trained.float_model, plan)
    fine_tune(qat, trained.splits, spec, spec.qat_epochs)
    _, chosen = _export(qat, trained, opts, n_verify)
    secs = time.perf_counter() - t0
    return _row(
        "int8",
        8.0,
        trained.float_model,
        plan.bits,
        trained.sizes,
        chosen.model,
        chosen.kind,
        qat,
        trained,
        secs,
    )


def train_bb(trained: Trained, lam: float, epochs: int, lr: float, batch_size: int, n_train: int | None):
    """Bayesian Bits from the float model at one lambda, fine-tuned for a few epochs; (bb model, seconds)."""
    import tf_keras as keras

    from edgeq.bayesian_bits import to_bayesian_bits

    t0 = time.perf_counter()
    keras.utils.set_random_seed(0)
    bb = to_bayesian_bits(trained.float_model, lam=lam)
    bb.compile(keras.optimizers.Adam(lr), *loss_and_metrics(trained.splits.task))
    s = _subset(trained.splits, n_train, None)
    bb.fit(s.x_train, s.y_train, epochs=epochs, batch_size=batch_size, verbose=0)
    return bb, time.perf_counter() - t0


def bb_exportable(bb, trained: Trained) -> tuple[object, BitPlan, dict]:
    """BB's plan made exportable: bits clipped into 2..8, pruned channels dropped (prune_channels)."""
    from edgeq.bayesian_bits import bayesian_bits_plan, strip_bayesian_bits
    from edgeq.optimize import weight_layers
    from edgeq.prune import ChannelPlan, prune_channels

    raw = bayesian_bits_plan(bb)
    stripped = strip_bayesian_bits(bb, trained.float_model)
    names = list(trained.sizes)
    keep, unused = {}, {}
    for name, lb in raw.layers.items():
        pruned = set(lb.pruned_channels)
        channels = int(stripped.get_layer(name).get_weights()[0].shape[-1])
        if not pruned:
            continue
        # The output layer's channels are the model's outputs, and a layer needs one channel left.
        if name == names[-1] or len(pruned) >= channels:
            unused[name] = len(pruned)
            continue
        keep[name] = np.array([c for c in range(channels) if c not in pruned])
    small = prune_channels(stripped, ChannelPlan(keep)) if keep else stripped
    sizes = weight_layers(small)
    clipped = {n: int(min(max(lb.bits, QAT_BITS[0]), QAT_BITS[1])) for n, lb in raw.layers.items()}
    plan = BitPlan(
        {n: LayerBits(b) for n, b in clipped.items()}, method="bb", meta={"lam": raw.meta.get("lam")}
    )
    info = {
        "lam": raw.meta.get("lam"),
        "bb_bits": raw.bits,
        "bb_mean_bits_unclipped": round(_mean_bits(raw.bits, trained.sizes), 4),
        "pruned_channels_dropped": {n: int(len(raw.layers[n].pruned_channels)) for n in keep},
        "pruned_channels_unused": unused,
        "weights_after_pruning": int(sum(sizes.values())),
        "weights_before_pruning": int(sum(trained.sizes.values())),
    }
    return small, plan, info


def bb_row(
    trained: Trained,
    spec: PipelineSpec,
    opts: RunOptions,
    bb,
    bb_seconds: float,
    qat_epochs: int,
    n_verify: int,
    target: float | None,
) -> dict:
    """A trained BB model through clipping, channel pruning, brief QAT and the common exporter."""
    from edgeq.optimize import quantize_model, weight_layers

    t0 = time.perf_counter()
    small, plan, info = bb_exportable(bb, trained)
    qat = quantize_model(small, plan)
    fine_tune(qat, trained.splits, spec, qat_epochs)
    _, chosen = _export(qat, trained, opts, n_verify)
    secs = bb_seconds + time.perf_counter() - t0
    return _row(
        "bb",
        target,
        small,
        plan.bits,
        weight_layers(small),
        chosen.model,
        chosen.kind,
        qat,
        trained,
        secs,
        info,
    )


def bb_search(
    trained: Trained, spec: PipelineSpec, budget: Budget
) -> list[tuple[float, object, float, float]]:
    """Short BB fits over the lambdas: [(lam, bb model, clipped mean bits, seconds)]."""
    from edgeq.bayesian_bits import bayesian_bits_plan

    out = []
    for lam in budget.bb_lams:
        bb, secs = train_bb(
            trained, lam, budget.bb_epochs, spec.qat_lr * 10, spec.batch_size, budget.n_bb_train
        )
        bits = {n: min(max(b, QAT_BITS[0]), QAT_BITS[1]) for n, b in bayesian_bits_plan(bb).bits.items()}
        out.append((lam, bb, _mean_bits(bits, trained.sizes), secs))
    return out


def _closest(search: list, target: float):
    """The search entry whose clipped mean bits lies nearest the target (ties: fewer bits)."""
    return min(search, key=lambda e: (abs(e[2] - target), e[2]))


def table(
    trained: Trained,
    spec: PipelineSpec,
    opts: RunOptions,
    budget: Budget,
    targets: tuple[float, ...],
    stage,
    search: list,
) -> list[dict]:
    """Every method's row: float, int8 QAT, then uniform/QIU/QINU/RB/BB at each target."""
    stage("float model: float .tflite in TFLM")
    rows = [float_row(trained)]
    stage("TF-MOT int8 QAT (all layers 8 bits)")
    rows.append(int8_row(trained, spec, opts, budget.n_verify))
    for target in targets:
        for method in ("uniform", "qiu", "qinu", "rb"):
            if method == "uniform" and target == 8.0:
                continue  # 8 bits everywhere is the int8 row
            stage(f"{method} at target {target:g} mean bits: allocate, QAT, export, TFLM")
            rows.append(candidate_row(trained, spec, opts, method, target, budget.n_verify))
        lam, bb, _, secs = _closest(search, target)
        stage(f"BB at lambda {lam:g} (closest to {target:g} mean bits): clip, prune, QAT, export, TFLM")
        rows.append(bb_row(trained, spec, opts, bb, secs, spec.qat_epochs, budget.n_verify, target))
    return rows


def add_latency(rows: list[dict]) -> None:
    """latency_rel_int8 for every row (TFLM median invoke time over the int8 row's)."""
    base = next(r for r in rows if r["method"] == "int8")["latency_tflm_us"]
    for r in rows:
        r["latency_rel_int8"] = round(r["latency_tflm_us"] / base, 3)


def pareto(
    trained: Trained, spec: PipelineSpec, opts: RunOptions, budget: Budget, stage, search: list
) -> list:
    """Calibrated-only (0 QAT epochs) points over targets for QIU and RB, and BB over the lambdas."""
    small = _subset(trained.splits, budget.n_calibrate, budget.n_pareto_test)
    t = dataclasses.replace(trained, splits=small)
    pts = []
    for method in ("qiu", "rb"):
        stage(
            f"Pareto: {method} at targets {', '.join(f'{x:g}' for x in budget.pareto_targets)} (calibrated)"
        )
        for target in budget.pareto_targets:
            cand = make_candidate(t, spec, opts, method, target, 0)
            figs = _measure(cand.exported.deployed.model, small)
            pts.append(
                {
                    "method": method,
                    "target": target,
                    "mean_bits": cand.plan.mean_bits(t.sizes),
                    "flash_bytes": figs["flash_bytes"],
                    "accuracy_tflm": figs["accuracy_tflm"],
                }
            )
    stage(f"Pareto: BB at lambdas {', '.join(f'{e[0]:g}' for e in search)} (calibrated)")
    from edgeq.optimize import quantize_model, weight_layers

    for lam, bb, _, _ in search:
        net, plan, _ = bb_exportable(bb, t)
        qat = quantize_model(net, plan)
        fine_tune(qat, t.splits, spec, 0)
        _, chosen = _export(qat, t, opts, budget.n_verify)
        figs = _measure(chosen.model, small)
        pts.append(
            {
                "method": "bb",
                "lam": lam,
                "mean_bits": _mean_bits(plan.bits, weight_layers(net)),
                "flash_bytes": figs["flash_bytes"],
                "accuracy_tflm": figs["accuracy_tflm"],
            }
        )
    return pts


def plot(path: Path, pts: list[dict], rows: list[dict], n_test: int) -> None:
    """TFLM accuracy vs flash bytes: calibrated QIU/RB over targets, BB over lambdas, table rows ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, marker in (("qiu", "o"), ("rb", "^"), ("bb", "s")):
        p = sorted((q for q in pts if q["method"] == method), key=lambda q: q["flash_bytes"])
        if not p:
            continue
        ax.plot(
            [q["flash_bytes"] for q in p],
            [100 * q["accuracy_tflm"] for q in p],
            marker=marker,
            label=f"{method} (calibrated, {n_test} test images)",
            alpha=0.8,
        )
        for q in p:
            tag = f"λ={q['lam']:g}" if method == "bb" else f"{q['target']:g}"
            ax.annotate(
                tag,
                (q["flash_bytes"], 100 * q["accuracy_tflm"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
    for r in rows:
        if r["method"] in ("qiu", "rb", "bb", "int8") and "accuracy_tflm" in r:
            ax.scatter(
                [r["flash_bytes"]], [100 * r["accuracy_tflm"]], s=90, facecolors="none", edgecolors="black"
            )
            ax.annotate(
                f"{r['method']} QAT",
                (r["flash_bytes"], 100 * r["accuracy_tflm"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, -10),
            )
    ax.set_xscale("log")
    ax.set_xlabel("flash bytes (exported .tflite)")
    ax.set_ylabel("TFLM accuracy (%)")
    ax.set_title("LeNet-5 / MNIST: accuracy vs flash (rings: table rows after QAT, whole test split)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _fmt(v, spec: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec) if spec else str(v)


def markdown(result: dict, task: str) -> str:
    """The table as Markdown, edgeq's measurements beside the papers' figures."""
    title = (
        "LeNet-5 on MNIST"
        if task == "classification"
        else "Regression MLP (512-256-64) on scikit-learn diabetes"
    )
    n = result["rows"][0]["test_images"]
    lines = [
        f"# {title}: paper table, measured on exported TFLM models",
        "",
        f"Command: `{result['command']}`  ",
        f"Commit: {result['commit']}; machine: {result['machine']['cpu']}, "
        f"{result['machine']['nproc']} cores, "
        f"{result['machine']['platform']}; wall time {result['wall_seconds']:.0f} s.",
        "",
        "Every edgeq score is measured on the exported .tflite in the TFLM interpreter over "
        + (
            f"the first {n:,} test images (quick run); "
            if result["quick"]
            else f"the whole {n:,}-image test split; "
        )
        + "every size is real flash bytes (length of the .tflite the firmware embeds). "
        f"Budget: {result['budget']}.",
        "",
    ]
    if task == "classification":
        lines += [
            "| method | target | mean bits | BOPs | Keras acc % | TFLM acc % | flash B | packing limit B "
            "| arena B | latency / int8 | method s | paper acc % | paper mean bits |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines += [
            "| method | target | mean bits | BOPs | Keras MAE | Keras MSE | TFLM MAE | TFLM MSE | flash B "
            "| packing limit B | arena B | latency / int8 | method s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in result["rows"]:
        head = (
            f"| {LABELS.get(r['method'], r['method'])} | {_fmt(r['target_bits'], 'g')} "
            f"| {r['mean_bits']:.2f} | {r['bops']:,} "
        )
        tail = (
            f"| {r['flash_bytes']:,} | {r['packing_limit_bytes']:,} | {r['arena_bytes']:,} "
            f"| {r['latency_rel_int8']:.2f} | {r['method_seconds']:.0f} "
        )
        if task == "classification":
            paper = result["paper"].get(r["method"], {})
            lines.append(
                head
                + f"| {100 * r['accuracy_keras']:.2f} | {100 * r['accuracy_tflm']:.2f} "
                + tail
                + f"| {_fmt(paper.get('accuracy'), '.2f')} | {_fmt(paper.get('mean_bits'), '.2f')} |"
            )
        else:
            lines.append(
                head + f"| {r['mae_keras']:.4f} | {r['mse_keras']:.4f} | {r['mae_tflm']:.4f} "
                f"| {r['mse_tflm']:.4f} " + tail + "|"
            )
    bb = [r for r in result["rows"] if r["method"] == "bb"]
    lines += [
        "",
        "Notes:",
        "- mean bits: paper eq. 8 over the quantized weight tensors of the exported model; "
        "BOPs: MACs x weight "
        "bits x 8 activation bits (float: 32 x 32); packing limit: sum ceil(|l| b / 8) + int32 biases.",
        "- arena: TFLM recording allocator total (decompressed/unpacked weights included); latency: median "
        "TFLM invoke over the int8 row's, a host ratio, not an MCU time.",
        "- method s: allocation + QAT + export (BB: its lambda fit too); measurement not included.",
        "- Weights are stored as `edgeq run --storage auto` does (smaller of INT4 and TFLM LUT, sliced to a "
        "16 KiB decode budget), each verified bit-exact in TFLM against the unsliced converted model "
        f"on the first {result['verified_on_test_images']:,} test images.",
    ]
    for r in bb:
        lines.append(
            f"- BB (lambda {r['lam']:g}): learned bits {r['bb_bits']} "
            f"(mean {r['bb_mean_bits_unclipped']:.2f} "
            f"before clipping into 2..8); pruned channels dropped {r['pruned_channels_dropped']}, "
            f"left in place {r['pruned_channels_unused']}; {r['weights_after_pruning']:,} of "
            f"{r['weights_before_pruning']:,} weights kept. Lambda search: {result.get('bb_search')}."
        )
    if task == "classification":
        lines += [
            "- Paper figures: QIU/QINU/RB and float from the Quantile Inform / Random Bits paper, BB from "
            "van Baalen et al. 2020, as quoted in issue #6 (their training budgets are far longer).",
            "",
            f"![TFLM accuracy vs flash]({result['plot']})",
            "",
            "The plot's curves are calibrated-only points (0 QAT epochs) over targets "
            f"{result['pareto_targets']} for QIU and RB, and BB over the lambdas, each scored in TFLM on "
            f"the first {result['pareto_test_images']:,} test images; "
            "ringed points are the table's QAT rows.",
        ]
    return "\n".join(lines) + "\n"


def run_task(
    name: str,
    spec: PipelineSpec,
    data: str | None,
    budget: Budget,
    targets: tuple[float, ...],
    out: Path,
    quick: bool,
    command: str,
    do_pareto: bool,
) -> dict:
    """Train once, build every row (and the Pareto points), write name.{json,md[,png]}."""
    t0 = time.perf_counter()
    opts = RunOptions(out=out, data=data)
    n_stages = 3 + 5 * len(targets) - (8.0 in targets) + (3 if do_pareto else 0) + 1
    stage = Stages(n_stages)
    trained = train_pipeline(spec, opts, lambda name, text: print(f"[{name}] {text}", flush=True))
    trained = dataclasses.replace(trained, splits=_subset(trained.splits, budget.n_train, budget.n_test))
    stage(f"BB lambda search {budget.bb_lams} ({budget.bb_epochs} epoch each)")
    search = bb_search(trained, spec, budget)
    rows = table(trained, spec, opts, budget, targets, stage, search)
    add_latency(rows)
    suffix = "_quick" if quick else ""
    bb_images = min(budget.n_bb_train or 10**9, len(trained.splits.x_train))
    result = {
        "rows": rows,
        "paper": PAPER if spec.name == "lenet5_mnist" else {},
        "bb_search": [
            {"lam": lam, "clipped_mean_bits": round(mb, 3), "seconds": round(s, 1)}
            for lam, _, mb, s in search
        ],
        "budget": f"float {spec.epochs} epochs, BNN {spec.bnn_epochs}, QAT {spec.qat_epochs} per method, "
        f"BB {budget.bb_epochs} per lambda on {bb_images:,} images, batch {spec.batch_size}, "
        f"{len(trained.splits.x_train):,} training images",
        "quick": quick,
        "verified_on_test_images": min(budget.n_verify, len(trained.splits.x_test)),
        "bb_train_images": bb_images,
        "command": command,
        "commit": commit(),
        "machine": machine(),
    }
    if do_pareto:
        pts = pareto(trained, spec, opts, budget, stage, search)
        result.update(
            pareto=pts,
            pareto_targets=list(budget.pareto_targets),
            pareto_test_images=min(budget.n_pareto_test or 10**9, len(trained.splits.x_test)),
            plot=f"{name}{suffix}.png",
        )
        plot(out / f"{name}{suffix}.png", pts, rows, result["pareto_test_images"])
    stage(f"writing {out / name}{suffix}.json and .md")
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / f"{name}{suffix}.json", json.dumps(result, indent=2, default=_json_default))
    atomic_write_text(out / f"{name}{suffix}.md", markdown(result, trained.splits.task))
    return result


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def lenet_spec(budget: Budget, quick: bool) -> PipelineSpec:
    """LeNet-5 on a keras-layout MNIST .npz."""
    from edgeq.models import lenet5

    def load(seed: int = 0, data: str | None = None) -> Splits:
        s = load_npz(data, seed=seed)
        return _subset(s, budget.n_train, budget.n_test) if quick else s

    return PipelineSpec(
        name="lenet5_mnist",
        build_model=lenet5,
        load_data=load,
        epochs=budget.epochs,
        bnn_epochs=budget.bnn_epochs,
        qat_epochs=budget.qat_epochs,
        batch_size=128,
    )


def mlp_spec(quick: bool) -> PipelineSpec:
    """The paper's regression MLP on scikit-learn's bundled diabetes data (no download)."""
    from edgeq.models import mlp

    def load(seed: int = 0, data: str | None = None) -> Splits:
        return load_diabetes(seed)

    e = (1, 1, 1) if quick else (60, 30, 10)
    return PipelineSpec(
        name="regression_mlp",
        build_model=mlp,
        load_data=load,
        epochs=e[0],
        bnn_epochs=e[1],
        qat_epochs=e[2],
        batch_size=32,
    )


def main(argv: list[str] | None = None) -> int:
    """Build the LeNet-5 / MNIST table and the regression MLP's, and write them under --out."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="MNIST .npz in the keras layout (x_train, y_train, x_test, y_test)")
    ap.add_argument("--quick", action="store_true", help="a few hundred images, 1 epoch each (CI smoke run)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tables", choices=("both", "lenet", "regression"), default="both")
    args = ap.parse_args(argv)
    if args.tables != "regression" and not args.data:
        ap.error("--data FILE.npz (MNIST in the keras layout) is needed for the LeNet-5 table")
    budget = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/paper_tables.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    if args.tables in ("both", "lenet"):
        res = run_task(
            "lenet5_mnist",
            lenet_spec(budget, args.quick),
            args.data,
            budget,
            (4.0,),
            args.out,
            args.quick,
            command,
            do_pareto=True,
        )
        qiu = next(r for r in res["rows"] if r["method"] == "qiu")
        print(
            f"QIU: {100 * qiu['accuracy_tflm']:.2f}% TFLM accuracy at {qiu['mean_bits']:.2f} mean bits, "
            f"{qiu['flash_bytes']:,} flash bytes"
        )
    if args.tables in ("both", "regression"):
        # The MLP is small: longer BB fits, lambdas on the scale its gates need.
        reg_budget = dataclasses.replace(
            budget, n_train=None, n_test=None, bb_epochs=budget.bb_epochs * 5, bb_lams=(0.01, 0.1, 1.0)
        )
        run_task(
            "regression_mlp",
            mlp_spec(args.quick),
            None,
            reg_budget,
            (6.0, 8.0),
            args.out,
            args.quick,
            command,
            do_pareto=False,
        )
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
