"""Benchmark: the digits firmware cross-compiled for a Cortex-M4 and run under QEMU (mps2-an386) as a board.

    python benchmarks/qemu_firmware.py [--tflm-root DIR] [--build STORAGE=OUT_DIR ...] [--jobs 2]

For each storage (int8, INT4, LUT) the digits pipeline runs into a temporary folder (or --build names an
`edgeq run` output folder for it), and for each kernel set (reference, CMSIS-NN) deploy.device.qemu builds
the rendered firmware with arm-none-eabi-g++ against the matching TFLM tree (DIR/cortex-m4-reference,
DIR/cortex-m4-cmsis-nn; default ../shared/tflm), boots it under qemu-system-arm and runs `edgeq
device-eval` over its UART. The TFLM libraries are built in a fresh cache folder, so the first build per
tree is a cold one; each firmware is then built a second time (warm: only the app compiles).

Writes benchmarks/results/qemu_firmware.md and .json: command, commit, machine, toolchain; per build: rows
bit-identical to host TFLM, the arena the device reports vs edgeq's host figure (report.json
models.deployed.arena_bytes), ELF flash (.text+.rodata+.data) and RAM (.data+.bss), guest instructions
per inference (QEMU TCG plugin; instruction counts, not cycles), build times. Exit status 0 when every
row of every build is bit-identical, 1 otherwise, 2 on a usage error (no tree, no toolchain).
"""

from __future__ import annotations

import argparse
import json
import os
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
from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "qemu_firmware.md"
STORAGES = ("int8", "int4", "lut")


def run_pipeline(out_dir: Path, storage: str) -> Path:
    """`edgeq run pipelines/digits.py --out out_dir --storage storage --quiet`; returns out_dir."""
    entry = "import sys; from deploy.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", entry, "run", str(ROOT / "pipelines" / "digits.py"), "--out", str(out_dir)]
    r = subprocess.run([*cmd, "--storage", storage, "--quiet"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise EdgeqError(f"edgeq run --storage {storage} failed: {(r.stderr or r.stdout).strip()[-2000:]}")
    return out_dir


def evaluate(build: qemu.QemuBuild, out: Path) -> dict:
    """Boot build under QEMU, run device-eval on out's test split; the figures of one firmware."""
    from deploy.device.evaluate import evaluate_on_device

    with qemu.QemuBoard(build, count_instructions=True, max_seconds=900) as board:
        rep = evaluate_on_device(board.port, out)
        counts = sorted(board.instruction_counts())
        boot = board.boot_text.strip()
        why_no_counts = board.insn_unavailable
    report = json.loads((out / "report.json").read_text())
    deployed = report["models"]["deployed"]
    return {
        "samples": rep["samples"],
        "bit_identical_rows": rep["bit_identical_rows"],
        "max_abs_diff": rep["max_abs_diff"],
        "accuracy_device": rep["device"].get("accuracy"),
        "accuracy_host_tflm": rep["host_tflm"].get("accuracy"),
        "arena_device_bytes": rep["arena"]["device_bytes"],
        "arena_report_json_bytes": deployed.get("arena_bytes"),
        "arena_host_tflm_bytes": rep["arena"]["host_tflm_bytes"],
        "model_bytes": rep["model"]["bytes"],
        "instructions": (
            {"median": counts[len(counts) // 2], "min": counts[0], "max": counts[-1], "n": len(counts)}
            if counts
            else {"unavailable": why_no_counts or "no counts"}
        ),
        "boot_line": boot,
        "device_eval_seconds": rep["seconds"],
    }


def _build_fields(b: qemu.QemuBuild) -> dict:
    return {
        "elf": str(b.elf),
        "tree": str(b.tree),
        "flash_bytes": b.flash_bytes,
        "ram_bytes": b.ram_bytes,
        "text_bytes": b.text_bytes,
        "rodata_bytes": b.rodata_bytes,
        "data_bytes": b.data_bytes,
        "bss_bytes": b.bss_bytes,
        "stack_reserved_bytes": b.stack_bytes,
        "heap_reserved_bytes": b.heap_bytes,
        "library_objects": b.library_objects,
    }


def measure(builds: dict[str, Path], tflm_root: str | None, jobs: int, cache: Path) -> list[dict]:
    """Build (cold then warm) and evaluate every (kernels, storage); one row per firmware."""
    rows = []
    for kernels in qemu.KERNELS:
        first: dict[str, qemu.QemuBuild] = {}
        for storage, out in builds.items():
            first[storage] = qemu.build_firmware(out, kernels, tflm_root, jobs=jobs, cache_dir=cache)
        for storage, out in builds.items():
            warm = qemu.build_firmware(out, kernels, tflm_root, jobs=jobs, cache_dir=cache)
            b = first[storage]
            rows.append(
                {
                    "storage": storage,
                    "kernels": kernels,
                    **_build_fields(warm),
                    "build_first_seconds": b.seconds,
                    "build_first_compiled_objects": b.compiled_library_objects,
                    "build_warm_seconds": warm.seconds,
                    "build_warm_compiled_objects": warm.compiled_library_objects,
                    **evaluate(warm, out),
                }
            )
            r = rows[-1]
            print(
                f"{storage:>4} {kernels:>9}: {r['bit_identical_rows']}/{r['samples']} identical, "
                f"arena {r['arena_device_bytes']:,} B, flash {warm.flash_bytes:,} B, "
                f"RAM {warm.ram_bytes:,} B",
                flush=True,
            )
    return rows


def _tool_versions() -> dict:
    tools = qemu.check_toolchain()
    qemu_bin = qemu.check_qemu()

    def first(cmd: list[str]) -> str:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]

    return {
        "compiler": first([tools["arm-none-eabi-g++"], "--version"]),
        "qemu": first([qemu_bin, "--version"]),
    }


def _markdown(res: dict) -> str:
    m = res["machine"]
    trees = ", ".join(f"`{t}`" for t in sorted({r["tree"] for r in res["rows"]}))
    lines = [
        "# The digits firmware under QEMU (mps2-an386, Cortex-M4F) vs host TFLM",
        "",
        f"- command: `{res['command']}`",
        f"- commit: {res['commit']}",
        f"- machine: {m['cpu']}, {m['nproc']} cores, {m['platform']}, Python {m['python']}",
        f"- toolchain: {res['tools']['compiler']}; {res['tools']['qemu']}",
        f"- flags: `{' '.join(qemu.CPU_FLAGS + qemu.OPT_FLAGS)}`, {' '.join(qemu.CXX_FLAGS)}, "
        f"{' '.join(qemu.LINK_FLAGS)}",
        f"- TFLM trees: {trees}",
        f"- total: {res['seconds']:.0f} s; 1-minute load average {res['load_average'][0]} at the start, "
        f"{res['load_average'][1]} at the end (build times grow with it)",
        "",
        "Rows: outputs bit-identical to host TFLM (pip tflite_micro) out of the test split. Arena: what the "
        "firmware reports in INFO (`arena_used_bytes()` on the 32-bit target) vs edgeq's host figure "
        "(report.json `models.deployed.arena_bytes`, 64-bit host, reference kernels). Flash = .text + "
        ".rodata + .data of the ELF (the model is in .rodata), RAM = .data + .bss (the tensor arena array "
        "and the protocol's two 4 KiB frame buffers are in .bss; 16 KiB stack and 4 KiB heap reserved "
        "apart). Instructions: guest instructions per inference counted by a QEMU TCG plugin between the "
        "two edgeq_cycles() calls around Invoke (instruction counts, not cycles). Build: the first build "
        "against a fresh library cache (cold for the first storage of each tree; later storages compile "
        "only the kernels they add) and a second build (warm: only the app compiles).",
        "",
        "| storage | kernels | rows identical | arena device / host B | flash B (text+rodata+data) | "
        "RAM B (data+bss) | instructions / inference | build first s (objects) | build warm s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        ins = r["instructions"]
        ins_s = f"{ins['median']:,}" if "median" in ins else f"n/a ({ins['unavailable']})"
        if "median" in ins and ins["min"] != ins["max"]:
            ins_s += f" ({ins['min']:,}-{ins['max']:,})"
        lines.append(
            f"| {r['storage']} | {r['kernels']} | {r['bit_identical_rows']}/{r['samples']} | "
            f"{r['arena_device_bytes']:,} / {r['arena_report_json_bytes']:,} | "
            f"{r['flash_bytes']:,} ({r['text_bytes']:,}+{r['rodata_bytes']:,}+{r['data_bytes']:,}) | "
            f"{r['ram_bytes']:,} ({r['data_bytes']:,}+{r['bss_bytes']:,}) | {ins_s} | "
            f"{r['build_first_seconds']:.1f} ({r['build_first_compiled_objects']}) | "
            f"{r['build_warm_seconds']:.1f} |"
        )
    lines += ["", "Model bytes and boot lines:", ""]
    for r in res["rows"]:
        lines.append(f"- {r['storage']}, {r['kernels']}: model {r['model_bytes']:,} B; `{r['boot_line']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tflm-root", default=None, help="folder of cortex-m4-reference/ and cortex-m4-cmsis-nn/"
    )
    ap.add_argument(
        "--build", action="append", default=[], help="STORAGE=OUT_DIR: use this `edgeq run` output"
    )
    ap.add_argument("--storage", action="append", choices=STORAGES, help="only these storages (repeatable)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results .md (a .json goes beside it)")
    args = ap.parse_args(argv)
    cmd = " ".join(["python benchmarks/qemu_firmware.py", *(argv if argv is not None else sys.argv[1:])])
    given = dict(b.split("=", 1) for b in args.build)
    t0, load0 = time.monotonic(), os.getloadavg()
    try:
        for kernels in qemu.KERNELS:
            qemu.find_tree(kernels, args.tflm_root)
        tools = _tool_versions()
        with tempfile.TemporaryDirectory(prefix="edgeq-qemu-bench-") as tmp:
            builds = {
                s: Path(given[s]).resolve() if s in given else run_pipeline(Path(tmp) / s, s)
                for s in (args.storage or STORAGES)
            }
            rows = measure(builds, args.tflm_root, args.jobs, Path(tmp) / "cache")
    except EdgeqError as e:
        print(f"qemu_firmware: {e}", file=sys.stderr)
        return 2
    res = {
        "command": cmd,
        "commit": commit(("benchmarks", "deploy", "firmware_templates")),
        "machine": machine(),
        "tools": tools,
        "seconds": round(time.monotonic() - t0, 1),
        # Build times depend on what else the machine runs: the 1-minute load average at start and end.
        "load_average": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        "rows": rows,
    }
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(res, indent=2) + "\n")
    atomic_write_text(args.out, _markdown(res))
    print(f"-> {args.out}")
    return 0 if all(r["bit_identical_rows"] == r["samples"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
