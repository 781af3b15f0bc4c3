"""report.json, report.md and plots: what was measured, in the shape every edgeq run shares."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from edgeq.io import atomic_write_text


def _r(v: float, n: int = 4) -> float:
    return round(float(v), n)


def build(
    *,
    spec,
    opts,
    target,
    method,
    plan,
    sizes,
    info,
    float_scores,
    det_scores,
    qat_scores,
    bnn_quality,
    int8,
    deployed,
    uncompressed,
    chosen,
    variants,
    litert,
    vs_uncompressed,
    packing_limit,
    allocate_s,
    stage_times,
    board,
    carrays,
    slicing=None,
) -> dict:
    """Assemble report.json (paths relative to the output folder)."""
    layers = [
        {
            "name": n,
            "bits": plan.layers[n].bits,
            "params": int(sizes[n]),
            "informativeness": _r(info.get(n, float("nan")), 6),
            "quantizer": plan.layers[n].quantizer,
        }
        for n in plan.layers
    ]
    storage_rows = []
    for t in chosen.tensors:
        bits = t.lut_bits if t.lut_bits else (4 if t.stored_type == "INT4" else 8)
        storage_rows.append(
            {
                "tensor": t.name or f"{t.op.lower()} #{t.index}",
                "op": t.op,
                "shape": list(t.shape),
                "stored": t.stored_type,
                "lut_bits": t.lut_bits,
                "distinct_values": t.distinct,
                "stored_bytes_est": int(np.ceil(np.prod(t.shape) * bits / 8)),
            }
        )
    dep_fig = deployed["figures"]
    rep = {
        "pipeline": spec.name,
        "seed": opts.seed,
        "target_bits": float(target),
        "plan": {
            "method": method,
            "mean_bits": _r(plan.mean_bits(sizes)),
            "layers": layers,
            "allocation_seconds": _r(allocate_s, 4),
        },
        "models": {
            "float": {k: v if k == "flash_bytes" else _r(v) for k, v in float_scores.items()},
            "bnn": {
                **{k: _r(v) for k, v in det_scores.items()},
                **(
                    {
                        "mc_accuracy": _r(bnn_quality.accuracy),
                        "mc_ece": _r(bnn_quality.ece),
                        "mc_samples": bnn_quality.samples,
                    }
                    if bnn_quality
                    else {}
                ),
            },
            "qat_keras": {k: _r(v) for k, v in qat_scores.items()},
            "int8": {"tflite": "model_int8.tflite", **int8["figures"]},
            "deployed": {
                "tflite": "model.tflite",
                "storage": chosen.kind,
                **dep_fig,
                "packing_limit_bytes": int(packing_limit),
                # The headline: LiteRT's reference kernels, the ones TFLM's kernels are ported from.
                "bit_exact_tflm_vs_litert": next(
                    c.vs_tflm.bit_exact for c in litert if c.resolver == "BUILTIN_REF"
                ),
                "litert": {
                    c.resolver: {
                        **{k: _r(v) for k, v in c.scores.items()},
                        "bit_exact_vs_tflm": c.vs_tflm.bit_exact,
                        "rows_identical": _r(c.vs_tflm.rows_identical),
                        "max_abs_diff": c.vs_tflm.max_abs_diff,
                        "latency_us": _r(c.latency_us, 2),
                    }
                    for c in litert
                },
                "bit_exact_compressed_vs_uncompressed": vs_uncompressed.bit_exact,
                "uncompressed_tflite": "model_uncompressed.tflite",
                "uncompressed_flash_bytes": uncompressed["figures"]["flash_bytes"],
                "uncompressed_arena_bytes": uncompressed["figures"]["arena_bytes"],
                "variants": {v.kind: len(v.model) for v in variants},
                "weights": storage_rows,
            },
        },
        "artifacts": {
            "c_source": Path(carrays.source).name,
            "c_header": Path(carrays.header).name,
            "firmware": "firmware",
            "test_data": "test_data.npz",
            "plan": "bitplan.json",
            "float_model": "model_float.keras",
        },
        "stage_seconds": stage_times,
    }
    if slicing is not None:
        rep["slicing"] = {
            "decode_budget_bytes": slicing.budget,
            "layers": [dataclasses.asdict(r) for r in slicing.rows],
        }
    int8_flash = rep["models"]["int8"]["flash_bytes"]
    rep["models"]["deployed"]["ratio_to_int8"] = _r(dep_fig["flash_bytes"] / int8_flash)
    rep["models"]["deployed"]["ratio_to_packing_limit"] = _r(dep_fig["flash_bytes"] / packing_limit)
    for k in ("latency_tflm_us",):
        rep["models"]["int8"][k] = _r(rep["models"]["int8"][k], 2)
        rep["models"]["deployed"][k] = _r(rep["models"]["deployed"][k], 2)
    if board is not None:
        from deploy.boards import fit_check

        fit = fit_check(board, dep_fig["flash_bytes"], dep_fig["arena_bytes"])
        rep["board"] = {
            "name": board.name,
            "fits": fit.fits,
            "flash_margin_bytes": fit.flash_margin,
            "ram_margin_bytes": fit.ram_margin,
            "message": fit.message,
        }
    return rep


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def markdown(rep: dict) -> str:
    """report.md: the same figures as report.json, as readable tables."""
    m, plan = rep["models"], rep["plan"]
    key = "accuracy" if "accuracy" in m["float"] else "mae"
    fmt = _pct if key == "accuracy" else (lambda v: f"{v:.4f}")
    d, i8 = m["deployed"], m["int8"]
    lines = [
        f"# edgeq report: {rep['pipeline']}",
        "",
        f"Seed {rep['seed']}, target {rep['target_bits']:g} mean bits, method **{plan['method']}**: "
        f"mean bits **{plan['mean_bits']:.3f}** (paper eq. 8). Deployed storage: **{d['storage']}**.",
        "",
        "## Models",
        "",
        f"| model | {key} (Keras) | {key} (TFLM) | flash bytes | arena bytes | TFLM latency (us) |",
        "|---|---|---|---|---|---|",
        f"| float | {fmt(m['float'][key])} | | {m['float']['flash_bytes']:,} | | |",
        f"| Bayesian twin, mean weights | {fmt(m['bnn'][key])} | | | | |",
        f"| QAT (Keras, fake-quant) | {fmt(m['qat_keras'][key])} | | | | |",
        f"| int8 (PTQ of float) | | {fmt(i8[key + '_tflm'])} | {i8['flash_bytes']:,} | {i8['arena_bytes']:,} "
        f"| {i8['latency_tflm_us']:.1f} |",
        f"| uncompressed (QAT, INT4 where <= 4 bits) | | | {d['uncompressed_flash_bytes']:,} "
        f"| {d['uncompressed_arena_bytes']:,} | |",
        f"| **deployed** ({d['storage']}) | | **{fmt(d[key + '_tflm'])}** | **{d['flash_bytes']:,}** "
        f"| {d['arena_bytes']:,} | {d['latency_tflm_us']:.1f} |",
        "",
        f"- Packing limit: {d['packing_limit_bytes']:,} B; "
        f"deployed/limit = {d['ratio_to_packing_limit']:.3f}, "
        f"deployed/int8 = {d['ratio_to_int8']:.3f}.",
        "- LiteRT on model_uncompressed.tflite (it cannot load DECODE), held against TFLM's outputs:",
        "",
        f"  | LiteRT resolver | {key} | bit-exact vs TFLM | rows identical | max diff (LSB) | latency (us) |",
        "  |---|---|---|---|---|---|",
        *(
            f"  | {r} | {fmt(c[key])} | {c['bit_exact_vs_tflm']} | {100 * c['rows_identical']:.1f}% "
            f"| {c['max_abs_diff']} | {c['latency_us']:.1f} |"
            for r, c in d["litert"].items()
        ),
        "",
        f"- Compressed vs uncompressed inside TFLM, bit-exact: {d['bit_exact_compressed_vs_uncompressed']}.",
        *(
            [
                f"- DECODE writes into {d['alt_decompression_bytes']:,} B of alternate memory "
                "(--decompress-to alt); "
                f"the arena figure above includes it."
            ]
            if d.get("alt_decompression_bytes")
            else []
        ),
        "- Storage variants (flash bytes): " + ", ".join(f"{k} {v:,}" for k, v in d["variants"].items()),
    ]
    if "mc_accuracy" in m["bnn"]:
        lines.append(
            f"- Bayesian twin, {m['bnn']['mc_samples']} Monte Carlo samples: accuracy "
            f"{_pct(m['bnn']['mc_accuracy'])}, expected calibration error {m['bnn']['mc_ece']:.4f}."
        )
    if "board" in rep:
        lines.append(f"- Board {rep['board']['name']}: {rep['board']['message']}")
    lines += [
        "",
        "## Bit plan",
        "",
        "| layer | params | informativeness | bits | quantizer |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['params']:,} | {r['informativeness']:.4g} | {r['bits']} | {r['quantizer']} |"
        for r in plan["layers"]
    ]
    lines += [
        "",
        "## Weight storage in model.tflite",
        "",
        "| tensor | op | shape | stored | LUT bits | distinct values | bytes (est.) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {w['tensor'][:48]} | {w['op']} | {'x'.join(map(str, w['shape']))} | {w['stored']} | "
        f"{w['lut_bits'] or ''} | {w['distinct_values']} | {w['stored_bytes_est']:,} |"
        for w in d["weights"]
    ]
    lines += [
        "",
        "![bits per layer](bits_per_layer.png) ![flash bytes](flash_bytes.png)",
        "",
        "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in rep["stage_seconds"].items()),
        "",
    ]
    return "\n".join(lines)


def plots(folder: Path, rep: dict) -> None:
    """Write bits_per_layer.png (bits, informativeness) and flash_bytes.png (model sizes side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = rep["plan"]["layers"]
    names = [r["name"] for r in layers]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, [r["bits"] for r in layers], color="tab:blue")
    ax.set_ylabel("bits")
    ax2 = ax.twinx()
    ax2.plot(names, [r["informativeness"] for r in layers], "o-", color="tab:orange")
    ax2.set_ylabel("informativeness |mu|/sigma (mean)")
    ax.set_title(f"{rep['pipeline']}: bits per layer ({rep['plan']['method']})")
    fig.tight_layout()
    _save(fig, folder / "bits_per_layer.png")
    d = rep["models"]["deployed"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = ["float", "int8", "uncompressed", "deployed", "packing limit"]
    vals = [
        rep["models"]["float"]["flash_bytes"],
        rep["models"]["int8"]["flash_bytes"],
        d["uncompressed_flash_bytes"],
        d["flash_bytes"],
        d["packing_limit_bytes"],
    ]
    ax.bar(labels, vals, color=["silver", "gray", "tab:purple", "tab:green", "tab:red"])
    ax.set_ylabel("bytes")
    ax.set_title("flash bytes")
    fig.tight_layout()
    _save(fig, folder / "flash_bytes.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def write(folder: Path, rep: dict) -> None:
    """Write report.json, report.md and the plots into folder."""
    atomic_write_text(folder / "report.json", json.dumps(rep, indent=2))
    atomic_write_text(folder / "report.md", markdown(rep))
    plots(folder, rep)
