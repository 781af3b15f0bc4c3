"""Benchmark: the flash each TFLM operator's code costs on a Cortex-M4, measured from the linked firmware.

    python benchmarks/code_size.py [--tflm-root DIR] [--build STORAGE=OUT_DIR ...] [--jobs 2] [--cold]

The digits pipeline runs (2 epochs) with INT4 and with LUT storage into a temporary folder (or --build names
an `edgeq run` output folder for int4 / lut). The INT4 run's rendered firmware is the base: for each kernel
set (reference, CMSIS-NN) deploy.device.qemu builds variants of it for QEMU mps2-an386 whose main.cc differs
only in the op resolver: one with an empty resolver (the runtime: main.cc, the protocol, the board files, the
TFLM interpreter and allocator, newlib), and one per operator with that operator's `resolver.AddXxx()` alone.
runtime = flash(empty) - the model array's bytes; an operator's bytes = flash(it alone) - flash(empty). Flash
is .text + .rodata + .data of the ELF, as build_firmware reports it.

Operators share helpers (kernel_util, the quantization helpers, libgcc's double arithmetic, format strings):
summed alone they overshoot a real firmware by 13-17%. The linker maps of the same builds say which input
sections (and, for mergeable strings, which strings) each operator adds; those two or more add become
shared pieces, each kept with the set of operators that link it, and an operator's own bytes are its
measured ones less its pieces. main.cc's resolver code is fitted from two more variants (MIX, and every
operator at once). deploy.firmware.code_size charges a firmware runtime + its operators' own bytes + each
piece any of them links, once. The maps also say which objects each operator pulls in; for DECODE that
names the decoders it links.

Additivity: the real INT4 and LUT firmware of the digits runs are built unmodified and their flash compared
with what deploy.firmware.code_size makes of their operators, plus the model's bytes.

Writes deploy/firmware/code_size.json (the table deploy.firmware.code_size loads, with its provenance) and
benchmarks/results/code_size.md. Builds use the TFLM library cache (~/.cache/edgeq/tflm) unless --cold asks
for a fresh one. With --ops or --kernels (a partial run) the data file is left alone unless --data names one.
Exit status 0 when every additivity check is within 3%, 1 otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import commit, machine  # noqa: E402

from deploy.device import qemu  # noqa: E402
from deploy.firmware import code_size  # noqa: E402
from deploy.flatbuffer import DECODE_OP, describe, resolver_calls  # noqa: E402
from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "code_size.md"
DATA = ROOT / "deploy" / "firmware" / "code_size.json"
STORAGES = ("int4", "lut")
# What edgeq's models produce (CONV_2D ... CONCATENATION, DECODE for LUT/PRUNE/HUFFMAN storage) and what
# converted Keras models commonly hold besides; names as deploy.flatbuffer.describe(model).ops has them.
OPS = (
    "FULLY_CONNECTED",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "MAX_POOL_2D",
    "AVERAGE_POOL_2D",
    "RESHAPE",
    "SOFTMAX",
    "ADD",
    "SUB",
    "MUL",
    "MEAN",
    "PAD",
    "CONCATENATION",
    "QUANTIZE",
    "DEQUANTIZE",
    "LOGISTIC",
    "TANH",
    "RELU",
    "RELU6",
    "LEAKY_RELU",
    "HARD_SWISH",
    "STRIDED_SLICE",
    "TRANSPOSE",
    "SHAPE",
    "PACK",
    "SQUEEZE",
    "EXPAND_DIMS",
    "RESIZE_NEAREST_NEIGHBOR",
    "TRANSPOSE_CONV",
    "BATCH_MATMUL",
    "UNIDIRECTIONAL_SEQUENCE_LSTM",
    DECODE_OP,
)
# The DECODE kernel (kernels/decode.cc) picks its decoder by the tensor's decode type at run time, so all
# of these are linked whenever DECODE is registered; each decoder is one object of the tree.
DECODERS = {
    "LUT": "tensorflow/lite/micro/kernels/decode_state_lut.cc",
    "PRUNE": "tensorflow/lite/micro/kernels/decode_state_prune.cc",
    "HUFFMAN": "tensorflow/lite/micro/kernels/decode_state_huffman.cc",
}
TOLERANCE = 0.03  # the additivity check: predicted flash within 3% of the ELF's
_RESOLVER_BLOCK = re.compile(
    r"(static tflite::MicroMutableOpResolver<kOpCount> resolver;\n)"
    r"((?:  if \(resolver\.\w+\(\) != kTfLiteOk\) \{\n[^\n]*\n[^\n]*\n  \}\n)*)"
)
_OP_COUNT = re.compile(r"constexpr int kOpCount = \d+;")


def run_pipeline(out_dir: Path, storage: str) -> Path:
    """`edgeq run pipelines/digits.py --out out_dir --storage storage --epochs 2 --quiet`; returns out_dir.

    Two epochs: only the model's operators and size matter here, not its accuracy.
    """
    entry = "import sys; from deploy.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", entry, "run", str(ROOT / "pipelines" / "digits.py"), "--out", str(out_dir)]
    cmd += ["--storage", storage, "--epochs", "2", "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise EdgeqError(f"edgeq run --storage {storage} failed: {(r.stderr or r.stdout).strip()[-2000:]}")
    return out_dir


# ------------------------------------------------------------------------------------------ variants


def resolver_block(calls: list[str]) -> str:
    """The resolver's Add calls as main.cc.j2 renders them (each with its MicroPrintf and return)."""
    return "".join(
        f"  if (resolver.{c}() != kTfLiteOk) {{\n"
        f'    MicroPrintf("edgeq: resolver.{c}() failed");\n'
        "    return -2;\n"
        "  }\n"
        for c in calls
    )


def with_resolver(main_cc: str, calls: list[str]) -> str:
    """main_cc with its resolver holding exactly calls (kOpCount >= 1: a zero-length array is not C++)."""
    blocks = _RESOLVER_BLOCK.findall(main_cc)
    if len(blocks) != 1 or len(_OP_COUNT.findall(main_cc)) != 1:
        raise EdgeqError(
            "main.cc has no single resolver block: firmware_templates/tflm_app/main.cc.j2 changed?"
        )
    text = _RESOLVER_BLOCK.sub(lambda m: m.group(1) + resolver_block(calls), main_cc)
    return _OP_COUNT.sub(f"constexpr int kOpCount = {max(1, len(calls))};", text)


def make_variant(base_fw: Path, dest: Path, calls: list[str]) -> Path:
    """dest/firmware: base_fw's top-level files (the CMake flavour) with main.cc's resolver set to calls."""
    fw = dest / "firmware"
    fw.mkdir(parents=True, exist_ok=True)
    for p in base_fw.iterdir():
        if p.is_file() and p.name != "main.cc":
            # Unchanged copies keep their mtime; the model array is compiled again anyway (build_firmware).
            shutil.copy2(p, fw / p.name)
    text = with_resolver((base_fw / "main.cc").read_text(), calls)
    if not (fw / "main.cc").is_file() or (fw / "main.cc").read_text() != text:
        atomic_write_text(fw / "main.cc", text)
    return dest


def model_symbol(fw: Path) -> str:
    """The model array's name, from the rendered model_data.h."""
    for h in sorted(fw.glob("*.h")):
        m = re.search(r"extern const unsigned char (\w+)\[\];", h.read_text())
        if m:
            return m.group(1)
    raise EdgeqError(f"{fw} has no model array header (extern const unsigned char g_..._model_data[])")


def symbol_size(elf: Path, symbol: str) -> int:
    """Bytes of one symbol of elf (arm-none-eabi-nm -S)."""
    nm = qemu.check_toolchain()["arm-none-eabi-nm"]
    r = subprocess.run([nm, "-S", "--defined-only", str(elf)], capture_output=True, text=True, check=True)
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3] == symbol:
            return int(parts[1], 16)
    raise EdgeqError(f"{elf} has no symbol {symbol}")


# --------------------------------------------------------------------------------------------- the map

_FLASH_SKIP = (".bss", ".noinit", ".stack", ".heap")


def _object_name(path: str) -> str:
    """A map file's input file as a short name: a tree source, app:<file>, or <archive>(<member>)."""
    m = re.search(r"libtflm\.a\((.+)\.o\)$", path)
    if m:
        return m.group(1).replace("__", "/")
    m = re.search(r"([^/]+\.a)\((.+)\)$", path)
    if m:
        return f"{m.group(1)}({m.group(2)})"
    return "app:" + Path(path).name.removesuffix(".o")


def internal(name: str) -> bool:
    """Whether a mangled name has internal linkage (Itanium ABI): an anonymous namespace, or L before the
    name (_ZL3foo, _ZN6tfliteL3fooEv). Such a name may recur, meaning another function, in other objects."""
    if "_GLOBAL__N_" in name or name.startswith("_ZL"):
        return True
    if not name.startswith("_ZN"):
        return False
    i = 3
    while i < len(name) and name[i] in "rVKRO":  # a member function's qualifiers
        i += 1
    while i < len(name):  # the nested name's <length><source name> parts
        if name[i] == "L" and name[i + 1 : i + 2].isdigit():
            return True
        j = i
        while j < len(name) and name[j].isdigit():
            j += 1
        if j == i:  # a template, substitution or the end of the name: no L came first
            return False
        i = j + int(name[i:j])
    return False


def section_key(section: str, obj: str) -> str:
    """What identifies an input section across links: an external C++ function's or object's section by its
    name alone (the one definition; an inline one's kept copy may come from any object that has it), any
    other (internal names, C functions, plain .text/.rodata, merged strings) with its object."""
    parts = section.split(".", 2)
    name = parts[2] if len(parts) == 3 else ""
    if name.startswith("_Z") and not internal(name):
        return section
    return f"{obj}:{section}"


_SHF_MERGE_STRINGS = 0x10 | 0x20  # SHF_MERGE | SHF_STRINGS


@functools.cache
def _string_sections(obj: Path, mtime_ns: int) -> dict[str, tuple[int, bytes]]:
    """The mergeable string sections of an ELF32 little-endian object: name -> (alignment, contents)."""
    data = obj.read_bytes()
    if data[:4] != b"\x7fELF" or data[4:6] != b"\x01\x01":
        return {}
    (shoff,) = struct.unpack_from("<I", data, 0x20)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x2E)
    headers = [struct.unpack_from("<10I", data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    out = {}
    for name, _, flags, _, off, size, _, _, align, _ in headers:
        if flags & _SHF_MERGE_STRINGS == _SHF_MERGE_STRINGS:
            end = data.index(b"\0", names + name)
            out[data[names + name : end].decode()] = (max(1, align), data[off : off + size])
    return out


def _object_file(path: str) -> Path | None:
    """The object file a map's input file is: a libtflm.a member is in the cache's obj/ beside it."""
    m = re.search(r"^(.*libtflm\.a)\((.+)\)$", path)
    if m:
        p = Path(m.group(1)).parent / "obj" / m.group(2)
    elif re.search(r"\.a\(.+\)$", path):
        return None  # newlib, libgcc: their strings are counted as sections
    else:
        p = Path(path)
    return p if p.is_file() else None


def _strings(path: str, section: str) -> list[tuple[bytes, int]] | None:
    """(string, bytes it takes) of one mergeable string section, or None when it cannot be read."""
    obj = _object_file(path)
    if obj is None:
        return None
    found = _string_sections(obj, obj.stat().st_mtime_ns).get(section)
    if found is None:
        return None
    align, data = found
    return [(t, -(-(len(t) + 1) // align) * align) for t in data.split(b"\0")[:-1] if t]


def map_sections(map_file: Path) -> dict[str, tuple[str, int]]:
    """Flash input sections of a GNU ld map (those build_firmware counts as flash): key -> (object, bytes).

    Mergeable strings (.rodata...str1.N) go string by string (key: its contents), as the linker merges
    them: a string two objects hold is one. Sizes leave out the alignment fill between sections.
    """
    out: dict[str, tuple[str, int]] = {}
    lines = map_file.read_text(errors="replace").splitlines()
    try:
        start = lines.index("Linker script and memory map")
    except ValueError as e:
        raise EdgeqError(f"{map_file} is not a GNU ld map") from e
    counted, pending = False, ""
    for line in lines[start + 1 :]:
        parts = line.split()
        if line.startswith("."):  # an output section: ".text  0xADDR  0xSIZE", or its name alone
            section = parts[0]
            addr = int(parts[1], 16) if len(parts) > 1 and parts[1].startswith("0x") else 0
            counted = section in (".rodata", ".data") or (
                addr < qemu.RAM_BASE
                and section not in _FLASH_SKIP
                and not section.startswith((".ARM.attributes", ".comment", ".debug"))
            )
            pending = ""
            continue
        if not counted:
            continue
        if line.startswith(" .") and len(parts) == 1:
            pending = parts[0]  # an input section whose name fills the line; its figures follow
            continue
        if line.startswith(" .") and len(parts) == 4 and parts[1].startswith("0x"):
            name, figures = parts[0], parts[1:]
        elif pending and line.startswith("  ") and len(parts) == 3 and parts[0].startswith("0x"):
            name, figures = pending, parts
        else:
            continue
        pending = ""
        strings = _strings(figures[2], name) if ".str" in name else None
        if strings is not None:  # the map gives what is left after merging, in link order: not the bytes
            obj = _object_name(figures[2])
            for text, size in strings:
                out.setdefault("str:" + hashlib.sha1(text).hexdigest()[:16], (obj, size))
        elif figures[1].startswith("0x") and int(figures[1], 16):
            obj = _object_name(figures[2])
            key = section_key(name, obj)
            size = int(figures[1], 16) + (out[key][1] if key in out else 0)
            out[key] = (obj, size)
    return out


def by_object(sections: dict[str, tuple[str, int]]) -> dict[str, int]:
    """Bytes per object, largest first."""
    out: dict[str, int] = {}
    for obj, n in sections.values():
        out[obj] = out.get(obj, 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def added(
    after: dict[str, tuple[str, int]], before: dict[str, tuple[str, int]]
) -> dict[str, tuple[str, int]]:
    """The sections of after that before lacks."""
    return {k: v for k, v in after.items() if k not in before}


APP_MAIN = "app:main.cc"
RESOLVER_PIECE = "app:main.cc (MicroMutableOpResolver::AddBuiltin, FindOp, its messages)"
# The second firmware of several operators resolver_fit needs besides the one with every operator: a
# MobileNet-like set, none of the digits model's (those firmware check the table instead).
MIX = ("DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "ADD", "SOFTMAX")


def main_cc_bytes(sections: dict[str, tuple[str, int]]) -> int:
    """Bytes of main.cc's sections (the app, its resolver calls and the resolver's inlined methods)."""
    return sum(n for obj, n in sections.values() if obj == APP_MAIN)


_RESOLVER_H = "tensorflow/lite/micro/micro_mutable_op_resolver.h"
_METHOD = re.compile(r"TfLiteStatus (Add\w+)\((?:[^()]|\([^()]*\))*\)\s*\{(.*?)\n  \}", re.S)


def custom_calls(tree: Path) -> set[str]:
    """The resolver methods of the tree that register a custom operator (AddCustom, e.g. AddDecode)."""
    text = (tree / _RESOLVER_H).read_text()
    return {
        m.group(1) for m in _METHOD.finditer(text) if m.group(1) != "AddCustom" and "AddCustom(" in m.group(2)
    }


def resolver_fit(
    single: dict[str, int], together: list[tuple[list[str], int]], builtin: set[str]
) -> tuple[int, int]:
    """(once, per_op): main.cc's growth in a firmware of two or more operators = once + the sum over its
    operators of their growth alone, each builtin one's less per_op.

    single: main.cc's growth over the empty resolver with each operator alone; together: (operators,
    growth) of firmware with several. Alone, a builtin operator's resolver call also brings
    MicroMutableOpResolver::AddBuiltin and its messages, inlined into edgeq_app_setup (called once); with
    more these stay out of line, once, and each call costs less. A custom operator's call (AddCustom) is
    out of line alone too. Two such firmware fix both figures; one fixes once = per_op.
    """
    saved = [
        (sum(op in builtin for op in ops), sum(single[op] for op in ops) - growth) for ops, growth in together
    ]
    if len(saved) >= 2 and saved[0][0] != saved[-1][0]:
        (n1, s1), (n2, s2) = saved[0], saved[-1]
        per_op = (s2 - s1) / (n2 - n1)
        return round(per_op * n1 - s1), round(per_op)
    if saved and saved[0][0] > 1:
        n, s1 = saved[0]
        return round(s1 / (n - 1)), round(s1 / (n - 1))
    return 0, 0


def split_shared(
    ops: dict[str, int],
    sections: dict[str, dict[str, tuple[str, int]]],
    resolver: tuple[int, int] = (0, 0),
    builtin: set[str] | None = None,
) -> tuple[dict, list]:
    """Each operator's own bytes, and the pieces of code two or more operators link.

    A piece is every section the same set of operators adds; a firmware links each piece once. own = the
    measured bytes less the op's pieces, so one operator alone comes out at what its build measured. main.cc
    is left out of that: resolver = (once, per_op) from resolver_fit, once a piece of every builtin
    operator and per_op taken off each one's own (alone, one then comes out once - per_op high).
    """
    builtin = set(ops) if builtin is None else builtin
    users: dict[str, set[str]] = {}
    for op, secs in sections.items():
        for key, (obj, _) in secs.items():
            if obj != APP_MAIN:
                users.setdefault(key, set()).add(op)
    pieces: dict[frozenset[str], dict] = {}
    for key, who in users.items():
        if len(who) < 2:
            continue
        obj, size = max((sections[op][key] for op in who), key=lambda v: v[1])
        piece = pieces.setdefault(frozenset(who), {"bytes": 0, "objects": {}})
        piece["bytes"] += size
        piece["objects"][obj] = piece["objects"].get(obj, 0) + size
    once, per_op = resolver
    own = {op: n - (per_op if once > 0 and op in builtin else 0) for op, n in ops.items()}
    shared = []
    for who, piece in sorted(pieces.items(), key=lambda kv: (-kv[1]["bytes"], sorted(kv[0]))):
        for op in who:
            own[op] -= piece["bytes"]
        top = sorted(piece["objects"].items(), key=lambda kv: -kv[1])[:3]
        shared.append({"ops": sorted(who), "bytes": piece["bytes"], "objects": [o for o, _ in top]})
    if once > 0:
        shared.append({"ops": sorted(builtin & set(ops)), "bytes": once, "objects": [RESOLVER_PIECE]})
    return own, shared


# ------------------------------------------------------------------------------------------- measuring


def measure_kernels(
    kernels: str, base_fw: Path, work: Path, ops: tuple[str, ...], args: argparse.Namespace
) -> dict:
    """runtime, bytes per op, the code ops share and the objects each op adds, for one kernel set."""

    def build(name: str, calls: list[str]) -> qemu.QemuBuild:
        d = make_variant(base_fw, work / kernels / name, calls)
        return qemu.build_firmware(d, kernels, args.tflm_root, jobs=args.jobs, cache_dir=args.cache_dir)

    t0 = time.monotonic()
    empty = build("empty", [])
    model_bytes = symbol_size(empty.elf, model_symbol(base_fw))
    empty_secs = map_sections(empty.elf.with_suffix(".map"))
    row: dict = {
        "tree": str(empty.tree),
        "empty_flash": empty.flash_bytes,
        "model_array_bytes": model_bytes,
        "runtime": empty.flash_bytes - model_bytes,
        "runtime_objects": by_object(empty_secs),
        "ops": {},
        "objects": {},
        "build_seconds": [empty.seconds],
        "compiled_objects": empty.compiled_library_objects,
    }
    print(f"{kernels:>9}: runtime {row['runtime']:,} B (empty resolver {empty.flash_bytes:,} B)", flush=True)
    sections, main_growth = {}, {}
    for op in ops:
        b = build(f"op_{op}", resolver_calls([op]))
        row["ops"][op] = b.flash_bytes - empty.flash_bytes
        secs = map_sections(b.elf.with_suffix(".map"))
        sections[op] = added(secs, empty_secs)
        main_growth[op] = main_cc_bytes(secs) - main_cc_bytes(empty_secs)
        row["objects"][op] = by_object(sections[op])
        row["build_seconds"].append(b.seconds)
        row["compiled_objects"] += b.compiled_library_objects
        print(f"{kernels:>9}: {op:<28} {row['ops'][op]:>7,} B ({b.seconds:.1f} s)", flush=True)
    row["resolver"] = (0, 0)
    builtin = {op for op in ops if resolver_calls([op])[0] not in custom_calls(empty.tree)}
    if len(ops) > 1:
        # main.cc with several operators gives the resolver's shared part (resolver_fit); the firmware with
        # every operator is also one more check of the table (additivity checks the real ones).
        together = []
        for name, group in (("mix", [op for op in MIX if op in ops]), ("all", list(ops))):
            if len(group) < 2 or (name == "all" and together and len(group) == len(together[0][0])):
                continue
            b = build(name, resolver_calls(group))
            grown = main_cc_bytes(map_sections(b.elf.with_suffix(".map"))) - main_cc_bytes(empty_secs)
            together.append((group, grown))
            row[f"{name}_ops_flash"] = b.flash_bytes
            row["build_seconds"].append(b.seconds)
        row["resolver"] = resolver_fit(main_growth, together, builtin)
        print(
            f"{kernels:>9}: resolver {row['resolver'][0]:,} B once, each call {row['resolver'][1]:,} B less"
        )
    row["main_growth"] = main_growth
    row["own"], row["shared"] = split_shared(row["ops"], sections, row["resolver"], builtin)
    row["seconds"] = round(time.monotonic() - t0, 1)
    return row


def decode_breakdown(row: dict) -> dict | None:
    """DECODE's bytes split into the kernel and each decoder it links (from the linker map)."""
    objs = row["objects"].get(DECODE_OP)
    if objs is None:
        return None
    decoders = {d: objs.get(src, 0) for d, src in DECODERS.items()}
    kernel = sum(v for k, v in objs.items() if k.startswith("tensorflow/lite/micro/kernels/decode"))
    return {
        "links": [d for d, n in decoders.items() if n > 0],
        "decoder_bytes": decoders,
        "kernel_bytes": kernel - sum(decoders.values()),  # decode.cc, decode_state.cc
        "other_bytes": row["ops"][DECODE_OP] - kernel,  # helpers, the resolver call, string merging
    }


def table_entry(row: dict) -> dict:
    """One kernel set's entry of the data file (what deploy.firmware.code_size reads)."""
    entry = {
        "tree": Path(row["tree"]).name,
        "runtime": row["runtime"],
        "ops": row["ops"],
        "own": row["own"],
        "shared": row["shared"],
    }
    dec = decode_breakdown(row)
    if dec is not None:
        entry["decode"] = dec
    return entry


def check(kernels: str, row: dict, label: str, ops: list[str], model_bytes: int, flash: int) -> dict:
    """One firmware's flash vs the loader's runtime + operators + shared code + the model."""
    code = code_size.code_from_entry(kernels, table_entry(row), ops)
    predicted = code.total + model_bytes
    naive = row["runtime"] + sum(row["ops"].get(op, 0) for op in ops) + model_bytes
    err = predicted - flash
    r = {
        "storage": label,
        "ops": ops,
        "unknown": list(code.unknown),
        "model_bytes": model_bytes,
        "runtime_bytes": code.runtime,
        "ops_bytes": code.ops_bytes,
        "shared_bytes": code.shared,
        "predicted_bytes": predicted,
        "flash_bytes": flash,
        "error_bytes": err,
        "error_pct": round(100.0 * err / flash, 2),
        "sum_of_ops_bytes": naive,  # each operator's bytes alone, summed: what sharing corrects
        "sum_of_ops_error_pct": round(100.0 * (naive - flash) / flash, 2),
    }
    print(
        f"{kernels:>9}: {label} firmware {flash:,} B, predicted {predicted:,} B "
        f"({err:+,} B, {r['error_pct']:+.2f}%; ops summed alone {r['sum_of_ops_error_pct']:+.2f}%)",
        flush=True,
    )
    return r


def additivity(kernels: str, builds: dict[str, Path], row: dict, args: argparse.Namespace) -> list[dict]:
    """The real firmware of each run (and the all-operators variant) checked against the table."""
    out = []
    for storage, run in builds.items():
        b = qemu.build_firmware(run, kernels, args.tflm_root, jobs=args.jobs, cache_dir=args.cache_dir)
        model = (run / "model.tflite").read_bytes()
        ops = list(dict.fromkeys(describe(model).ops))
        out.append(check(kernels, row, storage, ops, len(model), b.flash_bytes))
    for name, ops in (("mix", [op for op in MIX if op in row["ops"]]), ("all", list(row["ops"]))):
        if f"{name}_ops_flash" in row:
            label = f"{name} (variant)"
            out.append(check(kernels, row, label, ops, row["model_array_bytes"], row[f"{name}_ops_flash"]))
    return out


# ---------------------------------------------------------------------------------------- provenance


def tflm_provenance(tflm_root: str | None) -> dict:
    """The trees' upstream commit and date, from the README beside them (../shared/tflm/README.md)."""
    tree = qemu.find_tree("reference", tflm_root)
    for readme in (tree / "README.md", tree.parent / "README.md", tree / "PROVENANCE.md"):
        if readme.is_file():
            m = re.search(r"at commit ([0-9a-f]{40}) \((\d{4}-\d\d-\d\d)\)", readme.read_text())
            if m:
                return {"commit": m.group(1), "date": m.group(2), "readme": str(readme)}
    return {"commit": "unknown", "date": "unknown", "readme": None}


def _git(*a: str) -> str:
    try:
        return subprocess.run(
            ["git", *a], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


_CHECK_KEYS = ("storage", "ops", "predicted_bytes", "flash_bytes", "error_bytes", "error_pct")


def data_file(res: dict) -> dict:
    """What deploy/firmware/code_size.json holds: the table per kernel set and where it came from."""
    kernels = {}
    for k, row in res["kernels"].items():
        entry = table_entry(row)
        entry["additivity"] = [{key: c[key] for key in _CHECK_KEYS} for c in res["checks"][k]]
        kernels[k] = entry
    return {
        "about": (
            "Flash (.text+.rodata+.data) of edgeq's rendered TFLM firmware cross-compiled for a Cortex-M4F "
            "(QEMU mps2-an386), measured by benchmarks/code_size.py; read by deploy/firmware/code_size.py. "
            "runtime: the firmware with an empty op resolver less the model array (app, protocol, board "
            "files, TFLM interpreter and allocator, newlib-nano). ops: what registering that one operator "
            "adds to it (its kernel, the helpers it pulls in, its resolver call). Helpers two or more "
            "operators pull in are linked once: shared lists them per set of operators (from the linker "
            "maps) and own is each operator's bytes less them, so a firmware is runtime + own of its "
            "operators + each shared piece any of them uses + the model. TFLM_DECODE (the DECODE custom op) "
            "links every decoder of the tree whatever the model uses (decode.links)."
        ),
        "unit": "bytes",
        "provenance": {
            "tflm_commit": res["tflm"]["commit"],
            "tflm_commit_date": res["tflm"]["date"],
            "toolchain": res["tools"]["compiler"],
            "cpu_flags": list(qemu.CPU_FLAGS),
            "opt_flags": list(qemu.OPT_FLAGS),
            "cxx_flags": list(qemu.CXX_FLAGS),
            "link_flags": list(qemu.LINK_FLAGS),
            "board": f"QEMU {qemu.MACHINE} (Cortex-M4F), firmware_templates/qemu_mps2_an386",
            "base_firmware": "the digits INT4 run's rendered firmware (pipelines/digits.py), resolver varied",
            "date": res["date"],
            "edgeq_commit": res["edgeq_commit"],
            "command": res["command"],
        },
        "kernels": kernels,
    }


_STRING_LIST = re.compile(r'\[\n\s+(?:"[^"\n]*",\n\s+)*"[^"\n]*"\n\s*\]')


def dumps(data: dict) -> str:
    """JSON with one key a line, but each list of names (operators, objects, flags) on one line."""
    text = json.dumps(data, indent=1)
    return _STRING_LIST.sub(lambda m: json.dumps(json.loads(m.group(0))), text) + "\n"


# ------------------------------------------------------------------------------------------- reporting


def _ops_cell(ops: list[str]) -> str:
    return ", ".join(ops) if len(ops) <= 8 else f"the {len(ops)} operators above, one variant"


def _who(ops: list[str]) -> str:
    return "+".join(ops) if len(ops) <= 3 else f"{len(ops)} ops"


def _markdown(res: dict) -> str:
    m = res["machine"]
    ks = list(res["kernels"])
    trees = ", ".join(f"`{r['tree']}`" for r in res["kernels"].values())
    lines = [
        "# The flash cost of TFLM operators on a Cortex-M4 (issue #17)",
        "",
        f"- command: `{res['command']}`",
        f"- commit: {res['commit']}",
        f"- machine: {m['cpu']}, {m['nproc']} cores, {m['platform']}, Python {m['python']}",
        f"- beside it: {res.get('beside') or 'not recorded (--beside)'}; 1-minute load average "
        f"{res['load_average'][0]} at the start, {res['load_average'][1]} at the end (other work shares the "
        "machine when these exceed the cores; build times grow with it, the bytes do not)",
        f"- toolchain: {res['tools']['compiler']}",
        f"- flags: `{' '.join(qemu.CPU_FLAGS + qemu.OPT_FLAGS)}`, {' '.join(qemu.CXX_FLAGS)}, "
        f"{' '.join(qemu.LINK_FLAGS)}",
        f"- TFLM trees: {trees} (tflite-micro {res['tflm']['commit'][:12]}, {res['tflm']['date']})",
        f"- library cache: {res['cache']}; TFLM objects compiled by this run: "
        + ", ".join(f"{k} {r['compiled_objects']}" for k, r in res["kernels"].items()),
        f"- total: {res['seconds']:.0f} s ("
        + ", ".join(f"{k} {r['seconds']:.0f} s" for k, r in res["kernels"].items())
        + "; one build "
        + ", ".join(
            f"{k} median {sorted(r['build_seconds'])[len(r['build_seconds']) // 2]:.1f} s"
            for k, r in res["kernels"].items()
        )
        + ")",
        "",
        "Flash = .text + .rodata + .data of the firmware ELF (QEMU mps2-an386, Cortex-M4F), as "
        "`deploy.device.qemu.build_firmware` reports it. The base is the rendered firmware of the digits "
        "INT4 run; each variant differs from it only in the op resolver of main.cc. runtime = the firmware "
        "with an "
        "empty resolver less the model array (main.cc, the protocol, the board files, the TFLM interpreter "
        "and allocator, newlib-nano); an operator = what registering it alone adds to that (its kernel, the "
        "helpers it pulls in, its resolver call and message). Written to `deploy/firmware/code_size.json`.",
        "",
        "| operator | " + " | ".join(f"{k} alone B | {k} own B" for k in ks) + " |",
        "|---|" + "---:|---:|" * len(ks),
        "| runtime | " + " | ".join(f"{res['kernels'][k]['runtime']:,} | -" for k in ks) + " |",
    ]
    ops = list(dict.fromkeys(op for k in ks for op in res["kernels"][k]["ops"]))
    for op in ops:
        cells = []
        for k in ks:
            r = res["kernels"][k]
            cells.append(f"{r['ops'][op]:,} | {r['own'][op]:,}" if op in r["ops"] else "- | -")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "alone: what registering the operator alone adds to the empty-resolver firmware (measured). own: "
        "that "
        "less the helpers another measured operator also links (from the linker maps). The shared helpers "
        "are kept per set of operators that link them; a firmware links each once:",
        "",
    ]
    for k in ks:
        sh = res["kernels"][k]["shared"]
        top = ", ".join(f"{_who(p['ops'])} {p['bytes']:,} B ({', '.join(p['objects'][:2])})" for p in sh[:5])
        lines.append(f"- {k}: {len(sh)} pieces, {sum(p['bytes'] for p in sh):,} B in all; largest: {top}")
    lines += [
        "",
        "One piece is main.cc's: alone, an operator's resolver call also brings "
        "MicroMutableOpResolver::AddBuiltin and its messages (inlined, called once); with two or more "
        "operators these stay out of line, once, and each call costs less (DECODE registers through "
        "AddCustom, out of line even alone). From the variants with "
        f"{', '.join(MIX)} and with every operator: "
        + ", ".join(
            f"{k} {res['kernels'][k]['resolver'][0]:,} B once, each builtin operator's own "
            f"{res['kernels'][k]['resolver'][1]:,} B less than its bytes alone"
            for k in ks
        )
        + " (a firmware of one operator comes out the difference high).",
    ]

    lines += [
        "",
        "## Additivity: runtime + the model's operators + shared helpers + the model vs the real firmware",
        "",
        "The digits runs' own firmware (`edgeq run pipelines/digits.py --epochs 2`), built unmodified, "
        "against "
        "`deploy.firmware.code_size`'s figure for its operators (operators + shared = `CodeSize.ops_bytes` + "
        f"`.shared`). Error = predicted - ELF flash (target: within {TOLERANCE:.0%}). Last column: the same "
        "with each operator's alone bytes summed (helpers counted once per operator).",
        "",
        "| kernels | storage | operators | model B | runtime B | operators B | shared B | predicted B | "
        "ELF flash B | error | summed alone |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in ks:
        for c in res["checks"][k]:
            unknown = f" (unmeasured: {', '.join(c['unknown'])})" if c["unknown"] else ""
            lines.append(
                f"| {k} | {c['storage']} | {_ops_cell(c['ops'])}{unknown} | {c['model_bytes']:,} | "
                f"{c['runtime_bytes']:,} | {c['ops_bytes']:,} | {c['shared_bytes']:,} | "
                f"{c['predicted_bytes']:,} | {c['flash_bytes']:,} | "
                f"{c['error_bytes']:+,} B ({c['error_pct']:+.2f}%) | {c['sum_of_ops_error_pct']:+.2f}% |"
            )

    decs = {k: decode_breakdown(r) for k, r in res["kernels"].items()}
    if any(decs.values()):
        lines += [
            "",
            f"## DECODE ({DECODE_OP}) and its decoders",
            "",
            "TFLM's DECODE kernel (kernels/decode.cc) chooses the decoder by each tensor's decode type at "
            "run "
            "time, so registering DECODE links every decoder the tree has, whichever the model uses: LUT, "
            "PRUNE and HUFFMAN storage pay the same code. Bytes per object from the linker map (each string "
            "counted once):",
            "",
            "| kernels | DECODE B | decode.cc + decode_state.cc | "
            + " | ".join(f"{d} decoder" for d in DECODERS)
            + " | other (helpers, resolver call) |",
            "|---|---:|---:|" + "---:|" * len(DECODERS) + "---:|",
        ]
        for k, d in decs.items():
            if d is None:
                continue
            lines.append(
                f"| {k} | {res['kernels'][k]['ops'][DECODE_OP]:,} | {d['kernel_bytes']:,} | "
                + " | ".join(f"{d['decoder_bytes'][n]:,}" for n in DECODERS)
                + f" | {d['other_bytes']:,} |"
            )

    lines += ["", "## What each operator links (largest objects it adds, from the linker map)", ""]
    for k in ks:
        r = res["kernels"][k]
        top_rt = list(r["runtime_objects"].items())[:6]
        more = len(r["runtime_objects"]) - len(top_rt)
        lines.append(f"- {k}, runtime: " + ", ".join(f"{o} {n:,}" for o, n in top_rt) + f" (+{more} more)")
        for op, objs in r["objects"].items():
            top = list(objs.items())[:4]
            more = f" (+{len(objs) - 4} more)" if len(objs) > 4 else ""
            lines.append(f"- {k}, {op}: " + ", ".join(f"{o} {n:,}" for o, n in top) + more)
    return "\n".join(lines) + "\n"


def _tools() -> dict:
    tools = qemu.check_toolchain()
    return {"compiler": qemu._version(tools["arm-none-eabi-g++"])}


def main(argv: list[str] | None = None) -> int:
    """CLI entry: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tflm-root", default=None, help="folder of cortex-m4-reference/ and cortex-m4-cmsis-nn/"
    )
    ap.add_argument("--build", action="append", default=[], help="STORAGE=OUT_DIR (int4, lut): use this run")
    ap.add_argument("--kernels", action="append", choices=tuple(qemu.KERNELS), help="only these (repeatable)")
    ap.add_argument("--ops", default=None, help="comma-separated operators (default: the full list)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    ap.add_argument("--cold", action="store_true", help="build against a fresh TFLM library cache")
    ap.add_argument(
        "--work", type=Path, default=None, help="keep the variants' builds here (default: a temp dir)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="results .md")
    ap.add_argument("--data", type=Path, default=None, help=f"data file (default {DATA.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    cmd = " ".join(["python benchmarks/code_size.py", *(argv if argv is not None else sys.argv[1:])])
    ops = tuple(o.strip() for o in args.ops.split(",")) if args.ops else OPS
    partial = bool(args.ops or args.kernels)
    data_path = args.data or (None if partial else DATA)
    given = dict(b.split("=", 1) for b in args.build)
    t0, load0 = time.monotonic(), os.getloadavg()
    res: dict = {"kernels": {}, "checks": {}}
    try:
        resolver_calls(list(ops))  # an unknown name fails before any build
        for kernels in args.kernels or qemu.KERNELS:
            qemu.find_tree(kernels, args.tflm_root)
        res["tools"] = _tools()
        res["tflm"] = tflm_provenance(args.tflm_root)
        with tempfile.TemporaryDirectory(prefix="edgeq-code-size-") as tmp:
            work = args.work.resolve() if args.work else Path(tmp)
            args.cache_dir = Path(tmp) / "cache" if args.cold else None
            res["cache"] = "fresh (--cold)" if args.cold else f"`{qemu.cache_root()}` (shared, warm)"
            builds = {
                s: Path(given[s]).resolve() if s in given else run_pipeline(work / s, s) for s in STORAGES
            }
            base_fw = builds["int4"] / "firmware"
            for kernels in args.kernels or qemu.KERNELS:
                row = measure_kernels(kernels, base_fw, work / "variants", ops, args)
                res["kernels"][kernels] = row
                res["checks"][kernels] = additivity(kernels, builds, row, args)
    except EdgeqError as e:
        print(f"code_size: {e}", file=sys.stderr)
        return 2
    res.update(
        command=cmd,
        commit=commit(("benchmarks", "deploy", "firmware_templates")),
        edgeq_commit=_git("rev-parse", "HEAD"),
        date=datetime.date.today().isoformat(),
        machine=machine(),
        seconds=round(time.monotonic() - t0, 1),
        load_average=[round(load0[0], 2), round(os.getloadavg()[0], 2)],
        beside=args.beside,
    )
    if data_path is not None:
        atomic_write_text(data_path, dumps(data_file(res)))
        print(f"-> {data_path}")
    atomic_write_text(args.out, _markdown(res))
    print(f"-> {args.out} ({res['seconds']:.0f} s)")
    checks = [c for cs in res["checks"].values() for c in cs]
    return 0 if all("error_pct" in c and abs(c["error_pct"]) <= 100 * TOLERANCE for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
