"""Benchmark: the real planner, `edgeq run`'s default allocation, against parameter count, digits to VGG-16.

    python benchmarks/planner_scaling.py [--models digits,lenet5,resnet8,vgg7,vgg16]

benchmarks/planner.py times the planner's core (options, front, choice) on a stand-in byte cost; this one
times what a run pays: deploy.app.allocate_for("planner") at 4 mean bits, reference kernels, 16 KiB decode
budget, on an untrained twin of each model's real shapes (benchmarks/scaling.py's models, synthetic data).
Per model, in its own process: the reference conversion (the float model at 8 bits, converted and sliced
once per twin) and then the rest (grids, the byte-exact pricing of every plan the choice checks, the
front). Beside each, the planner figure benchmarks/results/scaling.json recorded at its own commit.
Writes benchmarks/results/planner_scaling.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import scaling  # noqa: E402  (pins BLAS to 2 cores before numpy loads)
from provenance import commit, header_lines, machine  # noqa: E402
from run_timed import _Beside  # noqa: E402

from edgeq.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET_S = 1.0  # issue 19: the planner under a second at VGG-16 shapes


def one(model: str) -> dict:
    """In this process: the untrained twin, then the conversion and the planner's own seconds."""
    from deploy import planning
    from deploy.app import allocate_for
    from deploy.planning import reference_shapes

    priced = []  # seconds of the per-twin pricing (ranges, grids, tables), timed where plan_layers calls it
    price = planning._price

    def timed_price(*args):
        t = time.perf_counter()
        out = price(*args)
        priced.append(time.perf_counter() - t)
        return out

    planning._price = timed_price

    spec = scaling.spec_for(model)
    splits = scaling.synthetic_splits(model, 256, scaling.NUM_CLASSES)
    opts = scaling.run_options(Path("unused"))
    trained = scaling.untrained(spec, splits)
    t0 = time.perf_counter()
    reference_shapes(trained, opts.target.decode_budget, opts.keep_dense)  # cached for allocate_for
    t1 = time.perf_counter()
    plan = allocate_for("planner", trained, scaling.TARGET_BITS, spec, opts)
    t2 = time.perf_counter()
    return {
        "model": model,
        "params": int(trained.float_model.count_params()),
        "convert_s": round(t1 - t0, 2),
        "plan_s": round(t2 - t1, 2),
        "pricing_s": round(sum(priced), 2),
        "choice_s": round(t2 - t1 - sum(priced), 2),
        "bits": dict(plan.bits),
        "storage": plan.meta.get("storage"),
    }


def before() -> dict[str, tuple[float, str]]:
    """model -> (planner seconds, commit) from results/scaling.json."""
    path = RESULTS / "scaling.json"
    if not path.is_file():
        return {}
    res = json.loads(path.read_text())
    return {
        r["model"]: (r["stages"]["planner"]["seconds"], res["commit"])
        for r in res["rows"]
        if "seconds" in r["stages"].get("planner", {})
    }


def markdown(res: dict) -> str:
    lines = ["# The real planner against parameter count (issue 19)", "", *header_lines(res), ""]
    lines += [
        "Untrained twins of the real shapes, synthetic data (timing, not accuracy); each model in its own "
        "process. convert = the float model at 8 bits through TF-MOT and the converter, sliced (once per "
        "twin; a search reuses it); plan = the rest of deploy.app.allocate_for('planner') at 4 mean bits: "
        "grids, every family's byte-exact file for the plans the choice checks (the arena only where a "
        "RAM budget asks, and for the plan kept), the front. "
        "pricing = the per-twin part of plan (each layer's interval ranges and grids at 2..8 bits, their "
        "uncertainty costs and LUT tables; a search pays it once); choice = the rest (options, front, the "
        "exact files of the plans the choice checks). "
        "Before = the planner stage of benchmarks/results/scaling.json (conversion included), at its commit.",
        "",
        "| model | parameters | convert s | plan s | of it: pricing s | of it: choice s | convert + plan s "
        "| before s | plan |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        old = res["before"].get(r["model"])
        bits = ", ".join(f"{b}" for b in r["bits"].values())
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['convert_s']:.2f} | {r['plan_s']:.2f} | "
            f"{r.get('pricing_s', float('nan')):.2f} | {r.get('choice_s', float('nan')):.2f} | "
            f"{r['convert_s'] + r['plan_s']:.2f} | {f'{old[0]:.2f} ({old[1]})' if old else '—'} | "
            f"{r['storage']}: {bits} |"
        )
    vgg = next((r for r in res["rows"] if r["model"] == "vgg16"), None)
    if vgg is not None:
        choice = vgg.get("choice_s", math.nan)
        lines += [
            "",
            "| target (VGG-16 shapes) | measured | met |",
            "|---|---|---|",
            f"| the planner, pricing and choice, under {TARGET_S:g} s | {vgg['plan_s']:.2f} s "
            f"({vgg['convert_s'] + vgg['plan_s']:.2f} s with the conversion) | "
            f"{'yes' if vgg['plan_s'] < TARGET_S else 'NO'} |",
            f"| the choice given the per-twin costs (options, front, exact files) under {TARGET_S:g} s | "
            f"{choice:.2f} s | {'yes' if choice < TARGET_S else 'NO'} |",
            "",
            "The choice is what each further target or budget of a search pays; the per-twin pricing (the "
            "range search per channel and bit width over 14.7M weights, on a histogram of each channel for "
            "per-channel layers of over 65,536 weights and per-tensor ones of over 1M, and the exact cost "
            "and LUT tables of each grid; paid once per twin) the rest. "
            "The planner's core (options, front and choice on a stand-in cost) is "
            "benchmarks/results/planner.md's.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(scaling.MODELS), help="comma-separated, of scaling.py's")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one)))
        return 0
    names = args.models.split(",")
    unknown = [n for n in names if n not in scaling.MODELS]
    if unknown:
        print(f"error: unknown model {unknown[0]!r}; use one of {', '.join(scaling.MODELS)}", file=sys.stderr)
        return 2
    started_at, t0, watcher = commit(), time.monotonic(), _Beside()
    watcher.start()
    rows = []
    for name in names:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name], capture_output=True, text=True, cwd=ROOT
        )
        if proc.returncode:
            print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: convert {rows[-1]['convert_s']} s, plan {rows[-1]['plan_s']} s", file=sys.stderr)
    watcher.stop.set()
    res = {
        "command": " ".join(["python benchmarks/planner_scaling.py", *(argv or sys.argv[1:])]),
        "commit": started_at,
        "machine": machine(),
        "seconds": time.monotonic() - t0,
        "beside": watcher.text(),
        "rows": rows,
        "before": before(),
    }
    atomic_write_text(args.out / "planner_scaling.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(args.out / "planner_scaling.md", markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
