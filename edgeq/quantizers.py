"""Weight quantizers (numpy): uniform on [lo, hi], Gaussian-quantile non-uniform, and Lloyd-Max."""

from __future__ import annotations

from collections.abc import Iterable

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


# The quantizer grids a LayerBits may name: "uniform" (a range, stored as the converter's symmetric grid in
# QAT), and the level sets, each fitted by its function (x, bits) -> (quantized x, levels). A new grid is one
# function and one entry here; edgeq.plan validates names against GRIDS.
LEVEL_FITS = {"quantile": gaussian_quantile, "lloyd_max": lloyd_max}
GRIDS = ("uniform", *LEVEL_FITS)


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
        return LEVEL_FITS[layer_bits.quantizer](x, bits)[0]
    levels = np.sort(np.asarray(layer_bits.levels, dtype=np.float64))
    if levels.size == 0 or levels.size > 2**bits or not np.all(np.isfinite(levels)):
        raise PlanError(
            f"{layer_bits.quantizer} plan has {levels.size} levels for {bits} bits; "
            f"store 1..{2**bits} finite levels (rebuild the plan with edgeq.allocate)"
        )
    return _project(x, levels)


# --- Symmetric narrow-range grids: what TF-MOT's fake quant and the TFLite converter store --------------
#
# A b-bit tensor (or channel) converts to integers in [-n, n], n = 2**(b-1) - 1, times one scale s = r / n
# (zero point 0): at 2 bits that is {-r, 0, +r}. The range r is the only free parameter, and it decides the
# accuracy: max|w| wastes levels on outliers, a fixed percentile ignores how much each weight matters.


def _levels_half(bits: int) -> int:
    """n = 2**(bits-1) - 1: the positive levels of a b-bit symmetric narrow-range grid."""
    bits = _check_bits(bits)
    if bits < 2:
        raise PlanError(f"a symmetric narrow-range grid needs at least 2 bits, got {bits}; use 2..8")
    return 2 ** (bits - 1) - 1


def _columns(x: np.ndarray, per_channel: bool) -> np.ndarray:
    """x as (values, channels): channels along the last axis (TF-MOT's per_axis), or one column."""
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(-1, x.shape[-1]) if per_channel and x.ndim > 0 else x.reshape(-1, 1)


def symmetric_uniform(
    x: np.ndarray, bits: int, r: np.ndarray | float, *, per_channel: bool = False
) -> np.ndarray:
    """Q(x) = s * clip(round(x / s), -n, n) with s = r / n per channel (last axis) or per tensor."""
    n = _levels_half(bits)
    x = np.asarray(x, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise PlanError("symmetric ranges must be finite and >= 0; fit them with symmetric_range")
    want = (x.shape[-1],) if per_channel and x.ndim > 0 else ()
    if r.shape != want and r.size != 1:
        unit = "one per channel (last axis)" if want else "one"
        raise PlanError(f"{r.size} ranges for values of shape {x.shape}; pass {unit}")
    s = (r.reshape(()) if r.size == 1 else r) / n  # broadcasts along the last axis when per channel
    safe = np.where(s > 0, s, 1.0)
    return np.where(s > 0, safe * np.clip(np.rint(x / safe), -n, n), 0.0)


def weighted_error(
    x: np.ndarray,
    bits: int,
    r: np.ndarray | float,
    weights: np.ndarray | None = None,
    *,
    per_channel: bool = False,
) -> np.ndarray:
    """sum(weights * (Q(x) - x)**2) per channel (or one value) for the symmetric grid of range r."""
    q = symmetric_uniform(x, bits, r, per_channel=per_channel)
    w = np.ones_like(q) if weights is None else np.asarray(weights, dtype=np.float64)
    return (_columns(w * (q - np.asarray(x, dtype=np.float64)) ** 2, per_channel)).sum(axis=0)


_BLOCK_ELEMENTS = 1 << 15  # values (or candidate cells) per block of channels in _errors_for


def _errors_for(key: np.ndarray, prefix: np.ndarray, n: int, t: np.ndarray, count: int) -> np.ndarray:
    """Weighted error of each candidate level spacing t (channels, candidates) on |x| / max|x| (exact).

    The values of channel c are sorted in key[c * count:(c + 1) * count] offset by 2c, so one searchsorted
    finds every cell boundary (k + 1/2) t of every channel at once; prefix sums of w, w u and w u^2 then
    give each cell's error sum w (u - k t)^2 = S2 - 2 k t S1 + k^2 t^2 S0 without touching the values again.
    prefix: (channels, count + 1, 3), the prefix sums of w, w u and w u^2 side by side.
    """
    chans, cands = t.shape
    # A block of channels at a time: its sorted values and its (channels, candidates, n) temporaries stay
    # in cache (a 512-channel 3x3 layer at bits 2..8: 7.0 -> 3.3-4.1 s on one core), the same numbers.
    block = max(1, _BLOCK_ELEMENTS // max(count, cands * (n + 2)))
    parts = []
    for c in range(0, chans, block):
        c1 = min(c + block, chans)
        parts.append(_block_errors(key[c * count : c1 * count], prefix[c:c1], n, t[c:c1], count, c))
    return np.concatenate(parts)


def _block_errors(
    key: np.ndarray, prefix: np.ndarray, n: int, t: np.ndarray, count: int, first: int
) -> np.ndarray:
    """_errors_for on channels first.. of key (their values, still offset by 2 x their channel index)."""
    chans, cands = t.shape
    k = np.arange(n + 1, dtype=np.float64)
    bounds = (k[:-1] + 0.5) * t[..., None]  # (channels, candidates, n)
    offset = 2.0 * np.arange(first, first + chans, dtype=np.float64)[:, None, None]
    idx = np.searchsorted(key, bounds + offset, side="left") - count * np.arange(chans)[:, None, None]
    edges = np.concatenate(
        [np.zeros((chans, cands, 1), np.int64), idx, np.full((chans, cands, 1), count, np.int64)], axis=2
    )
    # one gather of the three sums at every cell edge (rows of the flattened prefix), then each cell's sums
    rows = (edges + (count + 1) * np.arange(chans)[:, None, None]).ravel()
    at = prefix.reshape(-1, 3)[rows].reshape(chans, cands, n + 2, 3)
    cell = np.diff(at, axis=2)  # (channels, candidates, n + 1, 3): the sums over level k's cell
    s0, s1, s2 = cell[..., 0], cell[..., 1], cell[..., 2]
    kt = k * t[..., None]
    return (s2 - 2.0 * kt * s1 + kt**2 * s0).sum(axis=2)


def symmetric_range(
    x: np.ndarray,
    bits: int,
    weights: np.ndarray | None = None,
    *,
    per_channel: bool = False,
    candidates: int = 128,
) -> np.ndarray:
    """Range r minimising sum(weights * (Q(x) - x)**2) on the symmetric b-bit grid; shape (channels,) or ().

    The paper's interval learning with weights = 1 / sigma**2: weights the posterior is sure of are held
    close, uncertain ones may be clipped or zeroed. r is searched in two passes over r / max|x| (a coarse
    grid of `candidates` points, then as many around the best), each candidate's error exact (_errors_for);
    arrays of more than EXACT_LIMIT values (EXACT_TENSOR_LIMIT per tensor) on a histogram of each channel
    (RangeSearch).
    A channel of zeros gets r = 0, which symmetric_uniform maps to zeros.
    """
    return symmetric_ranges(x, (bits,), weights, per_channel=per_channel, candidates=candidates)[bits]


def symmetric_ranges(
    x: np.ndarray,
    bits: Iterable[int],
    weights: np.ndarray | None = None,
    *,
    per_channel: bool = False,
    candidates: int = 128,
) -> dict[int, np.ndarray]:
    """symmetric_range at each bit width, sorting x (or histogramming it) once for all of them."""
    search = RangeSearch(x, weights, per_channel=per_channel, candidates=candidates)
    return {int(b): search(b) for b in bits}


EXACT_LIMIT = 1 << 16  # values of a per-channel array searched exactly; larger ones use _ClipHistogram
EXACT_TENSOR_LIMIT = 1 << 20  # the same for one range per tensor (the sort is its cost: LeNet-5's fc1 stays)
# The histogram search: clip fractions of max|x| tried first (2**-10 .. 1), then _REFINE times _FINE between
# the best one's neighbours (error against the clip is jagged at high bits: at 8 bits one refinement leaves
# ~2% on the table against an exact search, three ~0.1%).
_HIST_BINS = 2048  # per channel; uniform in sqrt(|x| / max|x|), finer near 0, where low-bit clips land
_COARSE = 2.0 ** np.linspace(-10.0, 0.0, 21)
_FINE = 16
_REFINE = 3


class RangeSearch:
    """The symmetric range search of one array (per channel along the last axis, or per tensor), any bits.

    Exact (_errors_for on the sorted values) where the array has at most EXACT_LIMIT values
    (EXACT_TENSOR_LIMIT per tensor): the search costs ~5 ms a channel at bits 2..8, what VGG-16's 4,000
    channels cannot pay (11 s on 2 cores), and a tensor its sort (VGG-7's 8.4M-weight fc1: seconds).
    Larger arrays are searched on a weighted histogram of each channel
    (_ClipHistogram: 1.6 s for VGG-16's; the error within 0.04% of the exact search's in total at every bit
    width, a channel of 576 values up to 4% worse at 7-8 bits).
    """

    def __init__(
        self,
        x: np.ndarray,
        weights: np.ndarray | None = None,
        *,
        per_channel: bool = False,
        candidates: int = 128,
    ) -> None:
        cols = _columns(x, per_channel)
        if cols.size == 0 or not np.all(np.isfinite(cols)):
            raise PlanError("symmetric_range needs a non-empty array of finite values")
        if weights is None:
            w = np.ones_like(cols)
        else:
            w = _columns(np.broadcast_to(np.asarray(weights, dtype=np.float64), np.shape(x)), per_channel)
            if not np.all(np.isfinite(w)) or np.any(w <= 0):
                raise PlanError("symmetric_range weights must be positive and finite (e.g. 1 / sigma**2)")
        if int(candidates) != candidates or candidates < 2:
            raise PlanError(f"candidates must be an integer >= 2, got {candidates!r}")
        self.per_channel, self.candidates = per_channel, int(candidates)
        self.count, self.chans = cols.shape
        self.m = np.abs(cols).max(axis=0)
        exact = cols.size <= (EXACT_LIMIT if self.chans > 1 else EXACT_TENSOR_LIMIT)
        self.hist = None if exact else _ClipHistogram(cols, w, self.m)
        if exact:
            u = np.abs(cols) / np.where(self.m > 0, self.m, 1.0)  # in [0, 1]: one candidate grid for all
            order = np.argsort(u, axis=0, kind="stable")
            u, w = np.take_along_axis(u, order, axis=0).T, np.take_along_axis(w, order, axis=0).T
            self.key = (u + 2.0 * np.arange(self.chans)[:, None]).ravel()
            zero = np.zeros((self.chans, 1))
            sums = [np.concatenate([zero, np.cumsum(v, axis=1)], axis=1) for v in (w, w * u, w * u * u)]
            self.prefix = np.stack(sums, axis=-1)  # (channels, count + 1, 3)

    def __call__(self, bits: int) -> np.ndarray:
        """The range per channel (shape (channels,)) or per tensor (shape ()) at this bit width."""
        n = _levels_half(bits)
        if self.hist is not None:
            r = self.hist.best(n) * self.m
        else:
            # Pass 1: r / max|x| on (0, 1]; pass 2: as many points across the best cell's neighbours.
            k, chans = self.candidates, self.chans
            alpha = np.broadcast_to(np.arange(1, k + 1) / k, (chans, k))
            step = 1.0 / k
            best = alpha[0, np.argmin(_errors_for(self.key, self.prefix, n, alpha / n, self.count), axis=1)]
            fine = np.clip(best[:, None] + np.linspace(-step, step, k)[None, :], step / k, 1.0)
            err = _errors_for(self.key, self.prefix, n, fine / n, self.count)
            r = fine[np.arange(chans), np.argmin(err, axis=1)] * self.m
        return r if self.per_channel else r.reshape(())


class _ClipHistogram:
    """Per channel, bin sums of w and w u (u = |x| / max|x|) that give a clip's weighted error in O(levels).

    Bins are uniform in sqrt(u), so a cell's sums are exact up to the two bins it straddles, which are
    interpolated linearly. The sums are kept as (channels, bins + 1) prefix and bin arrays, raveled for flat
    gathers.
    """

    def __init__(self, cols: np.ndarray, w: np.ndarray, m: np.ndarray) -> None:
        c, b = cols.shape[1], _HIST_BINS
        u = np.abs(cols)
        u *= 1.0 / np.where(m > 0, m, 1.0)  # an all-zero channel: u = 0 everywhere, any clip costs nothing
        v = np.sqrt(u)
        v *= b
        idx = v.astype(np.int64)
        np.minimum(idx, b - 1, out=idx)
        idx += np.arange(c, dtype=np.int64) * (b + 1)  # row stride b + 1, the prefix sums' layout
        s0 = np.bincount(idx.ravel(), weights=w.ravel(), minlength=c * (b + 1)).reshape(c, b + 1)
        s1 = np.bincount(idx.ravel(), weights=(w * u).ravel(), minlength=c * (b + 1)).reshape(c, b + 1)
        p0, p1 = np.zeros_like(s0), np.zeros_like(s1)
        np.cumsum(s0[:, :-1], axis=1, out=p0[:, 1:])
        np.cumsum(s1[:, :-1], axis=1, out=p1[:, 1:])
        self.chans = c
        self.p0, self.s0, self.p1, self.s1 = p0.ravel(), s0.ravel(), p1.ravel(), s1.ravel()

    def error(self, n: int, frac: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Each channel's error estimate (units of its max^2, up to a constant) at clip fractions frac.

        frac is (channels, K), channels the subset `rows`; n the grid's positive levels.
        """
        b = _HIST_BINS
        j = np.arange(1, n + 1, dtype=np.float64)
        step = frac / n  # (C, K)
        # Cell j (level j * step) starts at (j - 0.5) * step; the last one takes everything beyond.
        pos = np.sqrt((j - 0.5) * step[..., None])  # (C, K, n), all < 1
        pos *= b
        k = pos.astype(np.int64)
        np.minimum(k, b - 1, out=k)
        pos -= k  # the share of bin k below the edge
        k += (rows * (b + 1))[:, None, None]
        g0 = np.take(self.s0, k)
        g0 *= pos
        g0 += np.take(self.p0, k)  # weight of w below each cell's lower edge
        g1 = np.take(self.s1, k)
        g1 *= pos
        g1 += np.take(self.p1, k)  # and of w u
        tot0 = self.p0[rows * (b + 1) + b][:, None]
        tot1 = self.p1[rows * (b + 1) + b][:, None]
        # sum over cells of q_j^2 W_j - 2 q_j (Wu)_j, q_j = j * step, summed by parts over the lower edges
        # (the sum of u^2 W is the same at every clip and left out).
        return step * step * (n * n * tot0 - g0 @ (2 * j - 1)) - 2 * step * (n * tot1 - g1.sum(axis=-1))

    def best(self, n: int) -> np.ndarray:
        """Per channel, the clip fraction of max|x| whose estimated error is least (n positive levels)."""
        c = self.chans
        frac = np.empty(c)
        # Channels in blocks, so the (channels, candidates, levels) temporaries stay near 4 MB.
        per = max(1, (1 << 19) // (max(_COARSE.size, _FINE) * n))
        for a in range(0, c, per):
            rows = np.arange(a, min(c, a + per))
            at = np.arange(rows.size)
            cand = np.broadcast_to(_COARSE, (rows.size, _COARSE.size))
            for _ in range(_REFINE + 1):
                i = np.argmin(self.error(n, cand, rows), axis=1)
                best = cand[at, i]
                lo = cand[at, np.maximum(i - 1, 0)]
                hi = cand[at, np.minimum(i + 1, cand.shape[1] - 1)]
                cand = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, _FINE)[None, :]
            frac[rows] = best
        return frac
