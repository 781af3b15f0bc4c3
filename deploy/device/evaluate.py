"""`edgeq device-eval`: run the test split on a board over serial; compare with host TFLM bit for bit."""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np

from deploy.device.link import DeviceLink, DeviceReset, LinkError
from deploy.device.protocol import FLAG_NO_CYCLE_COUNTER, DeviceInfo
from edgeq.errors import EdgeqError
from edgeq.io import atomic_write_text

SECTION = "## On-device evaluation"
# A board that reboots again before finishing one more sample is not going to finish the run.
MAX_RESETS_WITHOUT_PROGRESS = 3


class ModelMismatch(EdgeqError):
    """The device holds a different model than the build folder's model.tflite."""


def _r(v: float | None, nd: int = 6) -> float | None:
    return None if v is None else round(float(v), nd)


def check_model(info: DeviceInfo, model: bytes, model_path: Path) -> None:
    """Refuse to compare against a device whose model differs in length or CRC-32 from model_path."""
    want_len, want_crc = len(model), zlib.crc32(model)
    if info.model_len != want_len or info.model_crc32 != want_crc:
        raise ModelMismatch(
            f"the device holds a different model: it reports {info.model_len:,} B with CRC-32 "
            f"0x{info.model_crc32:08X}, but {model_path} is {want_len:,} B with CRC-32 0x{want_crc:08X}; "
            "flash this build (edgeq flash --board NAME --build OUT_DIR) and try again"
        )


def _load_build(build: Path) -> tuple[bytes, np.ndarray, np.ndarray]:
    from deploy.artifacts import check_folder

    check_folder(build)  # a folder a killed run left half-moved holds files of two runs: say so first
    model_path, data_path = build / "model.tflite", build / "test_data.npz"
    for p in (model_path, data_path):
        if not p.is_file():
            raise EdgeqError(f"{p} not found; --build must name an `edgeq run` output folder")
    with np.load(data_path) as d:
        if "x" not in d or "y" not in d:
            raise EdgeqError(f"{data_path} must hold arrays x and y")
        x, y = np.asarray(d["x"]), np.asarray(d["y"])
    if len(x) != len(y) or len(x) == 0:
        raise EdgeqError(f"{data_path}: x has {len(x)} rows and y {len(y)}; need the same number, > 0")
    from deploy.verify import verify_tflite

    model = model_path.read_bytes()
    verify_tflite(model, str(model_path))  # a malformed file must not reach TFLM in this process
    return model, x, y


def _scores(raw: np.ndarray, y: np.ndarray, out_q) -> dict:
    """Accuracy (integer labels) or mean absolute error (anything else) of raw model outputs."""
    from deploy.measure import scores_of

    task = "classification" if y.dtype.kind in "iub" else "regression"
    metric = "accuracy" if task == "classification" else "mae"
    return {"task": task, metric: _r(scores_of(raw, y, out_q, task)[metric])}


def _cycle_stats(cycles: np.ndarray, info: DeviceInfo) -> dict:
    if info.flags & FLAG_NO_CYCLE_COUNTER or not info.clock_hz:
        return {"unit": "none (the board has no cycle counter)", "median": None, "p90": None}
    unit = "host nanoseconds (virtual board), not MCU cycles" if info.cycles_are_host_ns else "MCU cycles"
    med, p90 = float(np.median(cycles)), float(np.percentile(cycles, 90))
    return {
        "unit": unit,
        "median": _r(med, 1),
        "p90": _r(p90, 1),
        "min": int(cycles.min()),
        "max": int(cycles.max()),
        "ms_median": _r(med / info.clock_hz * 1000.0, 6),
        "ms_p90": _r(p90 / info.clock_hz * 1000.0, 6),
    }


def evaluate_on_device(
    port: str,
    build: str | Path,
    *,
    baud: int = 115200,
    limit: int | None = None,
    timeout: float = 2.0,
    retries: int = 3,
) -> dict:
    """Stream build/test_data.npz through the board on port; write device_report.json (+ report.md)."""
    from deploy.measure.tflm import TensorQuant, arena_bytes, quantize_input, run_tflm

    build = Path(build)
    model, x, y = _load_build(build)
    n = len(x) if limit is None else max(0, min(int(limit), len(x)))
    if n == 0:
        raise EdgeqError("--limit must be at least 1")
    x, y = x[:n], y[:n]
    t_start = time.monotonic()
    link = DeviceLink(port, baud, timeout=timeout, retries=retries)
    with link:
        info = link.hello()
        first_info = info
        check_model(info, model, build / "model.tflite")
        in_q = TensorQuant(info.input.shape, info.input.dtype, info.input.scale, info.input.zero_point)
        if int(np.prod(x.shape[1:])) != int(np.prod(in_q.shape)):
            raise EdgeqError(f"test inputs have shape {x.shape[1:]} but the device's input is {in_q.shape}")
        if 4 + info.input.nbytes > info.max_payload or 8 + info.output.nbytes > info.max_payload:
            raise EdgeqError(
                f"the device's EDGEQ_MAX_PAYLOAD is {info.max_payload} B but INFER needs "
                f"{4 + info.input.nbytes} B "
                f"and RESULT {8 + info.output.nbytes} B; rebuild the firmware with a larger EDGEQ_MAX_PAYLOAD"
            )
        xq = quantize_input(x, in_q).astype(in_q.dtype.newbyteorder("<"))
        out_dtype, out_len = info.output.dtype, info.output.nbytes
        outputs: list[np.ndarray | None] = [None] * n
        cycles = np.zeros(n, dtype=np.float64)
        resets: list[dict] = []
        i, resets_here = 0, 0
        while i < n:
            try:
                res = link.infer(i, xq[i].tobytes())
            except DeviceReset as e:
                # Nothing after sample i-1 was acknowledged; re-check the model (it may have been reflashed).
                resets.append({"resumed_at_sample": i, "boot_nonce": f"0x{e.info.boot_nonce:08X}"})
                check_model(e.info, model, build / "model.tflite")
                info = e.info
                resets_here += 1
                if resets_here > MAX_RESETS_WITHOUT_PROGRESS:
                    raise LinkError(
                        f"the device reset {resets_here} times at sample {i}; is it crashing there?"
                    ) from e
                continue
            if len(res.output) != out_len:
                raise LinkError(
                    f"RESULT seq {i} carried {len(res.output)} output bytes, the device's INFO says {out_len}"
                )
            outputs[i] = np.frombuffer(res.output, dtype=out_dtype).reshape(1, -1)
            cycles[i] = res.cycles
            i, resets_here = i + 1, 0
    seconds = time.monotonic() - t_start

    dev = np.concatenate(outputs)
    host = run_tflm(model, x)
    from deploy.measure.tflm import io_quant, tflm_interpreter

    out_q = io_quant(tflm_interpreter(model), "output")
    identical = np.all(dev.reshape(n, -1) == host.reshape(n, -1), axis=1)
    dev_scores, host_scores = _scores(dev, y, out_q), _scores(host, y, out_q)
    host_arena = arena_bytes(model)
    prior = _prior_report(build)
    rep = {
        "port": port,
        "baud": baud,
        "virtual_board": info.cycles_are_host_ns,
        "samples": n,
        "samples_counted": int(sum(o is not None for o in outputs)),
        "task": dev_scores["task"],
        "device": {k: v for k, v in dev_scores.items() if k != "task"},
        "host_tflm": {k: v for k, v in host_scores.items() if k != "task"},
        "bit_identical_rate": _r(identical.mean()),
        "bit_identical_rows": int(identical.sum()),
        "max_abs_diff": int(np.max(np.abs(dev.astype(np.int64) - host.astype(np.int64)))) if dev.size else 0,
        "cycles": _cycle_stats(cycles, info),
        "arena": {
            "device_bytes": info.arena_used,
            "host_tflm_bytes": host_arena,
            "device_minus_host": info.arena_used - host_arena,
            "report_json_bytes": prior.get("arena_bytes"),
        },
        "report_json_accuracy_tflm": prior.get("accuracy_tflm"),
        "model": {"path": "model.tflite", "bytes": len(model), "crc32": f"0x{zlib.crc32(model):08X}"},
        "info": {
            "protocol_version": info.version,
            "clock_hz": info.clock_hz,
            "boot_nonce_first": f"0x{first_info.boot_nonce:08X}",
            "boot_nonce_last": f"0x{info.boot_nonce:08X}",
            "flags": info.flags,
            "max_payload": info.max_payload,
            "input": _desc(info.input),
            "output": _desc(info.output),
        },
        "resets": resets,
        "link": {**asdict(link.stats), "garbage_bytes": link.garbage_bytes},
        "seconds": _r(seconds, 3),
    }
    atomic_write_text(build / "device_report.json", json.dumps(rep, indent=2) + "\n")
    _update_markdown(build, rep)
    from deploy.artifacts import record

    record(build, ("device_report.json", "report.md", "report.html"))  # edgeq's own, as the run's files
    return rep


def _desc(t) -> dict:
    return {"dtype": str(t.dtype), "shape": list(t.shape), "scale": t.scale, "zero_point": t.zero_point}


def _prior_report(build: Path) -> dict:
    """models.deployed.{arena_bytes, accuracy_tflm} of report.json when it exists (else empty)."""
    path = build / "report.json"
    try:
        dep = json.loads(path.read_text())["models"]["deployed"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {k: dep.get(k) for k in ("arena_bytes", "accuracy_tflm")}


def markdown_section(rep: dict) -> str:
    """The "## On-device evaluation" section of report.md."""
    c = rep["cycles"]
    metric = "accuracy" if rep["task"] == "classification" else "mae"
    lines = [
        SECTION,
        "",
        f"Board on `{rep['port']}` ({'virtual board: host TFLM' if rep['virtual_board'] else 'device'}), "
        f"{rep['samples']} test samples, model {rep['model']['bytes']:,} B CRC-32 {rep['model']['crc32']} "
        "(the device reported the same).",
        "",
        "| | device | host TFLM |",
        "|---|---|---|",
        f"| {metric} | {rep['device'][metric]} | {rep['host_tflm'][metric]} |",
        f"| arena bytes | {rep['arena']['device_bytes']:,} | {rep['arena']['host_tflm_bytes']:,} |",
        "",
        f"Outputs bit-identical to host TFLM: {rep['bit_identical_rows']}/{rep['samples']} "
        f"({rep['bit_identical_rate'] * 100:.1f} %), max |diff| {rep['max_abs_diff']}.",
    ]
    if c.get("median") is not None:
        lines.append(
            f"Per inference ({c['unit']}): median {c['median']:,.0f}, p90 {c['p90']:,.0f} "
            f"= {c['ms_median']:.4f} ms median, {c['ms_p90']:.4f} ms p90 at {rep['info']['clock_hz']:,} Hz."
        )
    if rep["virtual_board"]:
        lines.append("Timings come from the virtual board: host nanoseconds, not MCU cycles.")
    if rep["resets"]:
        lines.append(
            f"The device reset {len(rep['resets'])} time(s); the run resumed, no sample counted twice."
        )
    return "\n".join(lines) + "\n"


def _update_markdown(build: Path, rep: dict) -> None:
    """Re-render report.md and report.html from the run's stored Report with this evaluation added."""
    from deploy import report

    if not (build / "report.json").is_file():
        return
    folder_report = report.load(build).with_device(rep)
    report.rerender(build, folder_report)


def summary_line(rep: dict, build: Path) -> str:
    """One line for the terminal."""
    metric = "accuracy" if rep["task"] == "classification" else "mae"
    c = rep["cycles"]
    timing = (
        f", median {c['ms_median']:.4f} ms ({'host ns' if rep['virtual_board'] else 'MCU cycles'})"
        if c.get("median") is not None
        else ""
    )
    return (
        f"device-eval: {rep['samples']} samples, {metric} {rep['device'][metric]} on device vs "
        f"{rep['host_tflm'][metric]} host TFLM, {rep['bit_identical_rate'] * 100:.1f}% "
        f"bit-identical{timing}, "
        f"arena {rep['arena']['device_bytes']:,} B device vs {rep['arena']['host_tflm_bytes']:,} B host; "
        f"wrote {build / 'device_report.json'}"
    )


def parser() -> argparse.ArgumentParser:
    """Arguments of `edgeq device-eval`."""
    p = argparse.ArgumentParser(
        prog="edgeq device-eval", description="run the test split on a board over serial"
    )
    p.add_argument(
        "--port", required=True, help="serial port of the board (e.g. /dev/ttyACM0, COM3, /dev/pts/5)"
    )
    p.add_argument(
        "--build", required=True, help="output folder of `edgeq run` (model.tflite, test_data.npz)"
    )
    p.add_argument("--baud", type=int, default=115200, help="baud rate (default 115200)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test samples")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each answer (default 2)")
    p.add_argument("--retries", type=int, default=3, help="resends after a timeout or bad CRC (default 3)")
    return p


def main_device_eval(argv: list[str] | None = None) -> int:
    """`edgeq device-eval --port PORT --build OUT_DIR [...]`: 0 on success, 2 with one line on error."""
    args = parser().parse_args(argv)
    try:
        rep = evaluate_on_device(
            args.port,
            args.build,
            baud=args.baud,
            limit=args.limit,
            timeout=args.timeout,
            retries=args.retries,
        )
    except EdgeqError as e:
        print(f"edgeq: error: {e}", file=sys.stderr)
        return 2
    print(summary_line(rep, Path(args.build)))
    return 0
