"""Measurements in the real runtimes: TFLM and LiteRT accuracy, agreement, arena, latency, sizes."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from deploy.tflm import (
    RuntimeFailure,
    arena_bytes,
    dequantize,
    io_quant,
    quantize_input,
    run_tflm,
    tflm_interpreter,
)

LITERT_RESOLVERS = ("BUILTIN_REF", "BUILTIN_WITHOUT_DEFAULT_DELEGATES")


def litert_interpreter(model: bytes, resolver: str = "BUILTIN_REF"):
    """A LiteRT interpreter without the default XNNPACK delegate (it refuses INT4 FULLY_CONNECTED)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        interp = Interpreter(
            model_content=bytes(model), experimental_op_resolver_type=OpResolverType[resolver]
        )
        interp.allocate_tensors()
    except (RuntimeError, ValueError) as e:
        raise RuntimeFailure(f"LiteRT could not load the model: {str(e).splitlines()[0]}") from e
    return interp


def run_litert(model: bytes, x: np.ndarray, resolver: str = "BUILTIN_REF") -> np.ndarray:
    """Raw (integer) outputs of LiteRT for every float input row of x."""
    interp = litert_interpreter(model, resolver)
    q = io_quant(interp, "input")
    inp, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
    outs = []
    for row in quantize_input(x, q):
        interp.set_tensor(inp, row.reshape(q.shape))
        interp.invoke()
        outs.append(interp.get_tensor(out).reshape(1, -1).copy())
    return np.concatenate(outs)


def score(raw: np.ndarray, y: np.ndarray, out_q, task: str) -> dict[str, float]:
    """Accuracy (classification) or MAE/MSE on dequantized outputs (regression)."""
    if task == "regression":
        pred = dequantize(raw, out_q).reshape(-1)
        err = pred - np.asarray(y, dtype=np.float32).reshape(-1)
        return {"mae": float(np.mean(np.abs(err))), "mse": float(np.mean(err**2))}
    return {"accuracy": float(np.mean(raw.argmax(1) == np.asarray(y)))}


def output_quant(model: bytes):
    """The model's output quantization, read from TFLM."""
    return io_quant(tflm_interpreter(model), "output")


def median_latency_us(invoke, warmup: int = 5, runs: int = 50) -> float:
    """Median wall time of invoke() in microseconds after warm-up (a host ratio, not an MCU time)."""
    for _ in range(warmup):
        invoke()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        invoke()
        times.append(time.perf_counter_ns() - t0)
    return float(np.median(times) / 1000.0)


def tflm_latency_us(model: bytes, sample: np.ndarray, runs: int = 50) -> float:
    """Median TFLM invoke time for one sample."""
    interp = tflm_interpreter(model)
    q = io_quant(interp, "input")
    interp.set_input(quantize_input(sample, q).reshape(q.shape), 0)
    return median_latency_us(interp.invoke, runs=runs)


def litert_latency_us(
    model: bytes, sample: np.ndarray, resolver: str = "BUILTIN_WITHOUT_DEFAULT_DELEGATES", runs: int = 50
) -> float:
    """Median LiteRT invoke time for one sample."""
    interp = litert_interpreter(model, resolver)
    q = io_quant(interp, "input")
    interp.set_tensor(interp.get_input_details()[0]["index"], quantize_input(sample, q).reshape(q.shape))
    return median_latency_us(interp.invoke, runs=runs)


@dataclass(frozen=True)
class Agreement:
    """How often two runtimes' raw outputs agree, bit for bit, over a test split."""

    bit_exact: bool
    rows_identical: float
    max_abs_diff: int


def agreement(a: np.ndarray, b: np.ndarray) -> Agreement:
    """Compare two raw output arrays row by row."""
    same = np.all(a == b, axis=1)
    diff = int(np.max(np.abs(a.astype(np.int64) - b.astype(np.int64)))) if a.size else 0
    return Agreement(bool(same.all()), float(same.mean()), diff)


@dataclass(frozen=True)
class LiteRTCheck:
    """LiteRT with one op resolver: its score, its agreement with TFLM's raw outputs, its latency."""

    resolver: str
    scores: dict[str, float]
    vs_tflm: Agreement
    latency_us: float


def check_litert(
    model: bytes, x: np.ndarray, y: np.ndarray, task: str, tflm_raw: np.ndarray
) -> list[LiteRTCheck]:
    """LiteRT's reference and optimized (no delegate) resolvers, each held against TFLM's outputs."""
    out_q = output_quant(model)
    checks = []
    for resolver in LITERT_RESOLVERS:
        raw = run_litert(model, x, resolver)
        checks.append(
            LiteRTCheck(
                resolver,
                score(raw, y, out_q, task),
                agreement(tflm_raw, raw),
                litert_latency_us(model, x[0], resolver),
            )
        )
    return checks


def alt_decompression_size(model: bytes) -> int:
    """Bytes of alternate decompression memory that hold the largest DECODE output (16-byte aligned).

    Measured here: TFLM reuses that region for every DECODE; a smaller region makes it fall back to
    the arena without a word, so it must fit the largest decoded tensor. 0 for models without DECODE.
    """
    from deploy.flatbuffer import describe
    from deploy.inspect import op_sequence

    info = describe(model)
    sizes = [
        int(np.prod(info.tensor(o[0]).shape)) for name, _, o in op_sequence(model) if name == "TFLM_DECODE"
    ]
    return (max(sizes) + 15) // 16 * 16 if sizes else 0


def measure_tflm(
    model: bytes, x: np.ndarray, y: np.ndarray, task: str, *, alt_decompression: int = 0
) -> dict:
    """TFLM figures for one model: score on (x, y), arena, latency, flash; plus the raw outputs."""
    raw = run_tflm(model, x, alt_decompression=alt_decompression)
    figures = {f"{k}_tflm": v for k, v in score(raw, y, output_quant(model), task).items()}
    figures.update(
        flash_bytes=len(model),
        arena_bytes=arena_bytes(model, x[0], alt_decompression=alt_decompression),
        latency_tflm_us=tflm_latency_us(model, x[0]),
    )
    if alt_decompression:
        figures["alt_decompression_bytes"] = alt_decompression  # counted in arena_bytes too
    return {"figures": figures, "raw": raw}
