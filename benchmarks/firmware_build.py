"""Benchmark: build edgeq's generic CMake firmware against a TFLM source tree and run it through device-eval.

    python benchmarks/firmware_build.py --tflm-root DIR [--build OUT_DIR] [--storage lut]

DIR (or the TFLM_ROOT environment variable) is a TensorFlow Lite Micro tree laid out like the output of
tflite-micro's create_tflm_tree.py. OUT_DIR is an `edgeq run` output folder (model.tflite,
report.json, test_data.npz); without --build the digits pipeline runs into a temporary folder first.

The firmware is rendered afresh from the current templates into a scratch copy of OUT_DIR (OUT_DIR itself is
not touched), configured with cmake (-DTFLM_ROOT, -Wall -Wextra so that warnings can be counted), built, and
the host executable is connected over a pseudo-terminal to `edgeq device-eval`'s evaluator: it answers
edgeq's serial protocol on stdin/stdout exactly as a board would on its UART. Writes
benchmarks/results/firmware_build.md: the command, commit, machine, the tree's provenance (its PROVENANCE.md
when it has one), compile warnings, binary size, arena used on the "device" vs edgeq's measurement, accuracy
on the device vs host TFLM, and how many output rows are bit-identical.

Exit status: 0 when every row is bit-identical, 1 when not (or a step fails), 2 when TFLM_ROOT is unset or
lacks tensorflow/lite/micro/micro_interpreter.h.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tty
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # also when imported by tests/test_firmware_build.py

from provenance import commit, machine  # noqa: E402

from edgeq.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "firmware_build.md"
INTERPRETER_H = "tensorflow/lite/micro/micro_interpreter.h"
# What render_firmware needs from an `edgeq run` folder, and what device-eval reads.
BUILD_FILES = ("model.tflite", "report.json", "test_data.npz")
BOOT_LINE = re.compile(r"arena (\d+) of (\d+) bytes used")
WARNING = re.compile(r"^(\S+?):\d+:\d+: warning: .*\[(-W[^\]]+)\]$", re.M)


class TflmRootError(ValueError):
    """TFLM_ROOT is unset or is not a TFLM tree (the script exits 2 with this one-line message)."""


class BuildError(RuntimeError):
    """A step of the firmware build or run failed; the message says which and shows its output."""


def check_tflm_root(root: str | None) -> Path:
    """TFLM_ROOT as a Path; TflmRootError with a one-line message when it is unset or not a TFLM tree."""
    if not root:
        raise TflmRootError("TFLM_ROOT is not set; pass --tflm-root DIR or set TFLM_ROOT")
    path = Path(root).expanduser().resolve()
    if not (path / INTERPRETER_H).is_file():
        raise TflmRootError(
            f"TFLM_ROOT={path} lacks {INTERPRETER_H}; "
            "point it at a tree made by tflite-micro's create_tflm_tree.py"
        )
    return path


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run cmd, capturing stdout+stderr as text; BuildError with the tail of the output when it fails."""
    r = subprocess.run(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if r.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}")
    return r


def run_pipeline(out_dir: Path, storage: str | None = None) -> Path:
    """`edgeq run pipelines/digits.py --out out_dir` (optionally --storage); returns out_dir."""
    entry = "import sys; from deploy.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", entry, "run", str(ROOT / "pipelines" / "digits.py"), "--out", str(out_dir)]
    if storage:
        cmd += ["--storage", storage]
    _run(cmd, cwd=ROOT, timeout=1800)
    return out_dir


def render(build: Path, work: Path) -> tuple[Path, str]:
    """Copy build's model files into work and render the firmware there; (firmware dir, model name)."""
    from deploy.export.carrays import write_c_arrays
    from deploy.firmware import render_firmware
    from deploy.measure.tflm import io_quant, tflm_interpreter

    work.mkdir(parents=True, exist_ok=True)
    for name in BUILD_FILES:
        if not (build / name).is_file():
            raise BuildError(f"{build / name} not found; --build must name an `edgeq run` output folder")
        shutil.copy2(build / name, work / name)
    report = json.loads((work / "report.json").read_text())
    name = report["pipeline"]
    deployed = report["models"]["deployed"]
    model = (work / "model.tflite").read_bytes()
    # The same arrays `edgeq run` wrote (same bytes, same name), and the same render arguments.
    fw = render_firmware(
        model,
        work,
        name=name,
        arena_bytes=deployed["arena_bytes"],
        input_quant=io_quant(tflm_interpreter(model), "input"),
        c_arrays=write_c_arrays(model, work, name),
        alt_decompression_bytes=deployed.get("alt_decompression_bytes", 0),
    )
    return fw, name


def cmake_build(fw: Path, tflm_root: Path, build_dir: Path, jobs: int = 2) -> dict:
    """Configure and build fw with -Wall -Wextra; the executable, build log stats and sizes."""
    t0 = time.monotonic()
    _run(
        [
            "cmake",
            "-S",
            str(fw),
            "-B",
            str(build_dir),
            f"-DTFLM_ROOT={tflm_root}",
            "-DCMAKE_CXX_FLAGS=-Wall -Wextra",
            "-DCMAKE_C_FLAGS=-Wall -Wextra",
        ]
    )
    log = _run(["cmake", "--build", str(build_dir), "-j", str(jobs)]).stdout
    seconds = time.monotonic() - t0
    cache = (build_dir / "CMakeCache.txt").read_text()
    build_type = re.search(r"^CMAKE_BUILD_TYPE:\w+=(.*)$", cache, re.M)
    exe_name = re.search(r"^add_executable\((\w+)", (fw / "CMakeLists.txt").read_text(), re.M).group(1)
    exe = build_dir / exe_name
    warnings = WARNING.findall(log)
    tflm_prefix = str(tflm_root)
    ours = [(f, w) for f, w in warnings if not f.startswith(tflm_prefix)]
    sizes = {"file_bytes": exe.stat().st_size}
    if shutil.which("size"):
        text, data, bss = _run(["size", str(exe)]).stdout.splitlines()[1].split()[:3]
        sizes.update(text=int(text), data=int(data), bss=int(bss))
    return {
        "exe": exe,
        "seconds": round(seconds, 1),
        "build_type": build_type.group(1) if build_type else "",
        "warnings_total": len(warnings),
        "warnings_edgeq": len(ours),
        "warnings_edgeq_list": sorted({f"{f}: {w}" for f, w in ours}),
        "warnings_tflm": len(warnings) - len(ours),
        "warning_kinds": dict(Counter(w for _, w in warnings).most_common(5)),
        "size": sizes,
        "compiler": _run(["c++", "--version"]).stdout.splitlines()[0],
        "cmake": _run(["cmake", "--version"]).stdout.splitlines()[0],
    }


def device_eval(exe: Path, build: Path, timeout: float = 5.0) -> tuple[dict, str]:
    """Run exe on a pty as a board and evaluate build's test split through it; (device report, stderr)."""
    from deploy.device.evaluate import evaluate_on_device

    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    port = os.ttyname(slave)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(exe)], stdin=master, stdout=master, stderr=err)
        os.close(master)
        try:
            rep = evaluate_on_device(port, build, timeout=timeout)
        finally:
            proc.kill()
            proc.wait()
            os.close(slave)
        err.seek(0)
        return rep, err.read()


def tree_provenance(tflm_root: Path) -> str:
    """The tree's PROVENANCE.md, or its git commit, or a note that nothing records where it came from."""
    note = tflm_root / "PROVENANCE.md"
    if note.is_file():
        return note.read_text().strip()
    r = subprocess.run(["git", "-C", str(tflm_root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode == 0:
        return f"git checkout at {r.stdout.strip()}"
    return "not recorded (no PROVENANCE.md and not a git checkout)"


def measure(build: Path, tflm_root: Path, work: Path, jobs: int = 2) -> dict:
    """Render, build and device-evaluate build's model against tflm_root inside work; every figure."""
    fw, name = render(build, work / "out")
    b = cmake_build(fw, tflm_root, work / "cmake-build", jobs)
    rep, stderr = device_eval(b["exe"], work / "out")
    boot = BOOT_LINE.search(stderr)
    report = json.loads((work / "out" / "report.json").read_text())
    return {
        "model": name,
        "storage": report["models"]["deployed"].get("storage"),
        "build": {k: v for k, v in b.items() if k != "exe"},
        "boot_line": stderr.strip().splitlines()[0] if stderr.strip() else "",
        "arena_size": int(boot.group(2)) if boot else None,
        "device": rep,
    }


def _result_table(m: dict) -> list[str]:
    b, d = m["build"], m["device"]
    a = d["arena"]
    acc = "accuracy" if d["task"] == "classification" else "mae"
    size = b["size"]
    size_s = (
        f"text {size['text']:,} B, data {size['data']:,} B, bss {size['bss']:,} B "
        f"(file {size['file_bytes']:,} B)"
        if "text" in size
        else f"file {size['file_bytes']:,} B"
    )
    ours = "; ".join(b["warnings_edgeq_list"]) or "none"
    return [
        f"## {m['model']}, {m['storage']} storage",
        "",
        "| | |",
        "|---|---|",
        f"| model | {d['model']['bytes']:,} B, CRC-32 {d['model']['crc32']} |",
        f"| build | {b['seconds']} s (configure + build, TFLM included; "
        f"CMAKE_BUILD_TYPE={b['build_type'] or '(none)'}) |",
        f"| compile warnings (-Wall -Wextra) | {b['warnings_edgeq']} in edgeq's sources ({ours}); "
        f"{b['warnings_tflm']} in the TFLM tree, by kind {b['warning_kinds']} |",
        f"| binary size (host x86-64) | {size_s} |",
        f"| arena used on the device | {a['device_bytes']:,} B of kArenaSize {m['arena_size'] or 0:,} B |",
        f"| arena measured by edgeq (pip tflite_micro recording allocator) | {a['host_tflm_bytes']:,} B "
        f"(device minus host: {a['device_minus_host']:+,} B) |",
        f"| {acc} on the device | {d['device'][acc]} |",
        f"| {acc} in host TFLM | {d['host_tflm'][acc]} (report.json: {d['report_json_accuracy_tflm']}) |",
        f"| bit-identical output rows | {d['bit_identical_rows']} of {d['samples']} "
        f"(max abs diff {d['max_abs_diff']}) |",
        f"| latency on this host | median {d['cycles']['ms_median']} ms per inference "
        f"({d['cycles']['unit']}) |",
        f"| serial link | {d['link']['requests']} requests, {d['link']['retries']} retries, "
        f"{d['link']['crc_errors']} CRC errors, {d['seconds']} s |",
        "",
        f"Boot line: `{m['boot_line']}`",
        "",
    ]


def _markdown(ms: list[dict], cmd: str, tflm_root: Path) -> str:
    mach = machine()
    b = ms[0]["build"]
    lines = [
        "# Firmware build: the rendered CMake project against a TFLM tree, run through device-eval",
        "",
        f"- command: `{cmd}`",
        f"- commit: {commit(('benchmarks', 'deploy', 'firmware_templates'))}",
        f"- machine: {mach['cpu']}, {mach['nproc']} cores, {mach['platform']}, Python {mach['python']}",
        f"- toolchain: {b['compiler']}; {b['cmake']}",
        f"- TFLM_ROOT: `{tflm_root}`",
        "",
    ]
    for m in ms:
        lines += _result_table(m)
    lines += ["## TFLM tree provenance", "", tree_provenance(tflm_root), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tflm-root", default=os.environ.get("TFLM_ROOT"), help="TFLM tree (default: $TFLM_ROOT)"
    )
    ap.add_argument(
        "--build",
        type=Path,
        action="append",
        help="an `edgeq run` output folder, repeatable (default: run the digits pipeline)",
    )
    ap.add_argument("--storage", help="with no --build: the digits pipeline's --storage (e.g. lut)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    ap.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="results file (default benchmarks/results/firmware_build.md)",
    )
    args = ap.parse_args(argv)
    try:
        tflm_root = check_tflm_root(args.tflm_root)
    except TflmRootError as e:
        print(f"firmware_build: {e}", file=sys.stderr)
        return 2
    cmd = "python benchmarks/firmware_build.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ms = []
    with tempfile.TemporaryDirectory(prefix="edgeq-fw-") as tmp:
        builds = [b.resolve() for b in args.build or []] or [run_pipeline(Path(tmp) / "digits", args.storage)]
        for i, build in enumerate(builds):
            try:
                ms.append(measure(build, tflm_root, Path(tmp) / f"work{i}", args.jobs))
            except BuildError as e:
                print(f"firmware_build: {e}", file=sys.stderr)
                return 1
    atomic_write_text(args.out, _markdown(ms, cmd, tflm_root))
    for m in ms:
        d = m["device"]
        print(
            f"{m['model']} ({m['storage']}): {d['bit_identical_rows']}/{d['samples']} rows bit-identical, "
            f"arena {d['arena']['device_bytes']} B (edgeq measured {d['arena']['host_tflm_bytes']} B)"
        )
    print(f"-> {args.out}")
    return 0 if all(m["device"]["bit_identical_rows"] == m["device"]["samples"] for m in ms) else 1


if __name__ == "__main__":
    sys.exit(main())
