"""Benchmark: `--prune` on LeNet-5/MNIST: pruned, entropy-coded weights against the packing limit (#18).

    python benchmarks/lenet5_prune.py [--data mnist.npz] [--prune 0.8,0.9,0.95] [--targets 3,2]
                                      [--channels 0] [--bits 4,3,2] [--qat-epochs N] [--verify-rows 500]

One process trains the LeNet-5 pipeline's float model and twin once (deploy.app.train_pipeline, the
pipeline's epochs). For each --channels fraction above 0, edgeq.training.shrink then removes that share of
every hidden layer's output channels, fine-tunes the smaller model and trains its twin (`edgeq run
--prune-channels C`). Then, for each (--prune fraction, planner target): deploy.app.make_candidate with
RunOptions(prune=fraction), as `edgeq run --prune F --target-bits T` does it: the least informative weights
of each layer zeroed before QAT and held at zero through it, then exported with --storage auto (reference
kernels, 16 KiB decode budget), which now builds INT4, LUT, PRUNE and HUFFMAN, each verified bit for bit
in TFLM against the converted model. Every variant is measured: model bytes, TFLM arena, host TFLM latency
(median of 50 invokes) and, beside them, the plan's fixed-width packing limit and the entropy limit of its
stored integers. Accuracy is the deployed model's, in TFLM over all 10,000 test images (the variants are
bit-identical to it on the verified rows).

Peers from the same float model and epochs, no edgeq code in their quantization path: the converter's int8
PTQ and plain TF-MOT uniform QAT at --bits (benchmarks/lenet5_front.py peer_rows).

Targets (issue 18): >= 99.3% at <= 80 KB (81,920 B) model flash with arena <= 64 KB; deployed flash below
the plan's fixed-width packing limit. Writes benchmarks/results/lenet5_prune.md and .json (with --channels
above 0: lenet5_prune_channels.md, .json).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from arglists import floats  # noqa: E402
from provenance import commit, header_lines, run_header  # noqa: E402

import edgeq  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from edgeq.io import atomic_write_text  # noqa: E402

FLASH_TARGET, ARENA_TARGET, ACC_TARGET = 80 * 1024, 64 * 1024, 99.3


def _f(v: float | str) -> str:
    """A pruning fraction as the tables print it (auto stays a word)."""
    return v if isinstance(v, str) else f"{v:g}"


def variant_rows(cand, trained, fraction: float, target: float, score, channels: float = 0.0) -> list[dict]:
    """Every stored variant of one pruned candidate: bytes, arena, latency; the limits beside them."""
    from deploy.export.limits import packing_limit
    from deploy.flatbuffer import entropy_limit
    from deploy.measure import median_latency_us
    from deploy.measure.tflm import arena_bytes, io_quant, quantize_input, tflm_interpreter

    ex = cand.exported
    x = trained.splits.x_test[:1]
    limit = packing_limit(trained.float_model, cand.plan.bits)
    entropy = entropy_limit(ex.uncompressed)
    acc = score(ex.deployed.model)
    rows = []
    for v in ex.variants:
        interp = tflm_interpreter(v.model)
        q = io_quant(interp, "input")
        interp.set_input(quantize_input(x[0], q).reshape(q.shape), 0)
        rows.append(
            {
                "kernels": "reference",  # host TFLM's arena: the reference kernels'
                "channels": channels,
                "parameters": int(trained.float_model.count_params()),
                "prune": fraction,
                "zeros": cand.plan.meta.get("zeros") or {},  # --prune auto: the planner's share per layer
                "target_bits": target,
                "bits": dict(cand.plan.bits),
                "mean_bits": round(cand.plan.mean_bits(trained.sizes), 3),
                "storage": v.kind,
                "deployed": v.kind == ex.deployed.kind,
                "tflm_accuracy": acc,
                "model_bytes": len(v.model),
                "arena_bytes": arena_bytes(v.model),
                "latency_us": round(median_latency_us(interp.invoke), 1),
                "packing_limit_bytes": limit,
                "entropy_limit_bytes": entropy,
            }
        )
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Per candidate: PRUNE's and HUFFMAN's host latency over LUT's and INT4's."""
    out = []
    for key in dict.fromkeys((r.get("channels", 0.0), r["prune"], r["target_bits"]) for r in rows):
        sel = [r for r in rows if (r.get("channels", 0.0), r["prune"], r["target_bits"]) == key]
        lat = {r["storage"]: r["latency_us"] for r in sel}
        out.append(
            {
                "channels": key[0],
                "prune": key[1],
                "target_bits": key[2],
                **{
                    f"{a}/{b}": round(lat[a] / lat[b], 2)
                    for a in ("prune", "huffman")
                    for b in ("lut", "int4")
                    if a in lat and b in lat
                },
            }
        )
    return out


def dominated(peers: list[dict], rows: list[dict]) -> list[dict]:
    """Issue 19's LeNet target per TF-MOT row (reference kernels): the smallest variant with at least its
    accuracy and at most its model bytes and arena, or none."""
    from lenet5_front import dominating

    out = []
    for p in peers:
        if p["row"].startswith("TF-MOT") and p["kernels"] == "reference":
            d = dominating(p, rows)
            keep = ("channels", "prune", "target_bits", "storage", "tflm_accuracy", "model_bytes")
            keep += ("arena_bytes",)
            out.append({"peer": p["row"], "met": d is not None, "edgeq": d and {k: d[k] for k in keep}})
    return out


def markdown(res: dict) -> str:
    from lenet5_front import target_lines

    e = res["epochs"]
    lines = [
        "# LeNet-5/MNIST with `--prune`: pruned, entropy-coded weights in TFLM (issue 18)",
        "",
        *header_lines(res),
        "",
        f"One float model (seed {res['seed']}, float {e['float']} / twin {e['bnn']} epochs, float Keras "
        f"{res['float_accuracy']:.2f}%), one split, QAT {e['qat']} epochs for every QAT row. edgeq rows: "
        "`--prune F --target-bits T` (the planner; each layer's least informative weights zeroed and kept at "
        "zero through QAT; with channels removed > 0, `--prune-channels C` first: that share of each hidden "
        "layer's output channels removed, the smaller model fine-tuned for the float epochs, given its own "
        "twin), --storage auto on the reference kernels with 16 KiB slices, which builds INT4, "
        "LUT, PRUNE and HUFFMAN, each verified bit for bit in TFLM. Accuracy: the deployed model in host "
        "TFLM over all 10,000 test images. Model = .tflite bytes (DECODE's 9.1 KB of Cortex-M4 code, the "
        "same for LUT, PRUNE and HUFFMAN, is not in it); arena = host TFLM (reference kernels); latency = "
        "host TFLM median of 50 invokes. Packing limit = the plan's bits at fixed width; entropy limit = "
        "sum of n x H(stored integers) / 8 plus the biases.",
        "",
        *target_lines(res["targets"]),
        "",
        "## Every variant",
        "",
        "| channels removed | parameters | prune | target | mean bits | storage | TFLM acc | model B "
        "| packing limit B | entropy limit B | arena B | latency us |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        mark = " (deployed)" if r["deployed"] else ""
        lines.append(
            f"| {r.get('channels', 0.0):g} | {r.get('parameters', 0):,} | "
            f"{_f(r['prune'])} | {r['target_bits']:g} | {r['mean_bits']:.2f} | {r['storage']}{mark} | "
            f"{r['tflm_accuracy']:.2f} | {r['model_bytes']:,} | {r['packing_limit_bytes']:,} | "
            f"{r['entropy_limit_bytes']:,} | {r['arena_bytes']:,} | {r['latency_us']:,.0f} |"
        )
    keys = list(dict.fromkeys(k for r in res["ratios"] for k in r if "/" in k))  # unpruned rows have none
    if keys:
        lines += [
            "",
            "## Decode cost: host TFLM latency ratios",
            "",
            "| channels | prune | target | " + " | ".join(keys) + " |",
            "|---:|---:|---:|" + "---:|" * len(keys),
        ]
    for r in res["ratios"] if keys else []:
        lines.append(
            f"| {r.get('channels', 0.0):g} | {_f(r['prune'])} | {r['target_bits']:g} | "
            + " | ".join(f"{r[k]:.2f}" if k in r else "—" for k in keys)
            + " |"
        )
    lines += [
        "",
        "## Peers",
        "",
        "| row | TFLM acc | model B | arena B (reference) |",
        "|---|---:|---:|---:|",
        *[
            f"| {p['row']} | {p['tflm_accuracy']:.2f} | {p['model_bytes']:,} | {p['arena_bytes']:,} |"
            for p in res["peers"]
            if p["kernels"] == "reference"
        ],
    ]
    if res.get("dominated"):
        lines += [
            "",
            "## TF-MOT rows dominated (issue 19: accuracy >=, model bytes and arena <=, reference kernels)",
            "",
            "| TF-MOT row | edgeq variant | TFLM acc | model B | arena B |",
            "|---|---|---:|---:|---:|",
        ]
        for d in res["dominated"]:
            e = d["edgeq"]
            if not e:
                lines.append(f"| {d['peer']} | none | — | — | — |")
                continue
            lines.append(
                f"| {d['peer']} | channels {e['channels']:g}, prune {_f(e['prune'])}, target "
                f"{e['target_bits']:g}, {e['storage']} | {e['tflm_accuracy']:.2f} | {e['model_bytes']:,} | "
                f"{e['arena_bytes']:,} |"
            )
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> list[dict]:
    """Issue 18's LeNet-5 targets over the measured variants."""
    ok = [
        r
        for r in rows
        if r["tflm_accuracy"] >= ACC_TARGET
        and r["model_bytes"] <= FLASH_TARGET
        and r["arena_bytes"] <= ARENA_TARGET
    ]
    best = max(rows, key=lambda r: (r["tflm_accuracy"], -r["model_bytes"]))  # most accurate, then smallest
    small = min(rows, key=lambda r: r["model_bytes"])

    def say(r: dict) -> str:
        return (
            f"{r['tflm_accuracy']:.2f}% at {r['model_bytes']:,} B, arena {r['arena_bytes']:,} B "
            f"(channels {r.get('channels', 0.0):g}, prune {_f(r['prune'])}, target {r['target_bits']:g}, "
            f"{r['storage']})"
        )

    below = [r for r in rows if r["model_bytes"] < r["packing_limit_bytes"]]
    return [
        {
            "target": ">= 99.3% TFLM at <= 80 KB model flash, arena <= 64 KB",
            "measured": say(min(ok, key=lambda r: r["model_bytes"]))
            if ok
            else f"most accurate {say(best)}; smallest {say(small)}",
            "met": bool(ok),
        },
        {
            "target": "deployed flash below the plan's fixed-width packing limit",
            "measured": "; ".join(
                f"prune {_f(r['prune'])} t{r['target_bits']:g} {r['storage']}: {r['model_bytes']:,} "
                f"< {r['packing_limit_bytes']:,}"
                for r in below[:4]
            )
            or "none",
            "met": bool(below),
        },
    ]


def main(argv: list[str] | None = None) -> int:
    from lenet5_front import Scorer, beside, lenet_parser, missing_data, peer_rows, trained_pipeline

    ap = lenet_parser(__doc__, targets="3,2", bits="4,3,2")
    ap.add_argument(
        "--prune",
        type=lambda text: floats(text, words=("auto",)),
        default="0.8,0.9,0.95",
        help="pruning fractions, or auto (the planner's zeros)",
    )
    ap.add_argument(
        "--channels",
        type=floats,
        default="0",
        help="structured pruning fractions (0: none; else lenet5_prune_channels)",
    )
    ap.add_argument("--qat-epochs", type=int, default=None, help="QAT epochs (default: the pipeline's)")
    args = ap.parse_args(argv)
    if missing_data(args.data):
        return 2
    fractions = args.prune
    channel_fractions, targets_bits = args.channels, args.targets

    from deploy.app import make_candidate
    from edgeq.errors import PlanError
    from edgeq.training import shrink

    started_at = commit()  # the code that runs: later commits must not relabel it
    t_start = time.monotonic()
    log = lambda text: print(f"[{time.monotonic() - t_start:6.0f} s] {text}", flush=True)  # noqa: E731
    with trained_pipeline(args.data, args.seed, args.epochs, args.qat_epochs) as (
        spec,
        base,
        trained,
        float_acc,
    ):
        s = trained.splits
        log("trained the float model and its twin")
        score = Scorer(s.x_test, s.y_test)
        peers = peer_rows(trained, spec, args.seed, args.bits, score, log)
        rows = []
        for channels in channel_fractions:
            # the smaller model, fine-tuned, with its own twin (as `edgeq run --prune-channels` makes it)
            pruned = shrink(spec, trained, channels, args.seed) if channels else trained
            if channels:
                log(f"removed {channels:g} of the channels: {pruned.float_model.count_params():,} parameters")
            # export verifies each variant on verify_rows test images; accuracy below is over all of them
            short = dataclasses.replace(
                pruned, splits=dataclasses.replace(s, x_test=s.x_test[: args.verify_rows])
            )
            for fraction in fractions:
                for target in targets_bits:
                    opts = dataclasses.replace(base, prune=fraction or None)
                    try:
                        cand = make_candidate(short, spec, opts, "planner", target, spec.qat_epochs)
                    except PlanError as e:  # e.g. a target below what even the zeros reach
                        log(f"channels {channels:g} prune {_f(fraction)} t{target:g}: no plan ({e})")
                        continue
                    for r in variant_rows(cand, pruned, fraction, target, score, channels):
                        rows.append(r)
                        log(
                            f"channels {channels:g} prune {_f(fraction)} t{target:g} {r['storage']:8s}: TFLM "
                            f"{r['tflm_accuracy']:.2f}% model {r['model_bytes']:,} B (limit "
                            f"{r['packing_limit_bytes']:,}, entropy {r['entropy_limit_bytes']:,}) arena "
                            f"{r['arena_bytes']:,} B {r['latency_us']:.0f} us"
                        )
    res = {
        **run_header("lenet5_prune.py", argv, started_at, args.seed, spec, float_acc),
        "rows": rows,
        "ratios": ratios(rows),
        "targets": targets(rows),
        "peers": peers,
        "dominated": dominated(peers, rows),
        "seconds": round(time.monotonic() - t_start, 1),
        "beside": beside(),
    }
    out = Path(args.out)
    name = args.name or ("lenet5_prune" if channel_fractions == [0.0] else "lenet5_prune_channels")
    atomic_write_text(out / f"{name}.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(out / f"{name}.md", markdown(res))
    for t in res["targets"]:
        log(f"{'met' if t['met'] else 'NOT met'}: {t['target']}: {t['measured']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
