"""Measurements in the real runtimes: one Measurement per model and runtime, agreement between them.

Each model is measured once per runtime: one interpreter runs the whole split, then reports its arena
and times one sample, and the raw outputs are kept for the agreement checks.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from deploy.measure import litert
from deploy.measure.tflm import (
    TensorQuant,
    dequantize,
    interpreter_arena,
    invoke_all,
    io_quant,
    quantize_input,
    tflm_interpreter,
)
from edgeq.scoring import score

__all__ = [
    "Agreement",
    "Measurement",
    "agreement",
    "alt_decompression_size",
    "measure_litert",
    "measure_tflm",
]


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
class Measurement:
    """One model in one runtime: its scores over the split, its bytes, its arena and latency, its outputs."""

    runtime: str  # "tflm", or "litert:<resolver>"
    scores: Mapping[str, float]
    flash_bytes: int
    arena_bytes: int | None  # None where the runtime does not report one (LiteRT)
    latency_us: float  # median invoke of one sample on this host: a ratio, not an MCU time
    outputs: np.ndarray = field(compare=False, repr=False)
    alt_decompression_bytes: int = 0  # counted in arena_bytes too

    @property
    def digest(self) -> str:
        """sha256 of the raw outputs: equal digests mean bit-identical outputs."""
        return hashlib.sha256(np.ascontiguousarray(self.outputs).tobytes()).hexdigest()

    def vs(self, other: Measurement) -> Agreement:
        """Agreement of this measurement's outputs with another's."""
        return agreement(other.outputs, self.outputs)


def median_latency_us(invoke: Callable[[], object], warmup: int = 5, runs: int = 50) -> float:
    """Median wall time of invoke() in microseconds after warm-up (a host ratio, not an MCU time)."""
    for _ in range(warmup):
        invoke()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        invoke()
        times.append(time.perf_counter_ns() - t0)
    return float(np.median(times) / 1000.0)


def scores_of(raw: np.ndarray, y: np.ndarray, out_q: TensorQuant, task: str) -> dict[str, float]:
    """Scores of raw integer outputs: argmax for classification, dequantized values for regression."""
    return score(dequantize(raw, out_q) if task == "regression" else raw, y, task)


def measure_tflm(
    model: bytes, x: np.ndarray, y: np.ndarray, task: str, *, alt_decompression: int = 0
) -> Measurement:
    """TFLM: score on (x, y), arena, latency of x[0] and flash, all from one interpreter."""
    interp = tflm_interpreter(model, alt_decompression=alt_decompression)
    raw = invoke_all(interp, x)
    q = io_quant(interp, "input")
    # The arena is read after the first sample, as a fresh interpreter would report it.
    interp.set_input(quantize_input(x[0], q).reshape(q.shape), 0)
    interp.invoke()
    return Measurement(
        runtime="tflm",
        scores=scores_of(raw, y, io_quant(interp, "output"), task),
        flash_bytes=len(model),
        arena_bytes=interpreter_arena(interp, alt_decompression),
        latency_us=median_latency_us(interp.invoke),
        outputs=raw,
        alt_decompression_bytes=alt_decompression,
    )


def measure_litert(model: bytes, x: np.ndarray, y: np.ndarray, task: str, resolver: str) -> Measurement:
    """LiteRT with one op resolver: score on (x, y), latency of x[0], raw outputs."""
    interp = litert.litert_interpreter(model, resolver)
    raw = litert.invoke_all(interp, x)
    litert.set_sample(interp, x[0])
    return Measurement(
        runtime=f"litert:{resolver}",
        scores=scores_of(raw, y, io_quant(interp, "output"), task),
        flash_bytes=len(model),
        arena_bytes=None,
        latency_us=median_latency_us(interp.invoke),
        outputs=raw,
    )


def alt_decompression_size(model: bytes) -> int:
    """Bytes of alternate decompression memory that hold the largest DECODE output (16-byte aligned).

    Measured here: TFLM reuses that region for every DECODE; a smaller region makes it fall back to
    the arena without a word, so it must fit the largest decoded tensor. 0 for models without DECODE.
    """
    from deploy.flatbuffer import DECODE_OP, describe
    from deploy.inspect import op_sequence

    info = describe(model)
    sizes = [int(np.prod(info.tensor(o[0]).shape)) for name, _, o in op_sequence(model) if name == DECODE_OP]
    return (max(sizes) + 15) // 16 * 16 if sizes else 0
