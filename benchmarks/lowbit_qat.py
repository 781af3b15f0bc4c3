"""Benchmark: 2-4 bit uniform QAT on digits in TFLM: plain TF-MOT vs edgeq before and after interval ranges.

    python benchmarks/lowbit_qat.py [--seeds 0,1,2] [--bits 2,3,4]

Per seed: the digits pipeline's float model and Bayesian twin (edgeq.training.train, as `edgeq run` trains
them), then per bit width, every row QAT'd with the pipeline's epochs, learning rate and batch, converted
with deploy.export.convert and scored on the 270 test digits in the TFLM interpreter (one image = 0.37
points). Rows:

- int8 PTQ: the converter's post-training quantization of the float model (no QAT).
- TF-MOT: the float model annotated with a QuantizeConfig of TF-MOT's own LastValueQuantizer(b bits,
  symmetric, narrow range; per-axis for Conv2D, per-tensor for Dense) and MovingAverageQuantizer(8 bits)
  activations; no edgeq code in the quantization path.
- edgeq P5-P95 (fa5db30): the twin's means projected onto the plan's [P5, P95] grid, then
  quantize_model with LastValueQuantizer (what make_candidate did).
- edgeq interval, from twin / from float: edgeq.optimize.prepare_qat(start=...): ranges minimising
  sum((Q(w) - w)^2 / sigma^2) per output channel (Conv2D) or per tensor (Dense), fixed through QAT.

Writes benchmarks/results/lowbit_qat.md and .json (flash = .tflite bytes; storage = the weight tensors'
stored types and the most distinct values in any channel).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arglists import ints  # noqa: E402
from provenance import commit, machine  # noqa: E402  (benchmarks/ is on sys.path as the script dir)

import edgeq  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from deploy.export import convert  # noqa: E402
from deploy.flatbuffer import weight_tensors  # noqa: E402
from deploy.measure.tflm import run_tflm  # noqa: E402
from edgeq.io import atomic_write_text  # noqa: E402

ROWS = (
    "int8 PTQ",
    "TF-MOT LastValue",
    "edgeq P5-P95 (fa5db30)",
    "edgeq interval, twin",
    "edgeq interval, float",
)


def tfmot_qat(model, bits: int):
    """Plain TF-MOT QAT model: LastValueQuantizer kernels (Conv2D per-axis), MovingAverage activations."""
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    qk = tfmot.quantization.keras

    class Config(qk.QuantizeConfig):
        def __init__(self, per_axis: bool):
            self.per_axis = per_axis

        def get_weights_and_quantizers(self, layer):
            q = qk.quantizers.LastValueQuantizer(
                num_bits=bits, per_axis=self.per_axis, symmetric=True, narrow_range=True
            )
            return [(layer.kernel, q)]

        def get_activations_and_quantizers(self, layer):
            q = qk.quantizers.MovingAverageQuantizer(
                num_bits=8, per_axis=False, symmetric=False, narrow_range=False
            )
            return [(layer.activation, q)]

        def set_quantize_weights(self, layer, quantize_weights):
            layer.kernel = quantize_weights[0]

        def set_quantize_activations(self, layer, quantize_activations):
            layer.activation = quantize_activations[0]

        def get_output_quantizers(self, layer):
            return []

        def get_config(self):
            return {"per_axis": self.per_axis}

    def annotate(layer):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            return qk.quantize_annotate_layer(layer, Config(isinstance(layer, keras.layers.Conv2D)))
        return layer

    annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    with qk.quantize_scope({"Config": Config}):
        return qk.quantize_apply(annotated)


def qat_fit(qat, splits, spec, seed: int) -> None:
    """The pipeline's QAT: Adam(qat_lr), qat_epochs, batch_size; the same for every row, seeded."""
    import tf_keras as keras

    from edgeq.training import loss_and_metrics

    keras.utils.set_random_seed(seed)
    loss, metrics = loss_and_metrics(splits.task)
    qat.compile(keras.optimizers.Adam(spec.qat_lr), loss, metrics)
    qat.fit(splits.x_train, splits.y_train, epochs=spec.qat_epochs, batch_size=spec.batch_size, verbose=0)


def score(model_bytes: bytes, splits) -> dict:
    """TFLM accuracy (percent) on the test split, flash bytes, and how the weights are stored."""
    pred = run_tflm(model_bytes, splits.x_test).argmax(1)
    tensors = weight_tensors(model_bytes)
    return {
        "tflm_accuracy": round(100.0 * float(np.mean(pred == splits.y_test)), 2),
        "flash_bytes": len(model_bytes),
        "stored_types": sorted({t.stored_type for t in tensors}),
        "max_distinct": max(t.distinct for t in tensors),
    }


def build(row: str, trained, bits: int):
    """The QAT model of one row at `bits` (every planned layer uniform at `bits`)."""
    from edgeq.allocate import uniform_plan
    from edgeq.optimize import prepare_qat, project_weights, quantize_model

    if row == ROWS[1]:
        return tfmot_qat(trained.float_model, bits)
    plan = uniform_plan(list(trained.posteriors), bits)
    if row == ROWS[2]:
        return quantize_model(project_weights(trained.det, plan), plan)
    start = "twin" if row == ROWS[3] else "float"
    return prepare_qat(trained.det, trained.float_model, plan, trained.posteriors, start=start)


def run_seed(seed: int, bits_list: list[int], spec) -> list[dict]:
    """Every row of one seed."""
    from edgeq.training import train

    splits = spec.load_data(seed=seed)
    t0 = time.perf_counter()
    trained = train(spec, splits, seed)
    int8 = score(convert(trained.float_model, splits.x_train), splits)
    rows = [{"row": ROWS[0], "seed": seed, "bits": 8, **int8}]
    print(
        f"seed {seed}: trained in {time.perf_counter() - t0:.0f} s; int8 {int8['tflm_accuracy']}", flush=True
    )
    for bits in bits_list:
        for row in ROWS[1:]:
            qat = build(row, trained, bits)
            qat_fit(qat, splits, spec, seed)
            r = {"row": row, "seed": seed, "bits": bits, **score(convert(qat, splits.x_train), splits)}
            rows.append(r)
            print(
                f"  {bits} bits {row:24s} TFLM {r['tflm_accuracy']:6.2f}  flash {r['flash_bytes']}",
                flush=True,
            )
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean/min/max TFLM accuracy and flash per (row, bits) over seeds."""
    out = []
    for bits in sorted({r["bits"] for r in rows}):
        for name in ROWS:
            sel = [r for r in rows if r["row"] == name and r["bits"] == bits]
            if not sel:
                continue
            acc = [r["tflm_accuracy"] for r in sel]
            out.append(
                {
                    "row": name,
                    "bits": bits,
                    "seeds": [r["seed"] for r in sel],
                    "tflm_mean": round(statistics.fmean(acc), 2),
                    "tflm_min": min(acc),
                    "tflm_max": max(acc),
                    "flash_bytes": sorted({r["flash_bytes"] for r in sel}),
                    "stored_types": sorted({t for r in sel for t in r["stored_types"]}),
                    "max_distinct": max(r["max_distinct"] for r in sel),
                }
            )
    return out


def markdown(result: dict) -> str:
    """The results file."""
    lines = [
        "# Low-bit uniform QAT on digits: TF-MOT vs edgeq (issue #19)",
        "",
        f"Command: `{result['command']}`  ",
        f"Commit: {result['commit']}; machine: {result['machine']['cpu']}, "
        f"{result['machine']['nproc']} cores; {result['seconds']:.0f} s.",
        "",
        "Digits pipeline (pipelines/digits.py): float 30 epochs, twin 20, QAT "
        f"{result['qat']['epochs']} epochs at lr {result['qat']['lr']}, batch {result['qat']['batch']}. "
        "TFLM accuracy on the 270 test digits (one image = 0.37 points), over seeds "
        f"{', '.join(map(str, result['seeds']))}. Flash = .tflite bytes; storage = stored weight types and "
        "the most distinct values in any channel (per-tensor for the former Dense layers). The TF-MOT rows "
        "keep Dense as FULLY_CONNECTED; edgeq's run Dense as 1x1 CONV_2D (edgeq.optimize.dense_as_conv), "
        "so their flash bytes differ for that reason too.",
        "",
        "| bits | row | TFLM mean | min | max | flash bytes | storage |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for s in result["summary"]:
        flash = " / ".join(f"{b:,}" for b in s["flash_bytes"])
        storage = f"{'+'.join(s['stored_types'])}, <= {s['max_distinct']} values"
        lines.append(
            f"| {s['bits']} | {s['row']} | {s['tflm_mean']:.2f} | {s['tflm_min']:.2f} | {s['tflm_max']:.2f} "
            f"| {flash} | {storage} |"
        )
    lines += ["", "Per seed:", "", "| bits | row | seed | TFLM | flash |", "|---:|---|---:|---:|---:|"]
    for r in result["rows"]:
        acc, flash = r["tflm_accuracy"], r["flash_bytes"]
        lines.append(f"| {r['bits']} | {r['row']} | {r['seed']} | {acc:.2f} | {flash:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write benchmarks/results/lowbit_qat.{md,json}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=ints, default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument(
        "--bits", type=ints, default="2,3,4", help="comma-separated weight bit widths (default 2,3,4)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    args = ap.parse_args(argv)
    from edgeq.pipeline import load_pipeline

    spec = load_pipeline(ROOT / "pipelines" / "digits.py")
    seeds, bits_list = args.seeds, args.bits
    t0 = time.perf_counter()
    rows = [r for seed in seeds for r in run_seed(seed, bits_list, spec)]
    given = argv if argv is not None else sys.argv[1:]
    result = {
        "command": " ".join(["python benchmarks/lowbit_qat.py", *given]),
        "commit": commit(),
        "machine": machine(),
        "seeds": seeds,
        "bits": bits_list,
        "qat": {"epochs": spec.qat_epochs, "lr": spec.qat_lr, "batch": spec.batch_size},
        "seconds": round(time.perf_counter() - t0, 1),
        "summary": summarise(rows),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "lowbit_qat.json", json.dumps(result, indent=2))
    atomic_write_text(args.out / "lowbit_qat.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
