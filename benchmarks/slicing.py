"""Benchmark: LeNet-5 4-bit QAT on MNIST, int8 vs LUT/INT4 storage unsliced vs sliced at a decode budget.

    python benchmarks/slicing.py --data /work/shared/data/mnist.npz [--quick] [--budget 16KiB]

Trains LeNet-5 (edgeq.models.lenet5) float briefly, 4-bit QAT on every layer (mean 4 bits), converts, and
measures in the TFLM interpreter: flash (.tflite bytes), arena (recording allocator), latency (median of N
invokes of one sample) and accuracy on the test split. Writes benchmarks/results/slicing{,_quick}.md/.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import commit, cpu_model  # noqa: E402  (benchmarks/ is on sys.path as the script dir)

import edgeq  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from deploy import (  # noqa: E402
    export,
    flatbuffer,  # noqa: E402
    slicing,
)
from deploy.export.limits import packing_limit  # noqa: E402
from deploy.measure.tflm import arena_bytes, io_quant, quantize_input, run_tflm, tflm_interpreter  # noqa: E402
from deploy.storage import lut  # noqa: E402
from edgeq.io import atomic_write_text  # noqa: E402


def latency_ms(model: bytes, sample: np.ndarray, runs: int) -> float:
    """Median wall time of one TFLM invoke of one sample, after 5 warm-up invokes."""
    interp = tflm_interpreter(model)
    q = io_quant(interp, "input")
    interp.set_input(quantize_input(sample, q).reshape(q.shape), 0)
    for _ in range(5):
        interp.invoke()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        interp.invoke()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def train(
    x, y, *, epochs: int, qat_epochs: int, qat_samples: int, seed: int, weight_bits: int = 4, keep_dense=False
):
    """Float LeNet-5, then uniform QAT on every weight layer; returns (qat model, bits, sizes, seconds)."""
    import tensorflow as tf
    import tf_keras as keras

    from edgeq.models import lenet5
    from edgeq.optimize import quantize_model, weight_layers
    from edgeq.plan import BitPlan

    tf.keras.utils.set_random_seed(seed)
    t0 = time.time()
    model = lenet5()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile("adam", loss, ["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=128, verbose=0)
    sizes = weight_layers(model)
    bits = {name: weight_bits for name in sizes}
    qat = quantize_model(model, BitPlan.from_bits(bits), keep_dense=keep_dense)
    qat.compile(keras.optimizers.Adam(1e-4), loss, ["accuracy"])
    qat.fit(x[:qat_samples], y[:qat_samples], epochs=qat_epochs, batch_size=128, verbose=0)
    return qat, bits, sizes, time.time() - t0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print PASS/FAIL per target, write the results files."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/mnist.npz", help="keras-layout MNIST .npz")
    ap.add_argument("--quick", action="store_true", help="fewer training and test samples")
    ap.add_argument("--budget", default="16KiB", help="decode budget (KB and KiB both mean 1024 B)")
    ap.add_argument("--test-samples", type=int, default=None, help="TFLM accuracy on this many test images")
    ap.add_argument("--latency-runs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", type=int, default=4, help="weight bits of every layer (default 4)")
    ap.add_argument(
        "--keep-dense", action="store_true", help="Dense as FULLY_CONNECTED (edgeq run --keep-dense)"
    )
    ap.add_argument("--board", default=None, help="also check the fit on a board profile, e.g. nrf52832")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    budget = slicing.parse_budget(args.budget)

    d = np.load(args.data)
    x_train = (d["x_train"] / 255.0).astype("float32")[..., None]
    x_test = (d["x_test"] / 255.0).astype("float32")[..., None]
    y_train, y_test = d["y_train"].astype("int64"), d["y_test"].astype("int64")
    if args.quick:
        train_n, qat_n, test_n, runs = 12000, 6000, 1000, 50
    else:
        train_n, qat_n, test_n, runs = 60000, 60000, 10000, 200
    test_n = args.test_samples or test_n
    runs = args.latency_runs or runs
    x_train, y_train = x_train[:train_n], y_train[:train_n]
    xt, yt = x_test[:test_n], y_test[:test_n]

    qat, bits, sizes, train_s = train(
        x_train,
        y_train,
        epochs=1,
        qat_epochs=1,
        qat_samples=qat_n,
        seed=args.seed,
        weight_bits=args.bits,
        keep_dense=args.keep_dense,
    )
    mean_bits = sum(bits[n] * sizes[n] for n in sizes) / sum(sizes.values())
    converted = export.convert(qat, x_train[:200])  # INT4 weight tensors
    t0 = time.time()
    res = slicing.slice_weights(converted, budget)
    slice_s = time.time() - t0
    lut_whole = lut.build(converted).model
    lut_sliced = lut.build(res.model).model
    variants = {
        "int8 (QAT weights stored int8)": flatbuffer.unpack_int4_tensors(converted),
        "int4 unsliced": converted,
        f"int4 sliced {args.budget}": res.model,
        "lut unsliced": lut_whole,
        f"lut sliced {args.budget}": lut_sliced,
    }
    ref = run_tflm(converted, xt)
    rows = []
    for name, model in variants.items():
        out = ref if model is converted else run_tflm(model, xt)
        rows.append(
            {
                "variant": name,
                "flash_bytes": len(model),
                "arena_bytes": arena_bytes(model, xt[0]),
                "latency_ms": latency_ms(model, xt[0], runs),
                "accuracy": float(np.mean(np.argmax(out, 1) == yt)),
                "bit_exact_vs_int4": bool(np.array_equal(out, ref)),
            }
        )
        print(
            f"{name:32s} flash {rows[-1]['flash_bytes']:>8,} arena {rows[-1]['arena_bytes']:>8,} "
            f"latency {rows[-1]['latency_ms']:.3f} ms acc {rows[-1]['accuracy']:.4f} "
            f"exact {rows[-1]['bit_exact_vs_int4']}",
            flush=True,
        )
    by = {r["variant"]: r for r in rows}
    int8, lut_u, lut_s = (
        by["int8 (QAT weights stored int8)"],
        by["lut unsliced"],
        by[f"lut sliced {args.budget}"],
    )
    int4_s = by[f"int4 sliced {args.budget}"]
    limit = packing_limit(qat, bits)
    targets = []

    def target(name: str, value: float, bound: float) -> None:
        targets.append({"target": name, "value": value, "bound": bound, "pass": bool(value <= bound)})

    target(
        "lut sliced arena <= 1.1 x (int8 arena + budget)",
        lut_s["arena_bytes"],
        1.1 * (int8["arena_bytes"] + budget),
    )
    target("lut sliced flash <= 1.05 x packing limit + 4 KiB", lut_s["flash_bytes"], 1.05 * limit + 4096)
    target("lut sliced latency <= 1.5 x int8 latency", lut_s["latency_ms"], 1.5 * int8["latency_ms"])
    target(
        "|lut sliced - lut unsliced| accuracy <= 0.3 points",
        100 * abs(lut_s["accuracy"] - lut_u["accuracy"]),
        0.3,
    )
    target(
        "int4 sliced arena <= 1.1 x (int8 arena + budget) (info)",
        int4_s["arena_bytes"],
        1.1 * (int8["arena_bytes"] + budget),
    )
    target(
        "int4 sliced flash <= 1.05 x packing limit + 4 KiB (info)", int4_s["flash_bytes"], 1.05 * limit + 4096
    )
    decode_problems = slicing.decode_placement_problems(lut_sliced)
    sweep = []
    for b in ("8KiB", "16KiB", "32KiB", "64KiB", "128KiB"):
        r_b = slicing.slice_weights(converted, b)
        for kind, m_b in (("int4", r_b.model), ("lut", lut.build(r_b.model).model)):
            sweep.append(
                {
                    "budget": b,
                    "storage": kind,
                    "slices": sum(r.slices for r in r_b.sliced),
                    "flash_bytes": len(m_b),
                    "arena_bytes": arena_bytes(m_b, xt[0]),
                    "latency_ms": latency_ms(m_b, xt[0], 30),
                    "bit_exact_200": bool(np.array_equal(run_tflm(m_b, xt[:200]), ref[:200])),
                }
            )
            print("sweep", sweep[-1], flush=True)
    for t in targets:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']:,.3f} vs {t['bound']:,.3f}")
    print(f"{'PASS' if not decode_problems else 'FAIL'}  every DECODE right before its consumer")

    cmd = "python benchmarks/slicing.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "command": cmd.strip(),
        "commit": commit(),
        "machine": {
            "cpu": cpu_model(),
            "nproc": __import__("os").cpu_count(),
            "python": platform.python_version(),
        },
        "budget_bytes": budget,
        "plan_bits": bits,
        "dense_layers": "FULLY_CONNECTED (--keep-dense)" if args.keep_dense else "1x1 CONV_2D (default)",
        "mean_bits": mean_bits,
        "train": {
            "float_epochs": 1,
            "train_samples": train_n,
            "qat_epochs": 1,
            "qat_samples": qat_n,
            "seconds": round(train_s, 1),
        },
        "test_samples": test_n,
        "latency_runs": runs,
        "packing_limit_bytes": limit,
        "slice_seconds": round(slice_s, 2),
        "slices": [r.__dict__ for r in res.rows],
        "variants": rows,
        "budget_sweep": sweep,
        "targets": targets,
        "decode_placement_problems": decode_problems,
        "concat_max_fan_in": slicing.max_concat_fan_in(res.model),
    }
    out = Path(args.out)
    if args.board:
        from deploy.boards import fit_check, load_board

        board = load_board(args.board)
        result["board"] = {
            v: fit_check(board, r["flash_bytes"], r["arena_bytes"]).message
            for v, r in ((row["variant"], row) for row in result["variants"])
        }
        for v, msg in result["board"].items():
            print(f"{args.board}: {v}: {msg}")
    stem = ("slicing_quick" if args.quick else "slicing") + (f"_{args.bits}bit" if args.bits != 4 else "")
    stem += "_keep_dense" if args.keep_dense else ""
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=2))
    board_md = "".join(f"\n- {args.board}, {v}: {m}" for v, m in result.get("board", {}).items())
    atomic_write_text(
        out / f"{stem}.md", render(result) + (f"\n## Board fit{board_md}\n" if board_md else "")
    )
    print(f"wrote {out / stem}.md/.json")
    return 0 if all(t["pass"] for t in targets if "(info)" not in t["target"]) and not decode_problems else 1


def render(r: dict) -> str:
    """The results as Markdown."""
    m = r["machine"]
    lines = [
        f"# Output-channel slicing: LeNet-5, MNIST, {max(r['plan_bits'].values())}-bit QAT",
        "",
        f"- command: `{r['command']}`",
        f"- commit: `{r['commit']}`; machine: {m['cpu']}, nproc {m['nproc']}, Python {m['python']}",
        f"- plan: {r['plan_bits']} (mean {r['mean_bits']:.2f} bits); training: {r['train']}",
        f"- Dense layers deployed as {r.get('dense_layers', 'FULLY_CONNECTED')}",
        f"- decode budget {r['budget_bytes']:,} B; packing limit {r['packing_limit_bytes']:,} B; "
        f"accuracy over the first {r['test_samples']:,} test images in TFLM; latency = median of "
        f"{r['latency_runs']} host TFLM invokes (a ratio, not an MCU time)",
        "",
        "| variant | flash B | arena B | latency ms | accuracy | outputs = int4 model |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for v in r["variants"]:
        lines.append(
            f"| {v['variant']} | {v['flash_bytes']:,} | {v['arena_bytes']:,} | {v['latency_ms']:.3f} | "
            f"{100 * v['accuracy']:.2f}% | {'bit-exact' if v['bit_exact_vs_int4'] else 'DIFFERENT'} |"
        )
    lines += [
        "",
        "| layer | op | out channels | weight B (int8) | slices | largest slice B | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for s in r["slices"]:
        lines.append(
            f"| {s['layer']} | {s['op']} | {s['out_channels']} | {s['weight_bytes']:,} | {s['slices']} | "
            f"{s['largest_slice_bytes']:,} | {s['warning']} |"
        )
    lines += [
        "",
        "Budget sweep (latency: median of 30 invokes; bit-exact: first 200 test images vs the int4 model):",
        "",
        "| budget | storage | slices | flash B | arena B | latency ms | bit-exact |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for s in r["budget_sweep"]:
        lines.append(
            f"| {s['budget']} | {s['storage']} | {s['slices']} | {s['flash_bytes']:,} | "
            f"{s['arena_bytes']:,} | {s['latency_ms']:.3f} | {s['bit_exact_200']} |"
        )
    lines += ["", "| target | value | bound | result |", "|---|---:|---:|---|"]
    for t in r["targets"]:
        lines.append(
            f"| {t['target']} | {t['value']:,.3f} | {t['bound']:,.3f} | {'PASS' if t['pass'] else 'FAIL'} |"
        )
    ok = not r["decode_placement_problems"]
    lines += [
        "",
        "- every DECODE immediately before its consumer: "
        + ("PASS" if ok else "FAIL " + str(r["decode_placement_problems"])),
        f"- largest CONCATENATION fan-in: {r['concat_max_fan_in']} (TFLM limit 10)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
