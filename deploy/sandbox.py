"""TFLM on untrusted model bytes in a child process: a crash in C becomes one line, never a dead edgeq.

deploy.verify refuses what it can see is malformed, but TFLM's kernels still trust the values a file
gives them (strides, padding, options of the wrong type, offline memory plans). So the part that
hands the bytes to TFLM runs in a fresh interpreter (``sys.executable -P -c``) that imports only
numpy and tflite_micro (about 0.2 s per call on an idle machine); its C output comes back for the
error message.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from edgeq.errors import EdgeqError

# The host arena of deploy's TFLM measurements (deploy.measure.tflm.host_arena_size: 4 MiB + 4x the model).
_BASE_ARENA = 4 * 1024 * 1024
DEFAULT_TIMEOUT_S = 60.0
_ARENA_RE = re.compile(r"Arena allocation total (\d+) bytes")
_NODE_RE = re.compile(r"Node (\S+) \(number (\d+)[^)]*\) failed to (prepare|invoke)")
# TFLM's lines that only repeat that something failed; the line before them says what.
_GENERIC = re.compile(
    r"failed to (prepare|invoke|allocate)|Failed starting model allocation|AllocateTensors\(\) failed|"
    r"Invoke\(\) called after initialization failed|^\s*$",
    re.IGNORECASE,
)
_NO_KERNEL = re.compile(
    r"Didn't find op for builtin opcode '(\w+)'|Failed to get registration from op code (\w+)"
)
_HYBRID = re.compile(r"hybrid|FLOAT32 with filter type: INT8|float32 input with int8 weights", re.IGNORECASE)

# Runs in the child: load, allocate, invoke once on zeros, print the recording allocator's figures.
# Python-level failures go to result.json; C output goes to the child's stdout/stderr, which we keep.
_CHILD = r"""
import json, sys
import numpy as np
from tflite_micro.python.tflite_micro import runtime
folder, arena, alt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stage = "load"
try:
    model = open(folder + "/model.tflite", "rb").read()
    interp = runtime.Interpreter.from_bytes(model, arena_size=arena, alt_decompression_memory_size=alt)
    stage = "invoke"
    det = interp.get_input_details(0)
    interp.set_input(np.zeros(det["shape"], det["dtype"]), 0)
    interp.invoke()
    sys.stdout.flush()
    interp.print_allocations()
    result = {"ok": True}
except Exception as e:
    result = {"ok": False, "stage": stage, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
open(folder + "/result.json", "w").write(json.dumps(result))
"""


class ModelNotRunnable(EdgeqError):
    """A readable model TFLM refuses to allocate or run (hybrid, unsupported operator); `reason` says why."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(f"TFLM cannot run {label}: {reason}")
        self.reason = reason


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def explain(output: str, error: str, custom_ops: tuple[str, ...] = ()) -> str:
    """The one line of TFLM's C output (or the Python error) that says why a model cannot run."""
    lines = [ln.strip() for ln in output.splitlines()]
    missing = next((m for m in map(_NO_KERNEL.search, lines) if m), None)
    if missing:
        op = missing.group(1) or missing.group(2)
        if op == "CUSTOM" and custom_ops:
            op = ", ".join(custom_ops)
        return f"TFLM has no kernel for {op}; replace that layer or register a kernel for it"
    specific = [ln for ln in lines if not _GENERIC.search(ln) and not _ARENA_RE.search(ln)]
    node = next((m for m in map(_NODE_RE.search, lines) if m), None)
    reason = (specific[0] if specific else error).rstrip(".")
    if node:
        reason = f"operator #{node.group(2)} {node.group(1)}: {reason}"
    if _HYBRID.search(output):
        reason += (
            " (a hybrid model: float activations with int8 weights; TFLM runs full-integer models, so "
            "convert with a representative dataset and int8 inputs/outputs)"
        )
    return reason


def _custom_ops(model_bytes: bytes) -> tuple[str, ...]:
    """Custom operator names of a verified model other than DECODE, which every TFLM registers."""
    from deploy.flatbuffer import DECODE_OP
    from deploy.verify import builtin_code, opcode_name, parse_verified

    fb = parse_verified(model_bytes)
    names = {opcode_name(oc) for oc in fb.operatorCodes if builtin_code(oc) == 32}  # BuiltinOperator.CUSTOM
    return tuple(sorted(names - {DECODE_OP}))


def tflm_arena_isolated(
    model_bytes: bytes,
    label: str = "the model",
    *,
    alt_decompression: int = 0,
    arena_size: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> int:
    """Arena total of TFLM's recording allocator after one invoke (plus alt decompression), run in a child.

    Raises FlatbufferError when TFLM crashes or hangs on the file, ModelNotRunnable when it refuses it.
    """
    from deploy.flatbuffer import FlatbufferError

    data = bytes(model_bytes)
    arena = _BASE_ARENA + 4 * len(data) if arena_size is None else int(arena_size)
    with tempfile.TemporaryDirectory(prefix="edgeq-tflm-") as folder:
        (Path(folder) / "model.tflite").write_bytes(data)
        try:
            r = subprocess.run(
                [sys.executable, "-P", "-c", _CHILD, folder, str(arena), str(int(alt_decompression))],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise FlatbufferError(
                f"TFLM did not finish reading {label} within {timeout_s:.0f} s; the file is malformed or far "
                "too large for a microcontroller; pass a .tflite written by the TFLite converter"
            ) from None
        output = r.stdout.decode(errors="replace")
        result_path = Path(folder) / "result.json"
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if r.returncode < 0:
        sig = -r.returncode
        raise FlatbufferError(
            f"TFLM crashed reading {label} (signal {sig}, {_signal_name(sig)}); the file is malformed or "
            "uses something this TFLM cannot handle; pass a .tflite written by the TFLite converter"
        )
    if result is None:
        last = next((ln for ln in reversed(output.splitlines()) if ln.strip()), "no output")
        raise FlatbufferError(
            f"TFLM's child process ended with status {r.returncode} on {label} ({last[:200]}); check that "
            f"tflite-micro is installed for {sys.executable}"
        )
    if not result["ok"]:
        custom = _custom_ops(data) if "op code CUSTOM" in output else ()
        raise ModelNotRunnable(label, explain(output, result["error"], custom))
    m = _ARENA_RE.search(output)
    if not m:
        raise ModelNotRunnable(label, "TFLM printed no arena figure; is this the recording interpreter?")
    return int(m.group(1)) + int(alt_decompression)
