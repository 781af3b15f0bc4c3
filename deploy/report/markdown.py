"""report.md: the Report as readable tables, section by section."""

from __future__ import annotations

from deploy.report import Report


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def _fmt(key: str):
    return _pct if key == "accuracy" else (lambda v: f"{v:.4f}")


def metric_key(body) -> str:
    """accuracy or mae, whichever the run's task scores."""
    return "accuracy" if "accuracy" in body["models"]["float"] else "mae"


def _models(body) -> list[str]:
    m, key = body["models"], metric_key(body)
    fmt, d, i8 = _fmt(key), m["deployed"], m["int8"]
    return [
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
    ]


def _notes(body) -> list[str]:
    m, key = body["models"], metric_key(body)
    d, t = m["deployed"], body.get("target", {})
    lines = [
        f"- Flash bytes in this table are model bytes (the .tflite the C array holds); the firmware's code "
        "is in the next section. Arena bytes here: host TFLM; the arena for the board's kernel set "
        f"({t.get('kernels', 'reference')}) is in the firmware section.",
        f"- Packing limit (fixed width): {d['packing_limit_bytes']:,} B; entropy limit of the stored values: "
        f"{d.get('entropy_limit_bytes', 0):,} B; "
        f"deployed/limit = {d['ratio_to_packing_limit']:.3f}, "
        f"deployed/int8 = {d['ratio_to_int8']:.3f}.",
        "- LiteRT on model_uncompressed.tflite (it cannot load DECODE), held against TFLM's outputs:",
        "",
        f"  | LiteRT resolver | {key} | bit-exact vs TFLM | rows identical | max diff (LSB) | latency (us) |",
        "  |---|---|---|---|---|---|",
        *(
            f"  | {r} | {_fmt(key)(c[key])} | {c['bit_exact_vs_tflm']} | {100 * c['rows_identical']:.1f}% "
            f"| {c['max_abs_diff']} | {c['latency_us']:.1f} |"
            for r, c in d["litert"].items()
        ),
        "",
        f"- Compressed vs uncompressed inside TFLM, bit-exact: {d['bit_exact_compressed_vs_uncompressed']}.",
        "- Storage variants (flash bytes): " + ", ".join(f"{k} {v:,}" for k, v in d["variants"].items()),
    ]
    if d.get("alt_decompression_bytes"):
        lines.append(
            f"- DECODE writes into {d['alt_decompression_bytes']:,} B of alternate memory "
            "(--decompress-to alt); "
            "the arena figure above includes it."
        )
    if "mc_accuracy" in m["bnn"]:
        lines.append(
            f"- Bayesian twin, {m['bnn']['mc_samples']} Monte Carlo samples: accuracy "
            f"{_pct(m['bnn']['mc_accuracy'])}, expected calibration error {m['bnn']['mc_ece']:.4f}."
        )
    if "board" in body:
        lines.append(f"- Board {body['board']['name']}: {body['board']['message']}")
    return lines


def firmware_rows(t: dict) -> list[tuple[str, str]]:
    """(what, bytes) rows of the firmware on the target: model, runtime, each operator, total, arena."""
    fw = t.get("firmware")
    if not fw:
        return []
    rows = [("model (.tflite in the C array)", f"{fw['model_bytes']:,}")]
    rows.append(("TFLM runtime (interpreter, allocator, app, protocol)", f"{fw['runtime_code_bytes']:,}"))
    rows += [(f"{op} kernel", f"{n:,}") for op, n in fw["operator_code_bytes"].items()]
    if fw.get("shared_code_bytes"):
        rows.append(("helpers the kernels share", f"{fw['shared_code_bytes']:,}"))
    rows.append((f"**firmware flash** ({fw['flash_from']})", f"**{fw['flash_bytes']:,}**"))
    if "estimated_flash_bytes" in fw:
        rows.append(("estimate: model + measured per-operator code", f"{fw['estimated_flash_bytes']:,}"))
    rows.append((f"arena ({t['arena_measured_with']})", f"{t['arena_bytes']:,}"))
    if fw.get("instructions_per_inference"):
        n = fw["instructions_per_inference"]
        rows.append(("instructions per inference (QEMU, not cycles)", f"{n:,}"))
    return rows


def _firmware(body) -> list[str]:
    t = body.get("target", {})
    rows = firmware_rows(t)
    if not rows:
        return []
    fw = t["firmware"]
    head = [
        "",
        f"## Firmware on the target ({fw['kernels']} kernels, Cortex-M4 code)",
        "",
        "| what | bytes |",
        "|---|---|",
    ]
    unmeasured = fw.get("unmeasured_operators") or []
    note = ["", f"Not measured, charged as the largest measured kernel: {', '.join(unmeasured)}."]
    return head + [f"| {a} | {b} |" for a, b in rows] + (note if unmeasured else [])


def _plan(body) -> list[str]:
    unplanned = body["plan"].get("unplanned", [])
    lines = [f"- Not in the plan: {u['name']} ({u['bits']} bits): {u['reason']}." for u in unplanned]
    p = body["plan"]
    if p.get("uniform") and p["method"] not in ("uniform",):
        lines.append(
            f"- {p['method']} returned the uniform plan ({p['layers'][0]['bits']} bits in every layer) at "
            f"target {body['target_bits']:g}."
        )
    lines += [
        "",
        "## Bit plan",
        "",
        "| layer | params | informativeness | bits | quantizer |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['params']:,} | {r['informativeness']:.4g} | {r['bits']} | {r['quantizer']} |"
        for r in body["plan"]["layers"]
    ]
    return lines


def _storage(body) -> list[str]:
    lines = [
        "",
        "## Weight storage in model.tflite",
        "",
        "| tensor | op | shape | stored | LUT bits | distinct values | bytes (est.) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {w['tensor'][:48]} | {w['op']} | {'x'.join(map(str, w['shape']))} | {w['stored']} | "
        f"{w['lut_bits'] or ''} | {w['distinct_values']} | {w['stored_bytes_est']:,} |"
        for w in body["models"]["deployed"]["weights"]
    ]
    return lines


def _pruning(body) -> list[str]:
    pr = body.get("pruning")
    if not pr:
        return []
    lines = ["", f"## Pruning ({pruning_title(pr)}, deployed as {pr['storage']})", ""]
    if pr["channels"]:
        lines += [
            f"{pr['channels_policy']}: {pr['channels_removed']} of {pr['channels_total']} channels removed.",
            "",
            "| layer | channels kept | weights before | weights after | bytes saved at its bits |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {c['name']} | {c['channels_kept']} of {c['channels']} | {c['weights_before']:,} | "
            f"{c['weights_after']:,} | {c['bytes_saved']:,} |"
            for c in pr["channels"]
        ]
        lines.append("")
    if choice := pr.get("channel_choice"):
        lines += ["The choices of channels the planner validated (shares removed, each with its plan):", ""]
        lines += channel_choice_lines(choice) + [""]
    lines += [
        f"{pr['policy']}"
        + ("; kept at zero through QAT" if pr["fraction"] else "")
        + ". Bytes at the plan's fixed width against an ideal entropy coder's floor for the same integers.",
        "",
        "| layer | weights | zeros | sparsity | bits | fixed-width B | entropy B |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['name']} | {r['weights']:,} | {r['zeros']:,} | {r['sparsity']:.1%} | {r['bits']} | "
        f"{r['fixed_width_bytes']:,} | {r['entropy_bytes']:,} |"
        for r in pr["layers"]
    ]
    return lines


def channel_choice_table(choice: dict) -> tuple[list[str], list[list[str]]]:
    """--prune-channels auto's trials (ChannelChoice.to_dict()), in the order tried: (header, rows)."""
    head = ["shares removed", "plan flash B", "mean bits", "validation loss", "removed (mu/sigma)^2"]
    head.append("plan cost")
    rows = []
    for t in choice["trials"]:
        rows.append([
            ", ".join(f"{n} {f:g}" for n, f in t["fractions"].items() if f) or "none",
            "no plan fits" if t["flash_bytes"] is None else f"{t['flash_bytes']:,}",
            "" if t["mean_bits"] is None else f"{t['mean_bits']:.2f}",
            "" if t["val_loss"] is None else f"{t['val_loss']:.4f}",
            f"{t['removed_cost']:,.0f}",
            "" if t["plan_cost"] is None else f"{t['plan_cost']:,.0f}",
        ])  # fmt: skip
    return head, rows


def channel_choice_lines(choice: dict) -> list[str]:
    """channel_choice_table as a Markdown table."""
    head, rows = channel_choice_table(choice)
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def pruning_title(pr: dict) -> str:
    """The flags that pruned the model, as the pruning section's heading names them."""
    fraction = pr["fraction"]  # None, a share, or "auto"
    parts = (
        [f"--prune {fraction if isinstance(fraction, str) else format(fraction, 'g')}"] if fraction else []
    )
    if pr["channels"]:
        parts.append(f"--prune-channels: {pr['channels_removed']} of {pr['channels_total']} channels")
    elif pr.get("channel_choice"):
        parts.append("--prune-channels auto: every channel kept")
    return ", ".join(parts)


def _search(rep: Report) -> list[str]:
    if rep.search is None:
        return []
    lines = [
        "",
        "## Why this model",
        "",
        rep.search.why,
        "",
        "![Pareto front](pareto.png)",
        "",
        "| method | target | mean bits | QAT epochs | storage | flash B | arena B | TFLM score | fits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.method} | {r.target:g} | {r.mean_bits:.2f} | {r.qat_epochs} | {r.storage} | {r.flash_bytes:,} "
        f"| {r.arena_bytes:,} | {r.score:.4f} | {'yes' if r.fits else 'no'}{' (chosen)' * r.chosen} |"
        for r in sorted(rep.search.rows, key=lambda r: r.flash_bytes)
    ]
    return lines


def _device(rep: Report) -> list[str]:
    if rep.device is None:
        return []
    from deploy.device.evaluate import markdown_section

    return ["", markdown_section(rep.device).rstrip("\n")]


def render(rep: Report) -> str:
    """report.md."""
    b = rep.body
    head = [
        f"# edgeq report: {' '.join(str(b['pipeline']).split())}",  # a name with a newline stays one line
        "",
        *(f"**Warning:** {w}\n" for w in b.get("warnings", [])),
        f"Seed {b['seed']}, target {b['target_bits']:g} mean bits, method **{b['plan']['method']}**: "
        f"mean bits **{b['plan']['mean_bits']:.3f}** (paper eq. 8). Deployed storage: "
        f"**{b['models']['deployed']['storage']}**.",
        "",
    ]
    tail = [
        "",
        "![bits per layer](bits_per_layer.png) ![flash bytes](flash_bytes.png)",
        "",
        "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in b["stage_seconds"].items()),
    ]
    parts = head + _models(b) + _notes(b) + _firmware(b) + _plan(b) + _storage(b) + _pruning(b)
    parts += _search(rep) + _device(rep) + tail
    return "\n".join(parts) + "\n"
