"""Weight quantizers (numpy): uniform on [lo, hi], Gaussian-quantile non-uniform, and Lloyd-Max."""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

from edgeq.errors import PlanError
from edgeq.plan import LayerBits


def _check_bits(bits: int) -> int:
    """bits as an int >= 1, else PlanError."""
    if int(bits) != bits or bits < 1:
        raise PlanError(f"bits must be an integer >= 1, got {bits!r}; ask for at least 1 bit")
    return int(bits)


def _check_fit(x: np.ndarray, bits: int, what: str) -> np.ndarray:
    """x as a finite float64 array with at least 2**bits values, the data a grid is fitted to."""
    bits = _check_bits(bits)
    x = np.asarray(x, dtype=np.float64)
    if x.size < 2**bits:
        raise PlanError(
            f"{what}: {x.size} values cannot fill a {bits}-bit grid of {2**bits} levels; "
            f"use at most {max(x.size.bit_length() - 1, 0)} bits for this layer"
        )
    if not np.all(np.isfinite(x)):
        raise PlanError(f"{what}: the values to quantize are not all finite; fix the weights first")
    return x


def _uniform_grid(x: np.ndarray, bits: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Q(x) = lo + s * clamp(round((x - lo) / s), 0, 2**bits - 1) and the 2**bits grid points."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise PlanError(f"uniform range [{lo}, {hi}] is not finite; pass finite lo and hi")
    if hi < lo:
        raise PlanError(f"uniform range has hi={hi} < lo={lo}; swap them")
    n = 2**bits - 1
    if hi == lo:
        # A constant range has one point: every value maps onto it.
        return np.full(x.shape, float(lo)), np.array([float(lo)])
    s = (hi - lo) / n
    q = lo + s * np.clip(np.rint((x - lo) / s), 0, n)
    return q, lo + s * np.arange(n + 1, dtype=np.float64)


def uniform(
    x: np.ndarray, bits: int, lo: float | None = None, hi: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Uniform 2**bits-point grid on [lo, hi] (default: 5th/95th percentiles of x); returns (Q(x), levels)."""
    x = _check_fit(x, bits, "uniform quantizer")
    p5, p95 = np.percentile(x, [5, 95]) if lo is None or hi is None else (lo, hi)
    lo = float(p5) if lo is None else float(lo)
    hi = float(p95) if hi is None else float(hi)
    return _uniform_grid(x, int(bits), lo, hi)


def _project(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Each value of x replaced by its nearest level (levels sorted ascending)."""
    if levels.size == 1:
        return np.full(x.shape, levels[0])
    mids = (levels[1:] + levels[:-1]) / 2
    return levels[np.searchsorted(mids, x, side="left")]


def gaussian_quantile(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-uniform grid from N(mean, std) fitted to x: quantile cells, midpoints inside, medians in tails."""
    x = _check_fit(x, bits, "gaussian_quantile quantizer")
    m = 2 ** int(bits)
    mean, std = float(x.mean()), float(x.std())
    if std == 0:
        return np.full(x.shape, mean), np.array([mean])
    bounds = mean + std * ndtri(np.arange(1, m) / m)  # a_1 .. a_{m-1}
    levels = np.empty(m)
    levels[1:-1] = (bounds[1:] + bounds[:-1]) / 2
    levels[0] = mean + std * ndtri(1 / (2 * m))
    levels[-1] = mean + std * ndtri((2 * m - 1) / (2 * m))
    # Cell k is [a_k, a_{k+1}); the tails are the first and last cells.
    return levels[np.searchsorted(bounds, x, side="right")], levels


def lloyd_max(
    x: np.ndarray, bits: int, weights: np.ndarray | None = None, iters: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd-Max (weighted) squared-error quantizer started from quantiles of x; returns (Q(x), levels)."""
    x = _check_fit(x, bits, "lloyd_max quantizer")
    shape, x = x.shape, x.ravel()
    m = 2 ** int(bits)
    if weights is None:
        w = np.ones_like(x)
    else:
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.shape != x.shape or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise PlanError("lloyd_max weights must be positive, finite and one per value (e.g. 1/sigma**2)")
    if int(iters) != iters or iters < 0:
        raise PlanError(f"lloyd_max iters must be an integer >= 0, got {iters!r}")
    levels = np.quantile(x, (np.arange(m) + 0.5) / m)
    for _ in range(int(iters)):
        # Boundaries at midpoints of adjacent levels = nearest-level cells.
        cell = np.searchsorted((levels[1:] + levels[:-1]) / 2, x, side="left")
        wsum = np.bincount(cell, weights=w, minlength=m)
        wx = np.bincount(cell, weights=w * x, minlength=m)
        filled = wsum > 0
        new = levels.copy()
        new[filled] = wx[filled] / wsum[filled]  # empty cells keep their previous level
        if np.array_equal(new, levels):
            break
        levels = new
    return _project(x, levels).reshape(shape), levels


def quantize(x: np.ndarray, layer_bits: LayerBits) -> np.ndarray:
    """x quantized as layer_bits says: uniform on its lo/hi, or projected onto its stored levels."""
    bits = _check_bits(layer_bits.bits)
    x = np.asarray(x, dtype=np.float64)
    if layer_bits.quantizer == "uniform":
        lo, hi = layer_bits.lo, layer_bits.hi
        if lo is None or hi is None:
            # A hand-written plan: the paper's default range, fitted here (no grid-filling requirement,
            # since a uniform grid is fixed by lo/hi alone).
            p5, p95 = np.percentile(x, [5, 95])
            lo = float(p5) if lo is None else lo
            hi = float(p95) if hi is None else hi
        return _uniform_grid(x, bits, float(lo), float(hi))[0]
    if layer_bits.levels is None:
        fit = gaussian_quantile if layer_bits.quantizer == "quantile" else lloyd_max
        return fit(x, bits)[0]
    levels = np.sort(np.asarray(layer_bits.levels, dtype=np.float64))
    if levels.size == 0 or levels.size > 2**bits or not np.all(np.isfinite(levels)):
        raise PlanError(
            f"{layer_bits.quantizer} plan has {levels.size} levels for {bits} bits; "
            f"store 1..{2**bits} finite levels (rebuild the plan with edgeq.allocate)"
        )
    return _project(x, levels)
