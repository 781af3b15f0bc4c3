"""Benchmark: edgeq INT4/LUT runs on the virtual Cortex-M4 board beside int8 PTQ and TF-MOT 4-bit QAT.

    python benchmarks/qemu_firmware.py [--pipelines digits,lenet5] [--limit-lenet N] [--method qiu]

Per pipeline (digits: pipelines/digits.py; lenet5: pipelines/mnist_lenet5.py on --mnist, default
/work/shared/data/mnist.npz), seed 0 and the pipeline's epochs, the float model and its Bayesian twin are
trained once (deploy.app.train_pipeline) and one plan (--method, default qiu, at the pipeline's target
bits) is QAT'd once (deploy.app.make_candidate). Rows, each with the reference and the CMSIS-NN kernels:

- edgeq INT4 / edgeq LUT: that candidate exported with --storage int4 / lut for the kernel set, then
  deploy.app.deploy with the target `--board mps2-an386 --kernels K`: the run itself cross-compiles its
  firmware, boots it under qemu-system-arm and streams the test split through it, so report.json's
  target.arena_bytes and target.firmware.flash_bytes are the device's.
- int8 PTQ: the converter's post-training int8 quantization of the same float model (the run's
  model_int8.tflite).
- TF-MOT 4-bit QAT: the same float model through plain TF-MOT (LastValueQuantizer 4 bits, per-axis for
  Conv2D; MovingAverageQuantizer 8-bit activations; benchmarks/lowbit_qat.py tfmot_qat) and the converter,
  QAT'd with the pipeline's epochs, learning rate and batch. No edgeq code in its quantization path.
  Peers get a firmware rendered for their .tflite exactly as a run renders its own (write_c_arrays +
  render_firmware), built with deploy.device.qemu.build_firmware and run like deploy.device.simulate.

Host TFLM accuracy is always over the whole test split; for LeNet-5 only the first --limit-lenet test
images (default 200) go through the device, because the reference kernels take about 0.2 s of QEMU time
per LeNet-5 inference. Writes benchmarks/results/qemu_firmware.md and .json. Exit status 0 when every
device row is bit-identical to host TFLM, 1 otherwise, 2 when the toolchain, QEMU or a TFLM tree is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import commit, machine  # noqa: E402

import edgeq  # noqa: E402,F401  (TF_USE_LEGACY_KERAS before TensorFlow loads)
from deploy.device import qemu  # noqa: E402
from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "qemu_firmware.md"
BOARD = "mps2-an386"
KERNELS = ("reference", "cmsis-nn")
EDGEQ_ROWS = {"edgeq INT4": "int4", "edgeq LUT": "lut"}
PEER_ROWS = ("int8 PTQ", "TF-MOT 4-bit QAT")
PIPELINES = {"digits": "digits.py", "lenet5": "mnist_lenet5.py"}
MNIST = Path("/work/shared/data/mnist.npz")
# Measured before choosing the LeNet-5 default: one int8 LeNet-5 inference with the reference kernels is
# ~187M guest instructions, ~0.22 s under QEMU here, so 200 images cost ~45 s per reference row.
DEFAULT_LENET_LIMIT = 200
ARENA_SLACK = 0.10  # the LeNet-5 target: INT4 arena <= int8 arena + 10% (CMSIS-NN)


# ------------------------------------------------------------------------------------------ helpers


def elf_flash(elf: Path) -> int:
    """Flash an ELF occupies, read independently of deploy.device.qemu: its allocated, file-backed sections
    (readelf -S: flag A, type not NOBITS), i.e. .isr_vector + .text + .rodata + .ARM.exidx + .data."""
    readelf = shutil.which("arm-none-eabi-readelf") or "readelf"
    out = subprocess.run([readelf, "-SW", str(elf)], capture_output=True, text=True, check=True).stdout
    total = 0
    for line in out.splitlines():
        if "]" not in line:
            continue
        f = line.split("]", 1)[1].split()
        # Name Type Addr Off Size ES Flg ...: Flg is absent for sections without flags.
        if len(f) >= 7 and f[1] != "NOBITS" and "A" in f[6]:
            total += int(f[4], 16)
    return total


def counts_summary(counts: list[int]) -> dict:
    """Median/min/max/n of per-inference instruction counts ({} when the plugin gave none)."""
    if not counts:
        return {}
    return {
        "median": int(statistics.median(counts)),
        "min": min(counts),
        "max": max(counts),
        "n": len(counts),
    }


def beside() -> list[str]:
    """Other processes using CPU now (ps %CPU >= 20, not this process tree): what shares the 2 cores."""
    me = os.getpid()
    r = subprocess.run(["ps", "-eo", "pid=,ppid=,pcpu=,args="], capture_output=True, text=True)
    rows = [ln.split(None, 3) for ln in r.stdout.splitlines() if len(ln.split(None, 3)) == 4]
    parent = {int(p): int(pp) for p, pp, _, _ in rows}

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == me:
                return True
            pid = parent.get(pid, 1)
        return False

    return sorted(
        {" ".join(a.split()[:4])[:100] for p, _, c, a in rows if float(c) >= 20 and not ours(int(p))}
    )


@contextlib.contextmanager
def device_limit(n: int | None) -> Iterator[None]:
    """Make the run's own device evaluation stream only the first n test samples (None: all of them).

    deploy.device.simulate.run_on_qemu imports evaluate_on_device when it runs, so patching the module's
    attribute changes nothing else in the run's board path.
    """
    import deploy.device.evaluate as ev

    orig = ev.evaluate_on_device
    if n is not None:
        ev.evaluate_on_device = functools.partial(orig, limit=n)
    try:
        yield
    finally:
        ev.evaluate_on_device = orig


class HostMemo:
    """Host measurements of the same bytes computed once per pipeline, while its rows run.

    On 2 shared cores each edgeq LeNet-5 row costs ~7 passes of host TFLM/LiteRT over 10,000 images
    (export's verification, measure_run's int8/deployed/uncompressed/LiteRT), most of them on models every
    row shares (the int8 PTQ, the converter's output of the one QAT model). The interpreters are
    deterministic, so a pass over the same model bytes and inputs is looked up instead of run again; the
    device path (build, QEMU, device-eval and its host comparison) is never memoized.
    """

    def __init__(self) -> None:
        self.cache: dict[tuple, object] = {}
        self.keep: list[object] = []  # objects keyed by id() stay alive, so no id is reused
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _digest(a) -> str:
        if isinstance(a, (bytes, bytearray)):
            return hashlib.sha256(a).hexdigest()
        if isinstance(a, np.ndarray):
            return (
                hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest()
                + str(a.shape)
                + str(a.dtype)
            )
        return repr(a) if isinstance(a, (str, int, float, type(None))) else f"id{id(a)}"

    def wrap(self, name: str, fn):
        """fn memoized on its arguments' digests (bytes and arrays by content, other objects by id)."""

        @functools.wraps(fn)
        def memoized(*args, **kwargs):
            key = (name, *map(self._digest, args), *sorted((k, self._digest(v)) for k, v in kwargs.items()))
            if key in self.cache:
                self.hits += 1
            else:
                self.misses += 1
                self.keep.extend(
                    a for a in (*args, *kwargs.values()) if not isinstance(a, (bytes, np.ndarray))
                )
                self.cache[key] = fn(*args, **kwargs)
            out = self.cache[key]
            return out.copy() if isinstance(out, np.ndarray) else out

        return memoized

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Patch the host-measurement names export and measure_run call (deploy.app, export, storage)."""
        import deploy.app
        import deploy.export
        import deploy.storage
        import edgeq.bayes

        targets = [
            (deploy.storage, "run_tflm"),
            (deploy.export, "convert"),
            (deploy.app, "convert"),
            (deploy.app, "measure_tflm"),
            (deploy.app, "measure_litert"),
            (deploy.app, "keras_score"),
            (edgeq.bayes, "mc_evaluate"),
        ]
        saved = [(mod, attr, getattr(mod, attr)) for mod, attr in targets]
        for mod, attr, fn in saved:
            setattr(mod, attr, self.wrap(f"{mod.__name__}.{attr}", fn))
        try:
            yield
        finally:
            for mod, attr, fn in saved:
                setattr(mod, attr, fn)


def _device_fields(dev: dict) -> dict:
    """The device_report.json figures every row carries."""
    return {
        "samples": dev["samples"],
        "bit_identical_rows": dev["bit_identical_rows"],
        "max_abs_diff": dev["max_abs_diff"],
        "device_accuracy": dev["device"].get("accuracy"),
        "host_accuracy_same_samples": dev["host_tflm"].get("accuracy"),
        "arena_device_bytes": dev["arena"]["device_bytes"],
        "device_eval_seconds": dev["seconds"],
    }


def _build_fields(b: qemu.QemuBuild) -> dict:
    return {
        "elf_flash_bytes": b.flash_bytes,
        "elf_flash_readelf_bytes": elf_flash(b.elf),
        "text_bytes": b.text_bytes,
        "rodata_bytes": b.rodata_bytes,
        "data_bytes": b.data_bytes,
        "ram_bytes": b.ram_bytes,
    }


# --------------------------------------------------------------------------------------- edgeq rows


def edgeq_row(trained, cand, spec, base_opts, storage: str, kernels: str, out: Path, limit: int | None):
    """One `edgeq run --board mps2-an386 --kernels K --storage S` on the shared candidate's QAT model."""
    from deploy.app import RunOptions, StageClock, deploy, prepare
    from deploy.export import ExportOptions, export
    from deploy.target import load_target

    target = load_target(board=BOARD, kernels=kernels)
    opts = dataclasses.replace(base_opts, out=out, storage=storage, target=target)
    assert isinstance(opts, RunOptions)
    prepare(spec, opts)  # the run's own checks: tools, tree, output folder
    # make_candidate's export stage for this row's storage and kernels, on the QAT model it already tuned
    # (every row shares the plan and its fine-tuned weights; only storage and slicing differ).
    s = trained.splits
    options = ExportOptions(
        storage, target.decode_budget, target.model_ram, kernels=target.kernels, count_code=target.counts_code
    )
    cand = dataclasses.replace(cand, exported=export(cand.qat, s.x_train, s.x_test, options))
    t0 = time.monotonic()
    with device_limit(limit):
        deploy(trained, cand, spec, opts, StageClock())
    rep = json.loads((out / "report.json").read_text())
    dev = json.loads((out / "device_report.json").read_text())
    dep, tgt = rep["models"]["deployed"], rep["target"]
    fw = tgt["firmware"]
    elf = out / fw["elf"]
    sliced = rep.get("slicing")
    return {
        "row": next(k for k, v in EDGEQ_ROWS.items() if v == storage),
        "kernels": kernels,
        "storage": dep.get("storage", storage),
        "path": "edgeq run board path (deploy.app.deploy)",
        "host_accuracy": dep["accuracy_tflm"],
        "host_samples": len(s.y_test),
        "arena_host_bytes": dep["arena_bytes"],
        "model_bytes": dep["flash_bytes"],
        "sliced": sliced is not None,
        "sliced_layers": len(sliced["layers"]) if sliced else 0,
        "report_arena_bytes": tgt["arena_bytes"],
        "report_flash_bytes": fw["flash_bytes"],
        "report_estimated_flash_bytes": fw.get("estimated_flash_bytes"),
        "report_instructions": fw.get("instructions_per_inference"),
        "elf_flash_bytes": fw["flash_bytes"],
        "elf_flash_readelf_bytes": elf_flash(elf),
        "ram_bytes": fw.get("ram_bytes"),
        "instructions": counts_summary(qemu.read_instruction_counts(elf.parent / "instructions.txt")),
        **_device_fields(dev),
        "float_accuracy": rep["models"]["float"]["accuracy"],
        "int8_host_accuracy": rep["models"]["int8"]["accuracy_tflm"],
        "int8_arena_host_bytes": rep["models"]["int8"]["arena_bytes"],
        "seconds": round(time.monotonic() - t0, 1),
    }


# ---------------------------------------------------------------------------------------- peer rows


def peer_row(
    name: str, model: bytes, host: dict, splits, spec_name: str, kernels: str, out: Path, limit: int | None
) -> dict:
    """A peer .tflite in a firmware rendered as a run renders its own, built and run on the QEMU board."""
    from deploy.device.evaluate import evaluate_on_device
    from deploy.export.carrays import write_c_arrays
    from deploy.firmware import render_firmware
    from deploy.flatbuffer import weight_tensors
    from deploy.measure.tflm import arena_bytes, io_quant, tflm_interpreter
    from deploy.target import load_target

    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.tflite").write_bytes(model)
    np.savez(out / "test_data.npz", x=splits.x_test, y=splits.y_test)
    carrays = write_c_arrays(model, out, spec_name)
    target = load_target(board=BOARD, kernels=kernels)
    host_arena = arena_bytes(model)
    render_firmware(
        model,
        out,
        name=spec_name,
        arena_bytes=host_arena,
        input_quant=io_quant(tflm_interpreter(model), "input"),
        c_arrays=carrays,
        board=target.board,
        kernels=kernels,
    )
    build = qemu.build_firmware(out, kernels)
    # As run_on_qemu, with a wall-clock cap scaled to the samples (a hung firmware must not hang this).
    n = len(splits.y_test) if limit is None else min(limit, len(splits.y_test))
    with qemu.QemuBoard(build, count_instructions=True, max_seconds=120 + 3.0 * n) as board:
        dev = evaluate_on_device(board.port or "", out, limit=limit)
        counts = board.instruction_counts()
    return {
        "row": name,
        "kernels": kernels,
        "storage": "+".join(sorted({t.stored_type for t in weight_tensors(model)})).lower(),
        "path": "peer: rendered firmware, build_firmware, QemuBoard, evaluate_on_device",
        "host_accuracy": host["accuracy"],
        "host_samples": len(splits.y_test),
        "arena_host_bytes": host_arena,
        "model_bytes": len(model),
        "sliced": False,
        "sliced_layers": 0,
        **_build_fields(build),
        "instructions": counts_summary(counts),
        **_device_fields(dev),
        "seconds": round(time.monotonic() - t0, 1),
    }


def tfmot_model(trained, spec, seed: int, bits: int = 4) -> bytes:
    """Plain TF-MOT uniform QAT of the float model at `bits`, converted (benchmarks/lowbit_qat.py)."""
    from lowbit_qat import qat_fit, tfmot_qat

    from deploy.export import convert

    qat = tfmot_qat(trained.float_model, bits)
    qat_fit(qat, trained.splits, spec, seed)
    return convert(qat, trained.splits.x_train)


# ---------------------------------------------------------------------------------------- pipelines


def run_pipeline(
    key: str, work: Path, limit: int | None, log, epochs: int | None = None, method: str = "qiu"
) -> dict:
    """Train once, then every row on both kernel sets; the pipeline's results."""
    from deploy.app import RunOptions, StageClock, make_candidate, prepare, train_pipeline
    from deploy.measure import measure_tflm
    from deploy.target import load_target
    from edgeq.pipeline import load_pipeline

    spec = load_pipeline(ROOT / "pipelines" / PIPELINES[key])
    data = str(MNIST) if key == "lenet5" else None
    seed = 0
    base = RunOptions(
        out=work / "train",
        seed=seed,
        data=data,
        storage="int4",
        method=method,
        epochs=epochs,
        target=load_target(board=BOARD),
    )
    spec, target_bits, method = prepare(spec, base)
    t0 = time.monotonic()
    clock = StageClock()
    trained = train_pipeline(spec, base, clock)
    cand = make_candidate(trained, spec, base, method, target_bits, spec.qat_epochs, clock)
    seconds = {"train_and_qat": round(time.monotonic() - t0, 1)}
    log(f"{key}: trained and QAT'd in {seconds['train_and_qat']:.0f} s ({method}, {target_bits:g} bits)")
    s = trained.splits
    rows, shares = [], [beside()]
    memo = HostMemo()
    with memo.active():
        for kernels in KERNELS:
            for storage in EDGEQ_ROWS.values():
                folder = work / f"{storage}-{kernels}"
                r = edgeq_row(trained, cand, spec, base, storage, kernels, folder, limit)
                rows.append(r)
                shares.append(beside())
                log(_line(key, r))
    int8 = (work / "int4-reference" / "model_int8.tflite").read_bytes()
    int8_same = all((work / f"{st}-{k}" / "model_int8.tflite").read_bytes() == int8
                    for st in EDGEQ_ROWS.values() for k in KERNELS)  # fmt: skip
    int8_host = {"accuracy": rows[0]["int8_host_accuracy"]}
    t1 = time.monotonic()
    tfmot = tfmot_model(trained, spec, seed)
    tfmot_m = measure_tflm(tfmot, s.x_test, s.y_test, s.task)
    seconds["tfmot_qat"] = round(time.monotonic() - t1, 1)
    peers = {PEER_ROWS[0]: (int8, int8_host), PEER_ROWS[1]: (tfmot, dict(tfmot_m.scores))}
    for kernels in KERNELS:
        for name, (model, host) in peers.items():
            folder = work / f"{name.split()[0].lower().replace('-', '')}-{kernels}"
            r = peer_row(name, model, host, s, spec.name, kernels, folder, limit)
            rows.append(r)
            shares.append(beside())
            log(_line(key, r))
    seconds["total"] = round(time.monotonic() - t0, 1)
    return {
        "pipeline": key,
        "spec": spec.name,
        "seed": seed,
        "method": method,
        "target_bits": target_bits,
        "epochs": {"float": spec.epochs, "bnn": spec.bnn_epochs, "qat": spec.qat_epochs},
        "test_samples": len(s.y_test),
        "device_samples": rows[0]["samples"],
        "float_accuracy": rows[0]["float_accuracy"],
        "int8_ptq_same_in_every_run": int8_same,
        "host_memo": {"passes_run": memo.misses, "passes_reused": memo.hits},
        "seconds": seconds,
        "beside": sorted({p for b in shares for p in b}),
        "rows": rows,
    }


def _line(key: str, r: dict) -> str:
    ins = r["instructions"].get("median")
    return (
        f"{key} {r['row']:>16} {r['kernels']:>9}: {r['bit_identical_rows']}/{r['samples']} identical, "
        f"host {r['host_accuracy']:.4f} device {r['device_accuracy']:.4f}, "
        f"arena {r['arena_device_bytes']:,} (host {r['arena_host_bytes']:,}), "
        f"flash {r['elf_flash_bytes']:,}, insn {ins:,}, {r['seconds']:.0f} s"
        if ins is not None
        else f"{key} {r['row']} {r['kernels']}: {r['bit_identical_rows']}/{r['samples']} (no counts)"
    )


# ------------------------------------------------------------------------------------------ targets


def _find(rows: list[dict], row: str, kernels: str) -> dict:
    return next(r for r in rows if r["row"] == row and r["kernels"] == kernels)


def lenet_target(p: dict) -> dict:
    """LeNet-5 INT4 with CMSIS-NN: no slicing and device arena <= int8 PTQ device arena (CMSIS-NN) + 10%."""
    int4, int8 = _find(p["rows"], "edgeq INT4", "cmsis-nn"), _find(p["rows"], "int8 PTQ", "cmsis-nn")
    limit = int(int8["arena_device_bytes"] * (1 + ARENA_SLACK))
    return {
        "target": "LeNet-5 4-bit INT4 with CMSIS-NN: no slicing needed and arena <= int8 arena + 10%",
        "int4_sliced": int4["sliced"],
        "int4_arena_device_bytes": int4["arena_device_bytes"],
        "int8_arena_device_bytes": int8["arena_device_bytes"],
        "arena_limit_bytes": limit,
        "met": (not int4["sliced"]) and int4["arena_device_bytes"] <= limit,
    }


def digits_target(p: dict) -> dict:
    """Digits INT4 and LUT on both kernel sets: all rows identical, report arena/flash == the device's."""
    checks = []
    for name in EDGEQ_ROWS:
        for k in KERNELS:
            r = _find(p["rows"], name, k)
            checks.append(
                {
                    "row": name,
                    "kernels": k,
                    "identical": f"{r['bit_identical_rows']}/{r['samples']}",
                    "all_rows": r["samples"] == p["test_samples"] and r["bit_identical_rows"] == r["samples"],
                    "arena_report_eq_device": r["report_arena_bytes"] == r["arena_device_bytes"],
                    "flash_report_eq_elf": r["report_flash_bytes"] == r["elf_flash_readelf_bytes"],
                }
            )
    met = all(c["all_rows"] and c["arena_report_eq_device"] and c["flash_report_eq_elf"] for c in checks)
    return {
        "target": (
            "digits INT4 and LUT on both kernel sets: 270/270 rows identical, "
            "reported arena == device arena, reported firmware flash == ELF flash"
        ),
        "checks": checks,
        "met": met,
    }


# ----------------------------------------------------------------------------------------- markdown


def _table(p: dict) -> list[str]:
    n, total = p["device_samples"], p["test_samples"]
    lines = [
        f"| row | kernels | weights | TFLM host acc. ({total:,}) | device acc. ({n:,}) | "
        "identical / evaluated | arena device B | arena host B | ELF flash B | model B | sliced | "
        "instructions / inference |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    order = [*EDGEQ_ROWS, *PEER_ROWS]
    for r in sorted(p["rows"], key=lambda r: (order.index(r["row"]), KERNELS.index(r["kernels"]))):
        ins = r["instructions"]
        ins_s = f"{ins['median']:,}" if ins else "n/a"
        sliced = f"yes ({r['sliced_layers']} layers)" if r["sliced"] else "no"
        lines.append(
            f"| {r['row']} | {r['kernels']} | {r['storage']} | {100 * r['host_accuracy']:.2f} | "
            f"{100 * r['device_accuracy']:.2f} | {r['bit_identical_rows']}/{r['samples']} | "
            f"{r['arena_device_bytes']:,} | {r['arena_host_bytes']:,} | {r['elf_flash_bytes']:,} | "
            f"{r['model_bytes']:,} | {sliced} | {ins_s} |"
        )
    return lines


def _pipeline_md(p: dict, title: str) -> list[str]:
    e, sec = p["epochs"], p["seconds"]
    n, total = p["device_samples"], p["test_samples"]
    subset = (
        f"the device ran the first {n:,} of the {total:,} test images (host TFLM accuracy is over all "
        f"{total:,}; the device and host columns differ for that reason)"
        if n < total
        else f"the device ran all {total:,} test images"
    )
    return [
        f"## {title}",
        "",
        f"Seed {p['seed']}, float {e['float']} / twin {e['bnn']} / QAT {e['qat']} epochs (TF-MOT QAT: the "
        f"same {e['qat']}); plan {p['method']} at {p['target_bits']:g} mean bits; float Keras accuracy "
        f"{100 * p['float_accuracy']:.2f}%; {subset}. Training and edgeq QAT took "
        f"{sec['train_and_qat']:.0f} s, TF-MOT QAT {sec['tfmot_qat']:.0f} s, the whole pipeline "
        f"{sec['total']:.0f} s. int8 PTQ: the same bytes in every run's model_int8.tflite: "
        f"{'yes' if p['int8_ptq_same_in_every_run'] else 'NO'}. Host TFLM/LiteRT/Keras passes in the edgeq "
        f"rows: {p['host_memo']['passes_run']} run, {p['host_memo']['passes_reused']} reused (same bytes).",
        "",
        *_table(p),
        "",
    ]


def markdown(res: dict) -> str:
    """The results file."""
    m = res["machine"]
    pipes = {p["pipeline"]: p for p in res["pipelines"]}
    lines = [
        "# edgeq INT4 / LUT vs int8 PTQ and TF-MOT 4-bit QAT on the virtual Cortex-M4 (QEMU mps2-an386)",
        "",
        f"- command: `{res['command']}`",
        f"- commit: {res['commit']}",
        f"- machine: {m['cpu']}, {m['nproc']} cores, {m['platform']}, Python {m['python']}",
        f"- toolchain: {res['tools']['compiler']}; {res['tools']['qemu']}",
        f"- flags: `{' '.join(qemu.CPU_FLAGS + qemu.OPT_FLAGS)}`; TFLM trees "
        + ", ".join(f"`{t}`" for t in res["trees"]),
        f"- wall time: {res['seconds']:.0f} s; 1-minute load average {res['load_average'][0]} at the start, "
        f"{res['load_average'][1]} at the end",
        "- ran beside it: "
        + (
            "other jobs shared the 2 cores (processes seen at >= 20% CPU between rows): "
            + "; ".join(f"`{b}`" for b in res["beside"])
            if res["beside"]
            else "nothing else seen at >= 20% CPU between rows"
        )
        + (f"; {res['note']}" if res.get("note") else ""),
        *(
            [f"- **smoke run**: every training stage capped at {res['epochs_cap']} epochs", ""]
            if res.get("epochs_cap")
            else [""]
        ),
        "Each pipeline is trained once (seed 0, its own epochs) and one plan QAT'd once (the method named "
        "below: qiu unless --method says otherwise; `edgeq run`'s default is now the byte planner); every "
        "edgeq row is "
        "that QAT model exported with the row's storage for the row's kernel set and deployed by "
        "`deploy.app.deploy` with the target `--board mps2-an386 --kernels K` (the run's own board path: "
        "it builds the firmware, boots it under QEMU and writes report.json from the device). The peers "
        "are the converter's int8 PTQ of the same float model and plain TF-MOT 4-bit uniform QAT of it "
        "(LastValueQuantizer, per-axis Conv2D, same QAT epochs/lr/batch, converter; Dense stays "
        "FULLY_CONNECTED, as edgeq's default now is), each in a firmware rendered as a run renders its own "
        "and run on the same QEMU board. To fit 2 shared cores, the edgeq rows of a pipeline run each host "
        "measurement (TFLM, LiteRT, Keras; export's verification and measure_run) once per distinct model "
        "bytes and inputs and reuse it in later rows (`HostMemo`; the interpreters are deterministic); the "
        "device path is never reused: every row builds its own ELF and runs it.",
        "",
        "Columns: weights = the deployed model's weight storage (edgeq: the run's; peers: the stored type of "
        "the converter's weight tensors: the converter writes TF-MOT's 4-bit weights as INT4); TFLM host "
        "accuracy over the whole test split (pip tflite_micro, 64-bit host, reference "
        "kernels); device accuracy and rows whose outputs are bit-identical to host TFLM out of the samples "
        "the device evaluated; arena device = `MicroInterpreter::arena_used_bytes()` on the 32-bit target "
        "with that kernel set, arena host = host TFLM's; ELF flash = .text + .rodata + .data of the "
        "firmware (TFLM, kernels, model, startup); model = .tflite bytes; sliced = the deployed model's "
        "weights cut into output-channel slices under the 16 KiB decode budget (report.json `slicing`); "
        "instructions = median guest instructions per Invoke counted by a QEMU TCG plugin (instruction "
        "counts, not cycles).",
        "",
    ]
    if "digits" in pipes:
        lines += _pipeline_md(pipes["digits"], "digits (8x8 scikit-learn digits, 270 test images)")
    if "lenet5" in pipes:
        lines += _pipeline_md(pipes["lenet5"], "LeNet-5 on MNIST (10,000 test images)")
    lines += ["## Targets (issue #17)", ""]
    t = res["targets"]
    if "lenet5" in t:
        lt = t["lenet5"]
        lines.append(
            f"- {lt['target']}: **{'met' if lt['met'] else 'NOT met'}**. INT4 + CMSIS-NN "
            f"{'sliced' if lt['int4_sliced'] else 'not sliced'}, device arena "
            f"{lt['int4_arena_device_bytes']:,} B vs int8 PTQ (CMSIS-NN) {lt['int8_arena_device_bytes']:,} B "
            f"+ 10% = {lt['arena_limit_bytes']:,} B."
        )
    if "digits" in t:
        dt = t["digits"]
        parts = [
            f"{c['row']} {c['kernels']} {c['identical']}, arena report == device "
            f"{'yes' if c['arena_report_eq_device'] else 'NO'}, flash report == ELF "
            f"{'yes' if c['flash_report_eq_elf'] else 'NO'}"
            for c in dt["checks"]
        ]
        lines.append(f"- {dt['target']}: **{'met' if dt['met'] else 'NOT met'}** ({'; '.join(parts)}).")
    lines += [
        "",
        "Reported figures are report.json's `target.arena_bytes` and `target.firmware.flash_bytes`; the ELF "
        "flash is read again from the ELF with readelf (allocated, file-backed sections), the device arena "
        "from device_report.json.",
        "",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main


def _tool_versions() -> dict:
    tools = qemu.check_toolchain()

    def first(cmd: list[str]) -> str:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]

    return {
        "compiler": first([tools["arm-none-eabi-g++"], "--version"]),
        "qemu": first([qemu.check_qemu(), "--version"]),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipelines", default="digits,lenet5", help="comma-separated: digits, lenet5")
    ap.add_argument(
        "--limit-lenet",
        type=int,
        default=DEFAULT_LENET_LIMIT,
        help=f"LeNet-5 test images the device runs (default {DEFAULT_LENET_LIMIT}; host TFLM runs all)",
    )
    ap.add_argument(
        "--method", default="qiu", help="allocation method of the edgeq rows (default qiu; a run's: planner)"
    )
    ap.add_argument("--epochs", type=int, default=None, help="cap every training stage (smoke runs only)")
    ap.add_argument("--note", default="", help="what else ran on the machine, for the results header")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results .md (a .json goes beside it)")
    ap.add_argument("--keep", type=Path, default=None, help="keep every run's output folder under this")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.pipelines.split(",") if k.strip()]
    bad = [k for k in keys if k not in PIPELINES]
    if bad or not keys:
        ap.error(f"unknown pipeline(s) {', '.join(bad)}; use {', '.join(PIPELINES)}")
    if args.limit_lenet < 1:
        ap.error("--limit-lenet must be at least 1")
    cmd = " ".join(["python benchmarks/qemu_firmware.py", *(argv if argv is not None else sys.argv[1:])])
    t0, load0 = time.monotonic(), os.getloadavg()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f} s] {text}", flush=True)

    try:
        trees = [str(qemu.find_tree(k)) for k in KERNELS]
        tools = _tool_versions()
    except EdgeqError as e:
        print(f"qemu_firmware: {e}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            work = args.keep.resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgeq-qemu-bench-")))
        pipes = [
            run_pipeline(
                k, work / k, args.limit_lenet if k == "lenet5" else None, log, args.epochs, args.method
            )
            for k in keys
        ]
    targets = {}
    for p in pipes:
        targets[p["pipeline"]] = lenet_target(p) if p["pipeline"] == "lenet5" else digits_target(p)
    res = {
        "command": cmd,
        "commit": commit(("benchmarks", "deploy", "edgeq", "firmware_templates")),
        "machine": machine(),
        "tools": tools,
        "trees": trees,
        "seconds": round(time.monotonic() - t0, 1),
        "load_average": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        "beside": sorted({b for p in pipes for b in p["beside"]}),
        "note": args.note,
        "epochs_cap": args.epochs,
        "targets": targets,
        "pipelines": pipes,
    }
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(res, indent=2) + "\n")
    atomic_write_text(args.out, markdown(res))
    log(f"-> {args.out}")
    ok = all(r["bit_identical_rows"] == r["samples"] for p in pipes for r in p["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
