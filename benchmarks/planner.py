"""Benchmark: uncertainty costs, storage options and the Pareto planner at LeNet-5 and VGG-16 shapes.

    python benchmarks/planner.py [--runs 5] [--models lenet5,vgg16] [--check-shapes]

Kernel shapes as edgeq.models builds them (LeNet-5 32-64-512 on 28x28x1, VGG-16 on 32x32x3: 13 convs
and the logits; --check-shapes builds the Keras models and compares). Synthetic posteriors, seeded:
mu ~ N(0, s), s = sqrt(2 / fan_in); sigma = s * lognormal(log 0.4 + shift, 0.3), one shift ~ N(0, 0.4)
per layer. Convolutions get per-channel grids (TF-MOT quantizes Conv2D per axis), dense layers
per-tensor. Options: bits 2..8 x storages int8 (2..8), int4 (2..4), lut (2..7), at best_range grids;
flash and RAM from a STAND-IN byte cost (payload + 64 B per tensor + LUT tables; RAM 0 for int8, the
whole tensor for INT4 unpacking and LUT decoding), not the exporter's model. Median of --runs runs,
wall and CPU seconds, on at most 2 cores. Targets: the costs at bits 2..8 and the planner (pareto_front +
flash_of_uniform + choose) each under 1 s at VGG-16 shapes. Writes benchmarks/results/planner.md, .json.
"""

from __future__ import annotations

import os

# Two cores is the target machine: pin BLAS threads before numpy loads, and the process below.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import commit, machine  # noqa: E402  (benchmarks/ is on sys.path as the script dir)

from edgeq.io import atomic_write_text  # noqa: E402
from edgeq.planner import (  # noqa: E402
    STORAGE_BITS,
    Grid,
    best_ranges,
    choose,
    default_resolution,
    flash_of_uniform,
    lloyd_grid,
    make_plan,
    model_options,
    pareto_front,
    symmetric_grid,
    uncertainty_costs,
)
from edgeq.posterior import LayerPosterior  # noqa: E402

MODULES = ("edgeq/planner.py", "benchmarks/planner.py")
TARGET_S = 1.0
# (name, kernel shape, per-channel axis or None), as edgeq.models.lenet5() / vgg16() build them.
_VGG16_CFG = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_VGG16_NAMES = (
    "b1c1",
    "b1c2",
    "b2c1",
    "b2c2",
    "b3c1",
    "b3c2",
    "b3c3",
    "b4c1",
    "b4c2",
    "b4c3",
    "b5c1",
    "b5c2",
    "b5c3",
)
SHAPES: dict[str, list[tuple[str, tuple[int, ...], int | None]]] = {
    "lenet5": [
        ("conv1", (5, 5, 1, 32), -1),
        ("conv2", (5, 5, 32, 64), -1),
        ("fc1", (1024, 512), None),
        ("fc2", (512, 10), None),
    ],
    "vgg16": [
        (f"{n}_conv", (3, 3, cin, cout), -1)
        for n, cin, cout in zip(_VGG16_NAMES, (3, *_VGG16_CFG[:-1]), _VGG16_CFG, strict=True)
    ]
    + [("logits", (512, 10), None)],
}
# STAND-IN activation peaks for ram_floor (LeNet-5: the int8 QAT arena measured in DESIGN.md; VGG-16:
# two 32x32x64 int8 activations live at once).
RAM_FLOOR = {"lenet5": 26_000, "vgg16": 2 * 32 * 32 * 64}


def standin_byte_cost(
    name: str, shape: tuple[int, ...], bits: int, storage: str, grid: Grid
) -> tuple[int, int]:
    """STAND-IN byte cost, not the exporter's: (flash, RAM) of one layer option.

    flash: ceil(n * stored bits / 8) + 64 B per tensor, + 2**bits one-byte table entries per LUT channel;
    RAM: 0 for int8, n for INT4 (reference kernels unpack it) and LUT (DECODE writes the int8 tensor).
    """
    n = math.prod(shape)
    stored = {"int8": 8, "int4": 4, "lut": bits}[storage]
    table = 2**bits * (shape[grid.axis] if grid.per_channel else 1) if storage == "lut" else 0
    return math.ceil(n * stored / 8) + 64 + table, 0 if storage == "int8" else n


def posteriors(model: str, seed: int = 0) -> list[LayerPosterior]:
    """Synthetic posteriors at the model's kernel shapes (see the module doc)."""
    rng = np.random.default_rng(seed)
    out = []
    for name, shape, _ in SHAPES[model]:
        s = math.sqrt(2.0 / math.prod(shape[:-1]))
        shift = rng.normal(0.0, 0.4)
        mu = rng.normal(0.0, s, shape)
        sigma = s * np.exp(rng.normal(math.log(0.4) + shift, 0.3, shape))
        out.append(LayerPosterior(name, mu, sigma))
    return out


def check_shapes() -> None:
    """Raise unless SHAPES are the kernels of edgeq.models' Keras models (imports TensorFlow)."""
    from edgeq import models

    for model, build in (("lenet5", models.lenet5), ("vgg16", models.vgg16)):
        m = build()
        want = {n: s for n, s, _ in SHAPES[model]}
        got = {layer.name: tuple(layer.kernel.shape) for layer in m.layers if hasattr(layer, "kernel")}
        if got != want:
            raise SystemExit(f"{model}: kernel shapes differ from edgeq.models: {got} vs {want}")
        n = sum(math.prod(s) for s in got.values())
        print(f"{model}: {len(got)} kernels, {n:,} weights match edgeq.models")


def _time(fn: Callable[[], object], runs: int) -> tuple[dict, object]:
    """Wall and CPU seconds of fn() over runs calls (median and all), and the last result."""
    wall, cpu, out = [], [], None
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "wall_s": statistics.median(wall),
        "cpu_s": statistics.median(cpu),
        "wall_runs_s": wall,
        "cpu_runs_s": cpu,
    }, out


def bench(model: str, runs: int) -> dict:
    """Every timing and the plans of one model's shapes."""
    posts = posteriors(model)
    axes = {n: a for n, _, a in SHAPES[model]}
    floor = RAM_FLOOR[model]
    timings: dict[str, dict] = {}
    print(f"{model}: {len(posts)} layers, {sum(p.size for p in posts):,} weights")

    # 1. The exact uncertainty cost at bits 2..8 (LastValueQuantizer's max|mu| grids, built beforehand).
    grids = {p.name: [symmetric_grid(p, b, axis=axes[p.name]) for b in range(2, 9)] for p in posts}
    timings["costs_bits2to8"], _ = _time(lambda: [uncertainty_costs(p, grids[p.name]) for p in posts], runs)
    # 2. best_range at bits 2..8 (histogram, search, exact check against max|mu|), 3. Lloyd LUT levels.
    timings["best_range_bits2to8"], _ = _time(
        lambda: [best_ranges(p, range(2, 9), axes[p.name] is not None, axis=-1) for p in posts], runs
    )
    timings["lloyd_levels_bits2to7_with_costs"], _ = _time(
        lambda: [
            uncertainty_costs(p, [lloyd_grid(p, b, axis=axes[p.name]) for b in range(2, 8)]) for p in posts
        ],
        runs,
    )
    # 4. All options (best_range grids; and with Lloyd-level LUT options as well).
    timings["options"], opts = _time(
        lambda: model_options(posts, standin_byte_cost, channel_axis=axes, clip="best"), runs
    )
    timings["options_with_lloyd_lut"], opts_l = _time(
        lambda: model_options(posts, standin_byte_cost, channel_axis=axes, clip="best", lut_levels=True), runs
    )
    # 5. The planner: front at the default resolution, then the uniform-4-bit flash budget and the choice.
    timings["pareto_front"], front = _time(lambda: pareto_front(opts, ram_floor=floor), runs)
    timings["choose_target4"], _ = _time(lambda: choose(front, flash_of_uniform(opts, 4)), runs)
    timings["planner_total"], _ = _time(
        lambda: choose(pareto_front(opts, ram_floor=floor), flash_of_uniform(opts, 4)), runs
    )
    timings["planner_total_with_lloyd_lut"], front_l = _time(
        lambda: pareto_front(opts_l, ram_floor=floor), runs
    )
    fine = 16 if model == "lenet5" else 256
    timings[f"pareto_front_resolution_{fine}B"], front_f = _time(
        lambda: pareto_front(opts, ram_floor=floor, resolution=fine), runs
    )

    plans = []
    for bits in (2, 3, 4, 6):
        budget = flash_of_uniform(opts, bits)
        uni = make_plan(
            (
                min((o for o in opts[p.name] if o.bits == bits), key=lambda o: (o.flash_bytes, o.cost))
                for p in posts
            ),
            ram_floor=floor,
        )
        for label, fr in (("default", front), ("with Lloyd LUT", front_l)):
            best = choose(fr, budget)
            plans.append(
                {
                    "target_bits": bits,
                    "front": label,
                    "flash_budget": budget,
                    "uniform": {"flash": uni.flash, "ram": uni.ram, "cost": uni.cost},
                    "plan": {
                        "flash": best.flash,
                        "ram": best.ram,
                        "cost": best.cost,
                        "mean_bits": best.mean_bits,
                        "layers": {o.layer: f"{o.bits}b {o.storage}/{o.grid.kind}" for o in best.options},
                    },
                }
            )
    return {
        "layers": [{"name": n, "shape": list(s), "axis": a} for n, s, a in SHAPES[model]],
        "weights": sum(p.size for p in posts),
        "options": sum(len(v) for v in opts.values()),
        "options_with_lloyd_lut": sum(len(v) for v in opts_l.values()),
        "ram_floor": floor,
        "resolution": default_resolution(opts),
        "front_size": len(front),
        "front_size_with_lloyd_lut": len(front_l),
        f"front_size_resolution_{fine}B": len(front_f),
        "ram_levels": len({p.ram for p in front}),
        "timings": timings,
        "plans": plans,
    }


def _md(args: argparse.Namespace, results: dict, env: dict) -> str:
    mach = env["machine"]
    lines = [
        "# Planner benchmark",
        "",
        f"- command: `{env['command']}`",
        f"- commit: {env['commit']}",
        f"- machine: {mach['platform']}; CPU {mach['cpu']}; nproc {mach['nproc']}, "
        f"used {env['cores']} cores; python {mach['python']}, numpy {env['numpy']}",
        f"- load average before / after: {env['load_before']} / {env['load_after']} (other work shared the "
        "machine when these exceed the cores; CPU seconds are the steadier figure then)",
        "- posteriors: synthetic, mu ~ N(0, sqrt(2 / fan_in)), sigma lognormal around 0.4 of that with a "
        "per-layer shift (seed 0); convs per-channel, dense per-tensor",
        f"- options: {', '.join(f'{k} bits {min(v)}..{max(v)}' for k, v in STORAGE_BITS.items())} at "
        "best_range grids; bytes from a STAND-IN cost (payload + 64 B + LUT tables; RAM 0 int8, n INT4/LUT), "
        "not the exporter's model",
        f"- median of {args.runs} runs; target: costs at bits 2..8 and planner (front + budget + choice) "
        f"< {TARGET_S:g} s at VGG-16 shapes",
        "",
    ]
    for model, r in results.items():
        t = r["timings"]
        lines += [
            f"## {model}: {len(r['layers'])} layers, {r['weights']:,} weights, {r['options']} options "
            f"({r['options_with_lloyd_lut']} with Lloyd LUT levels)",
            "",
            f"Front: {r['front_size']:,} plans over {r['ram_levels']} RAM levels at the default resolution "
            f"{r['resolution']:,} B; {r['front_size_with_lloyd_lut']:,} with Lloyd LUT options.",
            "",
            "| step | wall s (median) | CPU s (median) | wall runs (s) |",
            "|---|---|---|---|",
        ]
        for name, v in t.items():
            runs_s = ", ".join(f"{x:.3f}" for x in v["wall_runs_s"])
            lines.append(f"| {name} | {v['wall_s']:.3f} | {v['cpu_s']:.3f} | {runs_s} |")
        lines += [
            "",
            "| target bits | front | flash budget (uniform) | uniform cost | plan flash | plan RAM | "
            "plan cost | plan mean bits | plan |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in r["plans"]:
            lay = ", ".join(f"{k} {v}" for k, v in p["plan"]["layers"].items())
            plan = p["plan"]
            lines.append(
                f"| {p['target_bits']} | {p['front']} | {p['flash_budget']:,} | {p['uniform']['cost']:,.0f} "
                f"| {plan['flash']:,} | {plan['ram']:,} | {plan['cost']:,.0f} | {plan['mean_bits']:.3f} "
                f"| {lay} |"
            )
        lines.append("")
    v = results.get("vgg16", {}).get("timings")
    if v:
        ok_c = v["costs_bits2to8"]["wall_s"] < TARGET_S
        ok_p = v["planner_total"]["wall_s"] < TARGET_S
        lines += [
            f"VGG-16 (limit {TARGET_S:g} s, wall): costs at bits 2..8 "
            f"{v['costs_bits2to8']['wall_s']:.3f} s -> {'PASS' if ok_c else 'FAIL'}; "
            f"planner {v['planner_total']['wall_s']:.3f} s -> "
            f"{'PASS' if ok_p else 'FAIL'}.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write benchmarks/results/planner.md and planner.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--models", default="lenet5,vgg16", help="comma-separated: lenet5, vgg16")
    ap.add_argument("--check-shapes", action="store_true", help="compare the shapes with edgeq.models (TF)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "planner.md")
    args = ap.parse_args(argv)
    if args.check_shapes:
        check_shapes()
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 2:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = {m: bench(m, args.runs) for m in args.models.split(",")}
    env = {
        "command": "python benchmarks/planner.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": commit(MODULES),
        "machine": machine(),
        "cores": cores,
        "numpy": np.__version__,
        "load_before": [round(x, 2) for x in load_before] if load_before else None,
        "load_after": [round(x, 2) for x in os.getloadavg()] if load_before else None,
        "platform": platform.platform(),
    }
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({"env": env, "results": results}, indent=2))
    atomic_write_text(args.out, _md(args, results, env))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    v = results.get("vgg16", {}).get("timings")
    if v:
        ok = v["costs_bits2to8"]["wall_s"] < TARGET_S and v["planner_total"]["wall_s"] < TARGET_S
        print(f"VGG-16 targets: {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
