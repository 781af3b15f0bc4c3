"""Benchmark: deploy.storage.cost's predicted flash and arena against the real exporter's files (#19).

    python benchmarks/cost_model.py [--models digits,lenet5,resnet8] [--plans 12]

Per model: the float model trained 1 epoch (digits: its data; LeNet-5 28x28x1 and ResNet-8 32x32x3 on
random data, which is enough for bytes), one reference conversion at 8 bits (as deploy.planning builds
it: quantize_model + convert, Dense as FULLY_CONNECTED) read by shapes_from_tflite, then per plan
(uniform 8/4/3/2/5 bits, then random per-layer bits 2..8, seeded) prepare_qat + 1 QAT epoch + export
with --storage auto (16 KiB decode budget), which builds and verifies the int4, the lut and an int4+lut
file (LUT on a seeded random part of the layers <= 7 bits, INT4/INT8 on the rest).
Each file is compared with three predictions:

- realised: LUT strides and tables from the converter's integers (isolates the byte model);
- planned: LUT strides and tables estimated before QAT from the start weights on the QAT grids (what
  deploy.planning sees);
- default: no weights at all (every unit assumed to hold the whole grid).

Arena: TFLM's figure (deploy.measure.tflm.arena_bytes). Writes benchmarks/results/cost_model.md, .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import commit, machine  # noqa: E402  (benchmarks/ is on sys.path as the script dir)

import edgeq  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from edgeq.io import atomic_write_text  # noqa: E402

TARGETS = {"flash": "within 1% or 64 B of the file", "arena": "within 2% of TFLM's figure"}


def _data(name: str, rng: np.random.Generator):
    from edgeq import models

    if name == "digits":
        from edgeq.data import load_digits

        s = load_digits(0)
        return s.x_train, s.y_train, models.digits_cnn(s.input_shape, 10)
    if name == "lenet5":
        return rng.random((600, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, 600), models.lenet5()
    if name == "resnet8":
        return rng.random((300, 32, 32, 3), dtype=np.float32), rng.integers(0, 10, 300), models.resnet8()
    raise SystemExit(f"unknown model {name!r}; use digits, lenet5, resnet8")


def _planned_distinct(model, shapes, bits: dict[str, int]) -> dict:
    """deploy.planning's pre-QAT estimate of the LUT tables (no twin here: unweighted interval ranges)."""
    from deploy.planning import integers, start_kernels, stored_layout
    from deploy.storage.cost import slice_distinct
    from edgeq.layers import QUANTIZABLE
    from edgeq.optimize import interval_ranges
    from edgeq.plan import BitPlan

    ranges = interval_ranges(model, BitPlan.from_bits(bits), ())
    kernels = start_kernels(model)
    out = {}
    for name, b in bits.items():
        kernel, _ = kernels[name]
        r = np.atleast_1d(ranges[name])
        scale = np.where(r > 0, r, 1.0) / (2 ** (b - 1) - 1)
        q = integers(kernel, scale if QUANTIZABLE[type(model.get_layer(name))] else scale[0], b)
        out[name] = slice_distinct(shapes.layer(name), stored_layout(q, shapes.layer(name).op))
    return out


def _realised_distinct(shapes, converted: bytes) -> dict:
    from deploy.export.slicing import layer_name
    from deploy.flatbuffer import read, tensor_values, weight_inputs
    from deploy.storage.cost import slice_distinct

    return {
        layer_name(str(t.name)): slice_distinct(shapes.layer(layer_name(str(t.name))), tensor_values(t))
        for t, _ in weight_inputs(read(converted))
    }


def bench(name: str, n_plans: int) -> dict:
    """Every plan of one model: the files' bytes and the three predictions."""
    import tf_keras as keras

    from deploy.export import ExportOptions, convert, export
    from deploy.measure.tflm import arena_bytes
    from deploy.planning import lut_ops
    from deploy.storage.cost import predict_storage, shapes_from_tflite
    from edgeq.layers import weight_layers
    from edgeq.optimize import prepare_qat, quantize_model
    from edgeq.plan import BitPlan

    rng = np.random.default_rng(0)
    x, y, model = _data(name, rng)
    keras.utils.set_random_seed(0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(1e-3), loss)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    names = list(weight_layers(model))
    t0 = time.perf_counter()
    reference = convert(
        quantize_model(model, BitPlan.from_bits({n: 8 for n in names}), keep_dense=True), x, samples=8
    )
    shapes = shapes_from_tflite(reference)
    shapes_s = time.perf_counter() - t0
    plans = [{n: b for n in names} for b in (8, 4, 3, 2, 5)]
    while len(plans) < n_plans:
        plans.append({n: int(rng.integers(2, 9)) for n in names})
    rows = []
    pick = np.random.default_rng(1)  # the int4+lut layers: apart from rng, so the plans stay as they were
    for bits in plans[:n_plans]:
        qat = prepare_qat(model, model, BitPlan.from_bits(bits), (), keep_dense=True)
        qat.compile(keras.optimizers.Adam(1e-4), loss)
        qat.fit(x, y, epochs=1, batch_size=32, verbose=0)
        lut = _mixed_layers(bits, pick)
        # auto with the LUT layers named builds int4, lut and int4+lut (those layers LUT, the rest INT4)
        ex = export(qat, x, x[:3], ExportOptions("auto", lut_ops=tuple(lut_ops(shapes, lut))))
        estimates = {
            "realised": _realised_distinct(shapes, ex.uncompressed),
            "planned": _planned_distinct(model, shapes, bits),
            "default": None,
        }
        for v in ex.variants:
            real = {"flash": len(v.model), "arena": arena_bytes(v.model)}
            row = {"bits": bits, "storage": v.kind, "deployed": v.kind == ex.deployed.kind, **real}
            for label, distinct in estimates.items():
                p = predict_storage(shapes, bits, v.kind, distinct, lut_layers=lut)
                row[label] = {"flash": p.flash, "arena": p.arena}
            rows.append(row)
            df, da = (row["realised"][k] - real[k] for k in ("flash", "arena"))
            print(
                f"{name} {v.kind:8s} {list(bits.values())} flash {real['flash']:,} ({df:+d}) "
                f"arena {real['arena']:,} ({da:+d})",
                flush=True,
            )
    return {
        "layers": [
            {"name": la.name, "op": la.op, "shape": list(la.shape), "slices": len(la.slices)}
            for la in shapes.layers
        ],
        "reference_seconds": round(shapes_s, 2),
        "rows": rows,
        "worst": {label: _worst(rows, label) for label in ("realised", "planned", "default")},
    }


def _mixed_layers(bits: dict[str, int], rng: np.random.Generator) -> list[str]:
    """Some of the layers LUT can hold (<= 7 bits), never all: the LUT layers of an int4+lut file."""
    able = [n for n, b in bits.items() if b <= 7]
    if len(able) < 2:
        return able[:1] if len(able) < len(bits) else []
    k = int(rng.integers(1, len(able)))  # 1 .. len(able) - 1
    return sorted(rng.choice(able, size=k, replace=False).tolist())


def _worst(rows: list[dict], label: str) -> dict:
    """Largest flash and arena errors of one prediction over every file, in bytes and percent."""
    out = {}
    for what in ("flash", "arena"):
        err = [(r[label][what] - r[what], r[what]) for r in rows]
        b, size = max(err, key=lambda e: abs(e[0]))
        out[what] = {"bytes": b, "percent": round(100 * max(abs(e) / s for e, s in err), 3), "of": size}
        if what == "flash":
            out["flash_within_target"] = all(abs(e) <= max(64, 0.01 * s) for e, s in err)
        else:
            out["arena_within_target"] = all(abs(e) <= 0.02 * s for e, s in err)
    return out


def markdown(result: dict) -> str:
    """The results file."""
    m = result["machine"]
    lines = [
        "# Byte cost model vs the real exporter (issue #19)",
        "",
        f"Command: `{result['command']}`  ",
        f"Commit: {result['commit']}; machine: {m['cpu']}, {m['nproc']} cores; {result['seconds']:.0f} s.",
        "",
        "deploy.storage.cost predicts the stored .tflite's bytes and TFLM's arena from one reference "
        "conversion (8 bits) per model; each file below is a real export (--storage auto builds int4, lut "
        "and int4+lut, LUT on a seeded random part of the layers), each prediction made without it. "
        f"Targets: flash {TARGETS['flash']}, arena {TARGETS['arena']}."
        " "
        "realised = LUT tables from the converter's integers; planned = estimated before QAT from the start "
        "weights (what the planner sees); default = no weights (full grids assumed).",
        "",
        "| model | files | prediction | worst flash error | worst arena error | within targets |",
        "|---|---:|---|---:|---:|---|",
    ]
    for name, r in result["models"].items():
        for label, w in r["worst"].items():
            ok = w["flash_within_target"] and w["arena_within_target"]
            fl, ar = w["flash"], w["arena"]
            lines.append(
                f"| {name} | {len(r['rows'])} | {label} | {fl['bytes']:+,} B ({fl['percent']:.2f}%) "
                f"| {ar['bytes']:+,} B ({ar['percent']:.2f}%) | {'yes' if ok else 'no'} |"
            )
    for name, r in result["models"].items():
        lines += [
            "",
            f"## {name}: "
            + ", ".join(
                f"{la['name']} {la['op']} {tuple(la['shape'])}"
                + (f" in {la['slices']} slices" if la["slices"] > 1 else "")
                for la in r["layers"]
            ),
            "",
            "| bits | storage | flash | realised | planned | default | arena | realised | planned |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in r["rows"]:
            f, a = row["flash"], row["arena"]
            auto = " (auto)" if row["deployed"] else ""
            lines.append(
                f"| {', '.join(map(str, row['bits'].values()))} | {row['storage']}{auto} "
                f"| {f:,} | {row['realised']['flash'] - f:+,} | {row['planned']['flash'] - f:+,} "
                f"| {row['default']['flash'] - f:+,} | {a:,} | {row['realised']['arena'] - a:+,} "
                f"| {row['planned']['arena'] - a:+,} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write benchmarks/results/cost_model.{md,json}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,lenet5,resnet8")
    ap.add_argument("--plans", type=int, default=12, help="plans per model (5 uniform, then random)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    models = {name: bench(name, args.plans) for name in args.models.split(",")}
    given = argv if argv is not None else sys.argv[1:]
    result = {
        "command": " ".join(["python benchmarks/cost_model.py", *given]),
        "commit": commit(),
        "machine": machine(),
        "seconds": round(time.perf_counter() - t0, 1),
        "targets": TARGETS,
        "models": models,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "cost_model.json", json.dumps(result, indent=2))
    atomic_write_text(args.out / "cost_model.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
