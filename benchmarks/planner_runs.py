"""Benchmark: `edgeq run pipelines/digits.py --method planner` against --method qiu and TF-MOT uniform (#19).

    python benchmarks/planner_runs.py [--seeds 0,1,2] [--targets 4,3,3.5] [--methods planner,qiu]

Every (method, target, seed) is one full `edgeq run` of the digits pipeline (float 30 epochs, twin 20,
QAT 5, --storage auto, the default export), in a subprocess that imports deploy.planning first so the
"planner" method is in the table. Read back from its report.json: TFLM accuracy on the 270 test digits
(one image = 0.37 points), the deployed model's flash (.tflite bytes) and TFLM arena, its storage and
plan; for the planner also the bytes it predicted and whether each layer was stored as it assumed
(deploy.planning.check_exported against the run's own converted model). The TF-MOT rows are
benchmarks/results/lowbit_qat.json's "TF-MOT LastValue" (converter output as is: Dense as
FULLY_CONNECTED, not sliced, names kept); their arena, which that file does not hold, is measured here on
the same structure (TF-MOT QAT of the digits CNN at those bits, converted; the arena does not depend on
the trained values). Writes benchmarks/results/planner_runs.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arglists import floats, ints  # noqa: E402
from provenance import commit, machine  # noqa: E402  (benchmarks/ is on sys.path as the script dir)

from edgeq.io import atomic_write_text  # noqa: E402

RUN = "import deploy.planning, sys; from deploy.cli import main; sys.exit(main(sys.argv[1:]))"
LOWBIT = ROOT / "benchmarks" / "results" / "lowbit_qat.json"


def edgeq_run(method: str, target: float, seed: int, out: Path) -> dict:
    """One `edgeq run` of the digits pipeline; its report, plan and (planner) storage check."""
    flags = ["--method", method, "--target-bits", f"{target:g}", "--seed", str(seed), "--out", str(out)]
    cmd = [sys.executable, "-c", RUN, "run", "pipelines/digits.py", *flags, "--force"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[3:])} failed:\n{proc.stderr[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    dep = rep["models"]["deployed"]
    row = {
        "method": method,
        "target_bits": target,
        "seed": seed,
        "tflm_accuracy": round(100 * dep["accuracy_tflm"], 2),
        "flash_bytes": dep["flash_bytes"],
        "arena_bytes": dep["arena_bytes"],
        "storage": dep["storage"],
        "mean_bits": rep["plan"]["mean_bits"],
        "bits": {lay["name"]: lay["bits"] for lay in rep["plan"]["layers"]},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if method == "planner":
        from deploy.planning import check_exported
        from deploy.storage.cost import shapes_from_tflite
        from edgeq.plan import BitPlan

        plan = BitPlan.load(out / "bitplan.json")
        shapes = shapes_from_tflite((out / "model_uncompressed.tflite").read_bytes())
        pred = plan.meta["predicted"]
        row.update(
            predicted_flash=pred["flash_bytes"],
            predicted_arena=pred["arena_bytes"],
            predicted_storage=pred["storage"],
            flash_budget=plan.meta["flash_budget"],
            uncertainty_cost=round(plan.meta["planner"]["cost"], 2),
            stored_as_planned=check_exported(plan, (out / "model.tflite").read_bytes(), shapes) == [],
        )
    return row


def tfmot_rows(bits_list: list[int]) -> list[dict]:
    """lowbit_qat.json's TF-MOT LastValue rows, with the arena of that structure measured here."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from lowbit_qat import tfmot_qat

    from deploy.export import convert
    from deploy.measure.tflm import arena_bytes
    from edgeq.data import load_digits
    from edgeq.models import digits_cnn

    lowbit = json.loads(LOWBIT.read_text())
    splits = load_digits(0)
    out = []
    for s in lowbit["summary"]:
        if s["row"] != "TF-MOT LastValue" or s["bits"] not in bits_list:
            continue
        model = digits_cnn(splits.input_shape, 10)
        arena = arena_bytes(convert(tfmot_qat(model, s["bits"]), splits.x_train, samples=8))
        out.append({**s, "arena_bytes": arena, "source": f"{LOWBIT.relative_to(ROOT)} ({lowbit['commit']})"})
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Mean/min/max TFLM accuracy and the bytes per (target, method) over seeds."""
    out = []
    for target in sorted({r["target_bits"] for r in rows}, reverse=True):
        for method in dict.fromkeys(r["method"] for r in rows):
            sel = [r for r in rows if r["method"] == method and r["target_bits"] == target]
            if not sel:
                continue
            acc = [r["tflm_accuracy"] for r in sel]
            s = {
                "method": method,
                "target_bits": target,
                "seeds": [r["seed"] for r in sel],
                "tflm_mean": round(statistics.fmean(acc), 2),
                "tflm_min": min(acc),
                "tflm_max": max(acc),
                "flash_bytes": sorted({r["flash_bytes"] for r in sel}),
                "arena_bytes": sorted({r["arena_bytes"] for r in sel}),
                "storage": sorted({r["storage"] for r in sel}),
                "mean_bits": sorted({round(r["mean_bits"], 3) for r in sel}),
            }
            if method == "planner":
                s["max_abs_flash_error"] = max(abs(r["predicted_flash"] - r["flash_bytes"]) for r in sel)
                s["max_abs_arena_error"] = max(abs(r["predicted_arena"] - r["arena_bytes"]) for r in sel)
                s["all_stored_as_planned"] = all(r["stored_as_planned"] for r in sel)
            out.append(s)
    return out


def _bytes(values: list[int]) -> str:
    return " / ".join(f"{v:,}" for v in values)


def markdown(result: dict) -> str:
    """The results file."""
    m = result["machine"]
    lines = [
        "# The planner as an allocation method on digits: `--method planner` vs `qiu` vs TF-MOT (issue #19)",
        "",
        f"Command: `{result['command']}`  ",
        f"Commit: {result['commit']}; machine: {m['cpu']}, {m['nproc']} cores, {m['platform']}, "
        f"Python {m['python']}; {result['seconds']:.0f} s.",
        "",
        "Each row of the first table is `edgeq run pipelines/digits.py --method M --target-bits T --seed S` "
        "(float 30 epochs, twin 20, QAT 5; --storage auto; Dense as FULLY_CONNECTED; 16 KiB decode budget), "
        f"over seeds {', '.join(map(str, result['seeds']))}. TFLM accuracy on the 270 test digits (one image "
        "= 0.37 points); flash = the deployed .tflite's bytes, arena = TFLM's figure for it; "
        "values separated by / differ between seeds. The planner's budget is the flash of the uniform plan "
        "at T bits as --storage auto would store it (T = 3.5: halfway between the 3- and 4-bit plans).",
        "",
        "| target | method | TFLM mean | min | max | flash (B) | arena (B) | storage | mean bits |",
        "|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['target_bits']:g} | {s['method']} | {s['tflm_mean']:.2f} | {s['tflm_min']:.2f} | "
            f"{s['tflm_max']:.2f} | {_bytes(s['flash_bytes'])} | {_bytes(s['arena_bytes'])} | "
            f"{', '.join(s['storage'])} | {', '.join(map(str, s['mean_bits']))} |"
        )
    for t in result["tfmot"]:
        lines.append(
            f"| {t['bits']} | TF-MOT LastValue (uniform) | {t['tflm_mean']:.2f} | {t['tflm_min']:.2f} | "
            f"{t['tflm_max']:.2f} | {_bytes(t['flash_bytes'])} | {t['arena_bytes']:,} | "
            f"{', '.join(t['stored_types'])} (converter output) | {t['bits']} |"
        )
    lines += [
        "",
        f"TF-MOT rows: from {result['tfmot'][0]['source'] if result['tfmot'] else LOWBIT.name}; their flash "
        "is the converter's file as is (not sliced, names kept), so it is not comparable byte for byte with "
        "the deployed files above; their arena is measured here on the same structure.",
        "",
        "Planner: predicted bytes (deploy.storage.cost, before QAT) against the exported file, and whether "
        "every layer was stored as the plan assumed:",
        "",
        "| target | max abs flash error (B) | max abs arena error (B) | stored as planned |",
        "|---:|---:|---:|---|",
    ]
    for s in result["summary"]:
        if s["method"] == "planner":
            lines.append(
                f"| {s['target_bits']:g} | {s['max_abs_flash_error']} | {s['max_abs_arena_error']} | "
                f"{'yes' if s['all_stored_as_planned'] else 'NO'} |"
            )
    lines += [
        "",
        "Per run:",
        "",
        "| target | method | seed | TFLM | flash | arena | storage | bits (conv1, conv2, fc1, fc2) | "
        "predicted flash / arena | budget |",
        "|---:|---|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for r in result["rows"]:
        pred = f"{r['predicted_flash']:,} / {r['predicted_arena']:,}" if "predicted_flash" in r else ""
        budget = f"{r['flash_budget']:,}" if "flash_budget" in r else ""
        lines.append(
            f"| {r['target_bits']:g} | {r['method']} | {r['seed']} | {r['tflm_accuracy']:.2f} | "
            f"{r['flash_bytes']:,} | {r['arena_bytes']:,} | {r['storage']} | "
            f"{', '.join(str(b) for b in r['bits'].values())} | {pred} | {budget} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write benchmarks/results/planner_runs.{md,json}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=ints, default="0,1,2")
    ap.add_argument("--targets", type=floats, default="4,3,3.5", help="comma-separated target mean bits")
    ap.add_argument("--methods", default="planner,qiu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeq_planner_runs"), help="run folders")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    args = ap.parse_args(argv)
    seeds, targets = args.seeds, args.targets
    methods = [m.strip() for m in args.methods.split(",")]
    t0 = time.perf_counter()
    rows = []
    for seed in seeds:
        for target in targets:
            for method in methods:
                r = edgeq_run(method, target, seed, args.work / f"{method}_t{target:g}_s{seed}")
                rows.append(r)
                print(
                    f"seed {seed} target {target:g} {method:8s} TFLM {r['tflm_accuracy']:6.2f} "
                    f"flash {r['flash_bytes']:,} arena {r['arena_bytes']:,} {r['storage']} {r['bits']}",
                    flush=True,
                )
    given = argv if argv is not None else sys.argv[1:]
    result = {
        "command": " ".join(["python benchmarks/planner_runs.py", *given]),
        "commit": commit(),
        "machine": machine(),
        "seeds": seeds,
        "targets": targets,
        "methods": methods,
        "seconds": round(time.perf_counter() - t0, 1),
        "summary": summarise(rows),
        "tfmot": tfmot_rows(sorted({int(t) for t in targets if float(t).is_integer()})),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "planner_runs.json", json.dumps(result, indent=2))
    atomic_write_text(args.out / "planner_runs.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
