"""`edgeq inspect`: operators, tensors, arena, flash and the peak-memory operator of any .tflite."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from deploy.flatbuffer import describe
from deploy.sandbox import ModelNotRunnable, tflm_arena_isolated
from deploy.verify import opcode_name, parse_verified, verify_tflite
from edgeq.errors import EdgeqError

_ITEMSIZE = {"INT8": 1, "UINT8": 1, "INT16": 2, "INT32": 4, "FLOAT32": 4, "INT64": 8, "BOOL": 1, "FLOAT16": 2}


def op_sequence(model_bytes: bytes) -> list[tuple[str, list[int], list[int]]]:
    """(operator name, input tensor indices, output tensor indices) of subgraph 0, in execution order."""
    fb = parse_verified(model_bytes)
    # Names by the schema's rule (deprecated_builtin_code counts): model_editor reads builtin_code only.
    names = [opcode_name(oc) for oc in fb.operatorCodes]
    return [
        (
            names[op.opcodeIndex],
            [int(i) for i in (op.inputs if op.inputs is not None else []) if i >= 0],
            [int(i) for i in (op.outputs if op.outputs is not None else []) if i >= 0],
        )
        for op in fb.subgraphs[0].operators
    ]


def peak_memory_op(model_bytes: bytes, info=None) -> dict:
    """The operator at which the most non-constant bytes are alive, from tensor lifetimes."""
    info = info or describe(model_bytes)
    ops = op_sequence(model_bytes)
    const = {t.index for t in info.tensors if t.bytes_stored > 0}
    first: dict[int, int] = {i: 0 for i in info.inputs}
    last: dict[int, int] = {i: len(ops) - 1 for i in info.outputs}
    for k, (_, ins, outs) in enumerate(ops):
        for i in outs:
            first.setdefault(i, k)
        for i in ins:
            if i not in const:
                last[i] = max(last.get(i, k), k)
    size = {t.index: int(np.prod(t.shape or (1,))) * _ITEMSIZE.get(t.type, 1) for t in info.tensors}
    live = [sum(size[i] for i in first if first[i] <= k <= last.get(i, first[i])) for k in range(len(ops))]
    k = int(np.argmax(live)) if live else 0
    return {"index": k, "op": ops[k][0] if ops else None, "live_bytes": int(live[k]) if live else 0}


def inspect_model(path: Path) -> dict:
    """Everything `edgeq inspect` shows, as a JSON-ready dict."""
    path = Path(path)
    if not path.is_file():
        raise EdgeqError(f"{path} does not exist; pass a .tflite file")
    data = path.read_bytes()
    # Before anything reads further: TFLM's C reader trusts every offset and index in the file.
    verify_tflite(data, label=str(path))
    info = describe(data)
    try:
        # In a child process: a file that still crashes TFLM costs one line (FlatbufferError), not edgeq.
        arena: int | None = tflm_arena_isolated(data, label=str(path))
        arena_note = "TFLM recording allocator, one invoke"
    except ModelNotRunnable as e:
        arena, arena_note = None, e.reason
    tensors = []
    for t in info.tensors:
        row = asdict(t)
        row["lut_bits"] = t.lut_bits
        row.pop("lut", None)
        tensors.append(row)
    return {
        "model": str(path),
        "flash_bytes": info.flash_bytes,
        "arena_bytes": arena,
        "arena_note": arena_note,
        "operators": info.ops,
        "peak_memory_operator": peak_memory_op(data, info),
        "tensors": tensors,
    }


def to_text(d: dict) -> str:
    """A terminal table of inspect_model's dict."""
    peak = d["peak_memory_operator"]
    arena = f"{d['arena_bytes']:,} B" if d["arena_bytes"] is not None else f"n/a ({d['arena_note']})"
    lines = [
        f"{d['model']}: flash {d['flash_bytes']:,} B, arena {arena}",
        f"operators: {', '.join(d['operators'])}",
        f"peak memory at operator #{peak['index']} {peak['op']}: {peak['live_bytes']:,} B alive",
        "",
        f"{'#':>4} {'type':<8} {'shape':<18} {'bytes':>9} {'distinct':>8} {'lut':>4}  name",
    ]
    for t in d["tensors"]:
        shape = "x".join(str(s) for s in t["shape"]) or "-"
        distinct = "" if t["distinct_values"] is None else str(t["distinct_values"])
        lut = "" if t["lut_bits"] is None else str(t["lut_bits"])
        lines.append(
            f"{t['index']:>4} {t['type']:<8} {shape:<18} {t['bytes_stored']:>9,} {distinct:>8} {lut:>4}  "
            f"{(t['name'] or '')[:60]}"
        )
    return "\n".join(lines)
