"""Uncertainty cost of each layer's storage options, and the Pareto planner over them (issue 19).

A layer's uncertainty cost at a grid is the Random Bits loss term with the grid the exporter stores,
sum_w (Q(mu_w) - mu_w)^2 / sigma_w^2: minus twice the log-likelihood of the quantized means under the
twin's posterior, up to a constant. It is additive over layers, so layers the twin is sure about (small
sigma) are expensive to squeeze. The paper's tau_{j,i} also multiplies by c_j(w), the layer-normalised
informativeness; that makes every layer's weights sum to one, so a 500k-weight layer would count as much
as an 800-weight one, which is wrong for a plan over bytes. The issue's unnormalised sum is used here.

The planner picks one Option per layer. Flash and cost add up over layers; RAM does not: the TFLM
arena is a maximum over operators of the live tensors, so an option's ram_bytes is its layer's own
peak contribution (e.g. activations live at that operator plus a DECODE or INT4-unpack buffer) and a
plan's RAM is ``ram_base + max(ram_floor, max over layers of ram_bytes)``: ram_base for what is
allocated once (tensor metadata, quantization parameters), ram_floor for the peak of the operators the
plan does not touch. The byte figures come from a caller-supplied ByteCost (the exporter's cost model).

Pure numpy: nothing here imports TensorFlow, TF-MOT or deploy.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq.errors import PlanError
from edgeq.plan import BitPlan, LayerBits
from edgeq.posterior import LayerPosterior
from edgeq.quantizers import RangeSearch

GRID_KINDS = ("symmetric", "uniform", "levels")
# Bit widths each storage can hold (DESIGN.md stack facts): int8 any b-bit symmetric grid; INT4 tensors
# only for b <= 4; LUT index bits are 1..7 and a symmetric grid needs b >= 2.
STORAGE_BITS: dict[str, tuple[int, ...]] = {
    "int8": (2, 3, 4, 5, 6, 7, 8),
    "int4": (2, 3, 4),
    "lut": (2, 3, 4, 5, 6, 7),
}
# (layer name, kernel shape, bits, storage, grid) -> (flash_bytes, ram_bytes): the exporter's cost model.
ByteCost = Callable[[str, tuple[int, ...], int, str, "Grid"], tuple[int, int]]

_BLOCK = 16384  # elements per chunk: the temporaries stay in L2 (about 3x faster than whole-tensor passes)
_LLOYD_BINS = 4096


def _levels_of(bits: int) -> int:
    """Largest integer of a b-bit symmetric narrow-range grid: 2**(b-1) - 1."""
    return 2 ** (int(bits) - 1) - 1


@dataclass(frozen=True)
class Grid:
    """The values a layer's weights take once exported.

    symmetric: TF-MOT's LastValueQuantizer (symmetric, narrow range), as int8/INT4 weights are stored:
        Q(x) = s * clamp(floor(x / s + 0.5), -L, L), L = 2**(bits-1) - 1, one step s per channel along
        `axis`, or one step for the tensor (axis None).
    uniform: 2**bits points on [lo, hi], edgeq.quantizers' grid (the paper's eq. 3), per tensor.
    levels: the nearest of `levels` (Gaussian quantile, Lloyd-Max), then, when requant_bits is set, the
        symmetric fake quant edgeq's LevelsQuantizer applies on top (8 bits), per channel along axis.
    `fit` records how it was fitted ("max", "best", "lloyd", ...); it is informational.
    """

    kind: str
    bits: int
    scale: tuple[float, ...] = ()
    lo: float | None = None
    hi: float | None = None
    levels: tuple[float, ...] = ()
    axis: int | None = None
    requant_bits: int | None = None
    fit: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GRID_KINDS:
            raise PlanError(f"unknown grid kind {self.kind!r}; use one of {', '.join(GRID_KINDS)}")
        if int(self.bits) != self.bits or not 1 <= self.bits <= 16:
            raise PlanError(f"grid bits {self.bits!r}: need an integer in 1..16")
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        object.__setattr__(self, "levels", tuple(sorted(float(v) for v in self.levels)))
        if self.axis is not None:
            object.__setattr__(self, "axis", int(self.axis))
        if self.kind == "symmetric":
            if self.bits < 2:
                raise PlanError("a symmetric narrow-range grid needs bits >= 2 (1 bit leaves only zero)")
            s = np.asarray(self.scale)
            if s.size == 0 or not np.all(np.isfinite(s)) or np.any(s <= 0):
                raise PlanError("symmetric grid scales must be finite and > 0, one per channel (or one)")
            if self.axis is None and s.size != 1:
                raise PlanError(f"per-tensor symmetric grid has {s.size} scales; give one, or an axis")
        elif self.kind == "uniform":
            if self.lo is None or self.hi is None or not (np.isfinite(self.lo) and np.isfinite(self.hi)):
                raise PlanError("a uniform grid needs finite lo and hi")
            if self.hi < self.lo:
                raise PlanError(f"uniform grid has hi={self.hi} < lo={self.lo}; swap them")
            if self.axis is not None:
                raise PlanError("uniform [lo, hi] grids are per tensor; use a symmetric grid per channel")
            object.__setattr__(self, "lo", float(self.lo))
            object.__setattr__(self, "hi", float(self.hi))
        else:
            lv = np.asarray(self.levels)
            if lv.size == 0 or lv.size > 2**self.bits or not np.all(np.isfinite(lv)):
                raise PlanError(
                    f"levels grid has {lv.size} levels for {self.bits} bits; give 1..{2**self.bits}"
                )
            if self.requant_bits is not None and not 2 <= int(self.requant_bits) <= 16:
                raise PlanError(f"requant_bits {self.requant_bits!r}: need None or 2..16")

    @property
    def per_channel(self) -> bool:
        """Whether the grid has its own scale per channel (symmetric) or rounding per channel (levels)."""
        return self.axis is not None

    @property
    def clip(self) -> np.ndarray:
        """Symmetric grids: the largest stored magnitude per channel, s * (2**(bits-1) - 1)."""
        if self.kind != "symmetric":
            raise PlanError(f"{self.kind} grids have no symmetric clip")
        return np.asarray(self.scale) * _levels_of(self.bits)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (from_dict inverts it exactly)."""
        return {
            "kind": self.kind,
            "bits": self.bits,
            "scale": list(self.scale),
            "lo": self.lo,
            "hi": self.hi,
            "levels": list(self.levels),
            "axis": self.axis,
            "requant_bits": self.requant_bits,
            "fit": self.fit,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Grid:
        """Inverse of to_dict."""
        try:
            return cls(**{k: tuple(v) if k in ("scale", "levels") else v for k, v in d.items()})
        except TypeError as e:
            raise PlanError(f"not a Grid: {e}; write it with Grid.to_dict") from e


@dataclass(frozen=True)
class Option:
    """One way to store one layer: bit width, storage, grid, what it costs in bytes and in uncertainty."""

    layer: str
    bits: int
    storage: str
    grid: Grid
    flash_bytes: int
    ram_bytes: int
    cost: float
    size: int  # weights in the kernel, for the plan's mean bits
    # the share of its least informative weights set to 0 first (entropy-coded storages)
    zeros: float = 0.0

    def __post_init__(self) -> None:
        for what in ("flash_bytes", "ram_bytes", "size"):
            v = getattr(self, what)
            if int(v) != v or v < (1 if what == "size" else 0):
                raise PlanError(
                    f"option {self.layer!r}/{self.storage}/{self.bits}: {what}={v!r} is not valid"
                )
            object.__setattr__(self, what, int(v))
        if not (np.isfinite(self.cost) and self.cost >= 0):
            raise PlanError(
                f"option {self.layer!r}/{self.storage}/{self.bits}: cost {self.cost!r} is not >= 0"
            )
        object.__setattr__(self, "cost", float(self.cost))
        if not 0.0 <= self.zeros < 1.0:
            raise PlanError(f"option {self.layer!r}: zeros {self.zeros!r} is not a fraction in [0, 1)")
        if int(self.bits) != self.bits or int(self.bits) != self.grid.bits:
            raise PlanError(
                f"option {self.layer!r}: bits {self.bits!r} differ from its grid's {self.grid.bits}"
            )
        object.__setattr__(self, "bits", int(self.bits))


@dataclass(frozen=True)
class Plan:
    """One option per layer, with the plan's flash, RAM (max-type, see module doc) and uncertainty cost."""

    options: tuple[Option, ...]
    flash: int
    ram: int
    cost: float
    mean_bits: float  # weighted by weight count (paper eq. 8)

    @property
    def layers(self) -> dict[str, Option]:
        """Layer name -> its option."""
        return {o.layer: o for o in self.options}

    @property
    def bits(self) -> dict[str, int]:
        """Layer name -> bit width."""
        return {o.layer: o.bits for o in self.options}

    def to_bitplan(self, method: str = "planner", meta: Mapping[str, Any] | None = None) -> BitPlan:
        """The BitPlan the rest of edgeq uses; every option's storage, bytes and grid go into meta["planner"].

        Symmetric grids become quantizer "uniform" with lo/hi = -/+ the clip (per channel: the largest
        channel's clip; the per-channel steps are in meta), uniform grids keep lo/hi, levels grids
        become "lloyd_max" (or "quantile" when fitted so) with their levels.
        """
        layers = {o.layer: _layer_bits(o) for o in self.options}
        info = {
            "flash": self.flash,
            "ram": self.ram,
            "cost": self.cost,
            "mean_bits": self.mean_bits,
            "layers": {
                o.layer: {
                    "bits": o.bits,
                    "storage": o.storage,
                    "flash_bytes": o.flash_bytes,
                    "ram_bytes": o.ram_bytes,
                    "cost": o.cost,
                    "size": o.size,
                    "zeros": o.zeros,
                    "grid": o.grid.to_dict(),
                }
                for o in self.options
            },
        }
        return BitPlan(
            layers, method=method, meta={**(meta or {}), "mean_bits": self.mean_bits, "planner": info}
        )


def _layer_bits(o: Option) -> LayerBits:
    """The LayerBits of one option's grid."""
    g = o.grid
    if g.kind == "symmetric":
        c = float(g.clip.max())
        return LayerBits(o.bits, "uniform", lo=-c, hi=c)
    if g.kind == "uniform":
        return LayerBits(o.bits, "uniform", lo=g.lo, hi=g.hi)
    return LayerBits(o.bits, "quantile" if g.fit == "quantile" else "lloyd_max", levels=g.levels)


def make_plan(
    options: Iterable[Option], *, flash_base: int = 0, ram_base: int = 0, ram_floor: int = 0
) -> Plan:
    """The Plan of one option per layer: flash and cost summed, RAM = ram_base + max(ram_floor, max ram)."""
    opts = tuple(options)
    if not opts:
        raise PlanError("a plan needs at least one layer's option")
    names = [o.layer for o in opts]
    if len(set(names)) != len(names):
        raise PlanError(f"a plan names some layer twice: {names}; give one option per layer")
    # Left-to-right sums, the order pareto_front's vectorised sums take, so equal plans compare equal.
    return Plan(
        opts,
        flash=int(flash_base) + sum(o.flash_bytes for o in opts),
        ram=int(ram_base) + max(int(ram_floor), max(o.ram_bytes for o in opts)),
        cost=float(sum(o.cost for o in opts)),
        mean_bits=sum(o.bits * o.size for o in opts) / sum(o.size for o in opts),
    )


def plan_from_bitplan(
    bitplan: BitPlan,
    options_per_layer: Mapping[str, Sequence[Option]],
    *,
    flash_base: int = 0,
    ram_base: int = 0,
    ram_floor: int = 0,
) -> Plan:
    """The Plan a BitPlan written by Plan.to_bitplan stands for, matched against the layers' options."""
    info = bitplan.meta.get("planner", {}).get("layers")
    if not info:
        raise PlanError("the BitPlan has no meta['planner']; only plans from Plan.to_bitplan can be matched")
    chosen = []
    for name, d in info.items():
        grid = Grid.from_dict(d["grid"])
        match = [
            o
            for o in options_per_layer.get(name, ())
            if (o.bits, o.storage, o.grid) == (d["bits"], d["storage"], grid)
        ]
        if not match:
            raise PlanError(f"layer {name!r}: no option with {d['bits']} bits, {d['storage']} and that grid")
        chosen.append(match[0])
    return make_plan(chosen, flash_base=flash_base, ram_base=ram_base, ram_floor=ram_floor)


# ---------------------------------------------------------------- uncertainty cost


class _NearestLevel:
    """Index of the nearest level, ties to the lower one: np.searchsorted(mids, x, "left"), by table look-up.

    x's cell is floor((x - lo) * n / (hi - lo)), and the table holds how many midpoints lie in earlier
    cells (the same arithmetic places the midpoints, and it is monotone, so this is exact); one compare
    with the cell's own midpoint finishes it. The rare x in a cell holding two or more midpoints take
    the binary search.
    """

    def __init__(self, mids: np.ndarray, lo: float, hi: float) -> None:
        self.mids = mids
        self.n = max(1024, 16 * (mids.size + 1))
        self.lo = lo
        self.inv = self.n / (hi - lo) if hi > lo else 0.0
        cm = self.cell(mids)
        self.base = np.searchsorted(cm, np.arange(self.n + 1), side="left")  # midpoints in earlier cells
        self.crowded = np.diff(self.base) >= 2
        self.any_crowded = bool(self.crowded.any())
        self.next_mid = np.r_[mids, np.inf]  # the first midpoint at or after each cell, inf past the last

    def cell(self, x: np.ndarray) -> np.ndarray:
        c = (x - self.lo) * self.inv
        np.clip(c, 0, self.n - 1, out=c)
        return c.astype(np.int64)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        c = self.cell(x)
        b = self.base[c]
        idx = b + (self.next_mid[b] < x)
        if self.any_crowded:
            hard = self.crowded[c]
            if hard.any():
                idx[hard] = np.searchsorted(self.mids, x[hard], side="left")
        return idx


class _Layer:
    """A posterior prepared for many cost evaluations: 1/sigma^2 once; views and range searches cached."""

    def __init__(self, post: LayerPosterior) -> None:
        self.post = post
        self.w = 1.0 / np.square(post.sigma)
        self._views: dict[int | None, tuple[np.ndarray, np.ndarray]] = {}
        self._maxabs: dict[int | None, np.ndarray] = {}
        self._search: dict[int | None, RangeSearch] = {}
        self._lloyd_hist: tuple[np.ndarray, np.ndarray] | None = None

    def axis(self, axis: int | None) -> int | None:
        """axis normalised to 0..ndim-1 (None stays None)."""
        if axis is None:
            return None
        nd = self.post.mu.ndim
        if not -nd <= axis < nd:
            raise PlanError(f"layer {self.post.name!r}: channel axis {axis} is outside its {nd}-d kernel")
        return axis % nd

    def view(self, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
        """mu and 1/sigma^2 as (rows, channels) arrays, channels last; per tensor: (n, 1)."""
        ax = self.axis(axis)
        if ax not in self._views:
            if ax is None:
                mu, w = self.post.mu.reshape(-1, 1), self.w.reshape(-1, 1)
            else:
                c = self.post.mu.shape[ax]
                mu = np.ascontiguousarray(np.moveaxis(self.post.mu, ax, -1)).reshape(-1, c)
                w = np.ascontiguousarray(np.moveaxis(self.w, ax, -1)).reshape(-1, c)
            self._views[ax] = (mu, w)
        return self._views[ax]

    def channels(self, axis: int | None) -> int:
        """Channels along axis (1 per tensor)."""
        return self.view(axis)[0].shape[1]

    def maxabs(self, axis: int | None) -> np.ndarray:
        """max |mu| per channel, what LastValueQuantizer's symmetric range takes."""
        ax = self.axis(axis)
        if ax not in self._maxabs:
            mu = self.view(ax)[0]
            self._maxabs[ax] = np.maximum(mu.max(axis=0), -mu.min(axis=0))
        return self._maxabs[ax]

    def blocks(self, axis: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(mu, 1/sigma^2) in row chunks of about _BLOCK elements."""
        mu, w = self.view(axis)
        rows = max(1, _BLOCK // mu.shape[1])
        for a in range(0, mu.shape[0], rows):
            yield mu[a : a + rows], w[a : a + rows]

    def channel_costs(self, grid: Grid) -> np.ndarray:
        """Per channel, sum (Q(mu) - mu)^2 / sigma^2 over its weights (one entry per tensor)."""
        if grid.kind == "symmetric":
            return self._symmetric(np.asarray(grid.scale), grid.bits, grid.axis)
        if grid.kind == "uniform":
            return self._uniform(grid.lo, grid.hi, grid.bits)
        return self._levels(np.asarray(grid.levels), grid.requant_bits, grid.axis)

    def _symmetric(self, scale: np.ndarray, bits: int, axis: int | None) -> np.ndarray:
        c = self.channels(axis)
        if scale.size != c:
            raise PlanError(
                f"layer {self.post.name!r}: grid has {scale.size} scales for {c} channels along axis {axis}"
            )
        lv = _levels_of(bits)
        inv = 1.0 / scale
        # Skip the clamp when no channel's max reaches past its grid: floor(t + 0.5) stays within +-L.
        clamp = bool(np.any(self.maxabs(axis) * inv > lv + 0.5))
        acc = np.zeros(c)
        for mu, w in self.blocks(axis):
            t = mu * inv
            r = t + 0.5
            np.floor(r, out=r)  # TF's FakeQuant rounds half up, not half to even
            if clamp:
                np.clip(r, -lv, lv, out=r)
            r -= t
            r *= r
            r *= w
            acc += r.sum(axis=0)
        return acc * scale * scale  # the error was in units of the step

    def _uniform(self, lo: float, hi: float, bits: int) -> np.ndarray:
        n = 2**bits - 1
        acc = np.zeros(1)
        s = (hi - lo) / n
        for mu, w in self.blocks(None):
            if s == 0:
                q = np.full_like(mu, lo)
            else:
                q = np.rint((mu - lo) / s)  # edgeq.quantizers._uniform_grid, as project_weights applies it
                np.clip(q, 0, n, out=q)
                q *= s
                q += lo
            q -= mu
            q *= q
            q *= w
            acc += q.sum(axis=0)
        return acc

    def _levels(self, levels: np.ndarray, requant_bits: int | None, axis: int | None) -> np.ndarray:
        mids = (levels[1:] + levels[:-1]) / 2
        c = self.channels(axis)
        nearest = _NearestLevel(mids, float(self.post.mu.min()), float(self.post.mu.max()))
        inv8 = s8 = None
        if requant_bits is not None:
            # The projection is monotone, so a channel's largest |Q(mu)| is at its smallest or largest mu.
            mu2 = self.view(axis)[0]
            ends = levels[np.searchsorted(mids, np.stack([mu2.min(axis=0), mu2.max(axis=0)]), side="left")]
            s8 = np.abs(ends).max(axis=0) / _levels_of(requant_bits)
            s8[s8 == 0] = 1.0  # an all-zero channel: any step maps it to 0
            inv8 = 1.0 / s8
        acc = np.zeros(c)
        for mu, w in self.blocks(axis):
            q = levels[nearest(mu)]
            if inv8 is not None:
                q *= inv8
                q += 0.5
                np.floor(q, out=q)
                q *= s8
            q -= mu
            q *= q
            q *= w
            acc += q.sum(axis=0)
        return acc

    def best_symmetric(self, bits: int, axis: int | None) -> tuple[Grid, float]:
        """The symmetric grid whose per-channel clip minimises the weighted error, and its exact cost."""
        ax = self.axis(axis)
        if ax not in self._search:
            mu, w = self.view(ax)
            self._search[ax] = RangeSearch(mu, w, per_channel=ax is not None)
        r = np.atleast_1d(self._search[ax](bits))
        scale = np.where(r > 0, r, 1.0) / _levels_of(bits)  # an all-zero channel: any step maps it to 0
        grid = Grid("symmetric", bits, scale=tuple(scale), axis=ax, fit="best")
        return grid, float(self._symmetric(scale, bits, ax).sum())


def uncertainty_costs(post: LayerPosterior, grids: Sequence[Grid]) -> np.ndarray:
    """sum_w (Q(mu_w) - mu_w)^2 / sigma_w^2 of one layer at each grid; Q is the grid the exporter stores."""
    layer = _Layer(post)
    return np.array([float(layer.channel_costs(g).sum()) for g in grids])


def uncertainty_cost(post: LayerPosterior, grid: Grid) -> float:
    """sum_w (Q(mu_w) - mu_w)^2 / sigma_w^2 of one layer at one grid (see uncertainty_costs)."""
    return float(uncertainty_costs(post, [grid])[0])


def symmetric_grid(
    post: LayerPosterior, bits: int, *, axis: int | None = None, clip: float | np.ndarray | None = None
) -> Grid:
    """LastValueQuantizer's grid: step max|mu| / (2**(bits-1) - 1) per channel along axis (or clip / L)."""
    layer = _Layer(post)
    ax = layer.axis(axis)
    c = (
        layer.maxabs(ax)
        if clip is None
        else np.broadcast_to(np.asarray(clip, dtype=np.float64), (layer.channels(ax),))
    )
    c = np.where(c > 0, c, 1.0)  # an all-zero channel: any step maps it to 0
    return Grid(
        "symmetric", bits, scale=tuple(c / _levels_of(bits)), axis=ax, fit="max" if clip is None else "clip"
    )


def best_range(post: LayerPosterior, bits: int, per_channel: bool = False, *, axis: int = -1) -> Grid:
    """The symmetric b-bit grid whose clip (per channel along axis, or per tensor) minimises the cost.

    The paper's interval learning: edgeq.quantizers.RangeSearch on mu with weights 1/sigma^2, the search
    interval_ranges gives QAT (exact, or on a histogram of each channel for large layers).
    The result's clip gives (lo, hi) = (-clip, clip) per tensor and its scale the per-channel steps.
    """
    return best_ranges(post, [bits], per_channel, axis=axis)[0]


def best_ranges(
    post: LayerPosterior, bits: Iterable[int], per_channel: bool = False, *, axis: int = -1
) -> list[Grid]:
    """best_range at several bit widths, sharing one histogram."""
    layer = _Layer(post)
    return [layer.best_symmetric(int(b), axis if per_channel else None)[0] for b in bits]


def levels_grid(
    levels: Sequence[float],
    bits: int,
    *,
    axis: int | None = None,
    requant_bits: int | None = 8,
    fit: str = "",
) -> Grid:
    """A levels grid (LUT storage): nearest level, then LevelsQuantizer's 8-bit rounding along axis."""
    return Grid("levels", bits, levels=tuple(levels), axis=axis, requant_bits=requant_bits, fit=fit)


def lloyd_grid(
    post: LayerPosterior, bits: int, *, axis: int | None = None, requant_bits: int | None = 8, iters: int = 50
) -> Grid:
    """Per-tensor levels minimising sum (Q(mu) - mu)^2 / sigma^2: Lloyd-Max weighted by 1/sigma^2.

    Run on a 4096-bin weighted histogram of mu (bin centroids with their summed weights), so it costs
    one pass over the weights whatever iters is; edgeq.quantizers.lloyd_max is the same objective on
    every weight.
    """
    return _lloyd(_Layer(post), bits, axis, requant_bits, iters)


def _lloyd(layer: _Layer, bits: int, axis: int | None, requant_bits: int | None, iters: int) -> Grid:
    if layer._lloyd_hist is None:
        mu, w = layer.post.mu.ravel(), layer.w.ravel()
        lo, hi = float(mu.min()), float(mu.max())
        if hi == lo:
            layer._lloyd_hist = (np.array([lo]), np.array([float(w.sum())]))
        else:
            idx = np.minimum(((mu - lo) * (_LLOYD_BINS / (hi - lo))).astype(np.int64), _LLOYD_BINS - 1)
            s0 = np.bincount(idx, weights=w, minlength=_LLOYD_BINS)
            s1 = np.bincount(idx, weights=w * mu, minlength=_LLOYD_BINS)
            full = s0 > 0
            layer._lloyd_hist = (s1[full] / s0[full], s0[full])  # centroids (sorted, as bins are), weights
    x, wx = layer._lloyd_hist
    m = 2 ** int(bits)
    if x.size <= m:
        levels = x
    else:
        cw = np.cumsum(wx)
        levels = x[np.minimum(np.searchsorted(cw, (np.arange(m) + 0.5) / m * cw[-1]), x.size - 1)]
        levels = np.unique(levels)
        for _ in range(int(iters)):
            cell = np.searchsorted((levels[1:] + levels[:-1]) / 2, x, side="left")
            ws = np.bincount(cell, weights=wx, minlength=levels.size)
            xs = np.bincount(cell, weights=wx * x, minlength=levels.size)
            new = levels.copy()
            new[ws > 0] = xs[ws > 0] / ws[ws > 0]  # an empty cell keeps its level
            if np.array_equal(new, levels):
                break
            levels = new
    return levels_grid(levels, bits, axis=layer.axis(axis), requant_bits=requant_bits, fit="lloyd")


def layer_options(
    post: LayerPosterior,
    byte_cost: ByteCost,
    *,
    storage_bits: Mapping[str, Iterable[int]] = STORAGE_BITS,
    axis: int | None = None,
    clip: str = "best",
    lut_levels: bool = False,
) -> list[Option]:
    """Every (storage, bits) option of one layer with its grid, exact uncertainty cost and byte_cost's bytes.

    axis: the channel axis of per-channel grids (Keras Conv2D: -1; DepthwiseConv2D: -2), None per tensor.
    clip "best" uses best_range's grids, "max" LastValueQuantizer's max|mu|. lut_levels adds, for LUT
    storage, options on weighted Lloyd-Max levels (2**bits values instead of 2**bits - 1).
    """
    if clip not in ("best", "max"):
        raise PlanError(f"clip {clip!r}; use 'best' or 'max'")
    layer = _Layer(post)
    ax = layer.axis(axis)
    shape = tuple(int(d) for d in post.mu.shape)
    sym: dict[int, tuple[Grid, float]] = {}
    out = []
    for storage, bits_list in storage_bits.items():
        for b in bits_list:
            b = int(b)
            if b not in sym:
                if clip == "best":
                    sym[b] = layer.best_symmetric(b, ax)
                else:
                    g = symmetric_grid(post, b, axis=ax)
                    sym[b] = (g, float(layer.channel_costs(g).sum()))
            grids = [sym[b]]
            if lut_levels and storage == "lut" and post.size >= 2**b:
                g = _lloyd(layer, b, ax, 8, 50)
                grids.append((g, float(layer.channel_costs(g).sum())))
            for g, cost in grids:
                flash, ram = byte_cost(post.name, shape, b, storage, g)
                out.append(Option(post.name, b, storage, g, int(flash), int(ram), cost, post.size))
    return out


def model_options(
    posteriors: Sequence[LayerPosterior],
    byte_cost: ByteCost,
    *,
    channel_axis: Mapping[str, int | None] | None = None,
    **kwargs: Any,
) -> dict[str, list[Option]]:
    """layer_options for every layer; channel_axis names each per-channel layer's axis (others per tensor)."""
    axes = dict(channel_axis or {})
    return {p.name: layer_options(p, byte_cost, axis=axes.get(p.name), **kwargs) for p in posteriors}


# ---------------------------------------------------------------- planner


def _check_options(options_per_layer: Mapping[str, Sequence[Option]]) -> list[list[Option]]:
    """The options as lists, after checking every layer has some and they are named for it."""
    if not options_per_layer:
        raise PlanError("no layers to plan; give each layer a list of options")
    out = []
    for name, opts in options_per_layer.items():
        opts = list(opts)
        if not opts:
            raise PlanError(f"layer {name!r} has no options; give it at least one")
        bad = [o.layer for o in opts if o.layer != name]
        if bad:
            raise PlanError(f"options under layer {name!r} are named for {sorted(set(bad))}")
        out.append(opts)
    return out


def _undominated(f: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats or equals in (flash, ram, cost); one of equal ones kept.

    Swept over RAM levels in ascending order: within a level, a 2-D staircase in (flash, cost); across
    levels, a point must be cheaper than every kept point of lower RAM with no more flash.
    """
    order = np.lexsort((c, f, r))
    keep_f = np.zeros(0, dtype=np.int64)
    keep_c = np.zeros(0)
    kept = []
    levels_r = r[order]
    starts = np.flatnonzero(np.r_[True, levels_r[1:] != levels_r[:-1]])
    ends = np.r_[starts[1:], order.size]
    for a, z in zip(starts, ends, strict=True):
        idx = order[a:z]  # one RAM level, sorted by flash then cost
        fi, ci = f[idx], c[idx]
        run = np.minimum.accumulate(ci)
        mask = ci < np.r_[np.inf, run[:-1]]  # strictly cheaper than everything with no more flash here
        if keep_f.size:
            pos = np.searchsorted(keep_f, fi, side="right") - 1
            prefix = np.minimum.accumulate(keep_c)
            lower = np.where(pos >= 0, prefix[np.maximum(pos, 0)], np.inf)
            mask &= ci < lower
        new = idx[mask]
        kept.append(new)
        if new.size:
            keep_f = np.r_[keep_f, f[new]]
            keep_c = np.r_[keep_c, c[new]]
            s = np.argsort(keep_f, kind="stable")
            keep_f, keep_c = keep_f[s], keep_c[s]
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


def _dp(w: list[np.ndarray], c: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Multiple-choice knapsack by DP over flash buckets: least cost at each bucket sum, and the choices."""
    dp = np.zeros(1)
    choices = []
    for wj, cj in zip(w, c, strict=True):
        n = dp.size
        new = np.full(n + int(wj.max()), np.inf)
        ch = np.zeros(new.size, dtype=np.uint8 if wj.size <= 256 else np.int32)  # one per bucket: keep small
        better = np.empty(n, dtype=bool)
        for o in range(wj.size):  # ascending flash: among equal costs the smaller flash stays
            seg = dp + cj[o]
            view = new[wj[o] : wj[o] + n]
            np.less(seg, view, out=better)
            np.copyto(view, seg, where=better)
            np.copyto(ch[wj[o] : wj[o] + n], o, where=better)
        dp = new
        choices.append(ch)
    return dp, choices


def default_resolution(options_per_layer: Mapping[str, Sequence[Option]]) -> int:
    """pareto_front's default flash resolution: the span of plan flash over 4096, at least 1 byte."""
    layers = _check_options(options_per_layer)
    span = sum(max(o.flash_bytes for o in opts) - min(o.flash_bytes for o in opts) for opts in layers)
    return max(1, math.ceil(span / 4096))


def pareto_front(
    options_per_layer: Mapping[str, Sequence[Option]],
    *,
    resolution: int | None = None,
    flash_base: int = 0,
    ram_base: int = 0,
    ram_floor: int = 0,
    max_buckets: int = 1 << 23,
) -> list[Plan]:
    """The Pareto front of (flash, RAM, uncertainty cost) over one option per layer, by flash ascending.

    For each RAM level (the distinct ram_bytes that can be a plan's maximum), a dynamic programme over
    flash buckets of resolution // n_layers bytes finds the cheapest plan at every bucket, so each
    brute-force Pareto plan (F, R, C) is matched by a front plan with flash < F + resolution, RAM <= R
    and cost <= C. The exact least-flash plan of each RAM level and each uniform plan (every layer at b
    bits, its least-flash storage) are candidates too, so the front holds a plan within a flash budget
    whenever one exists, and one no worse than the uniform plan within that plan's flash.
    resolution: bytes (default default_resolution, span / 4096); 1 byte is exact. Plans: see make_plan.
    """
    layers = _check_options(options_per_layer)
    nl = len(layers)
    res = default_resolution(options_per_layer) if resolution is None else int(resolution)
    if res < 1:
        raise PlanError(f"resolution {resolution!r}: need at least 1 byte")
    delta = max(1, res // nl)
    fl = [np.array([o.flash_bytes for o in opts], dtype=np.int64) for opts in layers]
    ra = [np.array([o.ram_bytes for o in opts], dtype=np.int64) for opts in layers]
    co = [np.array([o.cost for o in opts]) for opts in layers]
    # Options another option of the same layer beats or equals in all three never help any plan.
    alive = []
    for f, r, c in zip(fl, ra, co, strict=True):
        alive.append(np.sort(_undominated(f, r, c)))
    floor_r = max(int(ram_floor), max(int(r[a].min()) for r, a in zip(ra, alive, strict=True)))
    levels = np.unique(np.concatenate([r[a] for r, a in zip(ra, alive, strict=True)]))
    levels = np.r_[floor_r, levels[levels > floor_r]]

    rows: list[np.ndarray] = []  # choice matrices (plans, layers) of option indices
    for t in levels:
        ws, cs, ids = [], [], []
        for f, r, c, a in zip(fl, ra, co, alive, strict=True):
            a = a[r[a] <= t]
            a = a[_undominated(f[a], np.zeros(a.size, dtype=np.int64), c[a])]  # RAM no longer matters
            a = a[np.argsort(f[a], kind="stable")]
            ws.append((f[a] - f[a].min()) // delta)
            cs.append(c[a])
            ids.append(a)
        buckets = sum(int(w.max()) for w in ws) + 1
        if buckets > max_buckets:
            need = math.ceil(res * buckets / max_buckets)
            raise PlanError(
                f"flash resolution {res} B needs {buckets:,} DP buckets (max {max_buckets:,}); "
                f"pass resolution >= {need} B"
            )
        dp, choices = _dp(ws, cs)
        best_before = np.r_[np.inf, np.minimum.accumulate(dp)[:-1]]
        at = np.flatnonzero(dp < best_before)  # the staircase: cheaper than every smaller bucket
        plan = np.empty((at.size, nl), dtype=np.int64)
        for j in range(nl - 1, -1, -1):
            o = choices[j][at]
            plan[:, j] = ids[j][o]
            at = at - ws[j][o]
        rows.append(plan)
        # The exact least-flash plan at this RAM level (cheapest among ties), which buckets may blur.
        rows.append(np.array([[ids[j][0] for j in range(nl)]], dtype=np.int64))
    for b in sorted(set.intersection(*({o.bits for o in opts} for opts in layers))):
        row = []
        for opts, f, c in zip(layers, fl, co, strict=True):
            cand = [i for i, o in enumerate(opts) if o.bits == b]
            row.append(min(cand, key=lambda i: (f[i], c[i])))
        rows.append(np.array([row], dtype=np.int64))

    choice = np.unique(np.concatenate(rows), axis=0)
    # Every plan's figures at once, summed layer by layer from the left as make_plan does.
    flash = np.full(len(choice), int(flash_base), dtype=np.int64)
    top = np.full(len(choice), int(ram_floor), dtype=np.int64)
    cost = np.zeros(len(choice))
    bits_w = np.zeros(len(choice), dtype=np.int64)
    size = np.zeros(len(choice), dtype=np.int64)
    for k, opts in enumerate(layers):
        ck = choice[:, k]
        flash += fl[k][ck]
        np.maximum(top, ra[k][ck], out=top)
        cost += co[k][ck]
        bits_w += np.array([o.bits * o.size for o in opts], dtype=np.int64)[ck]
        size += np.array([o.size for o in opts], dtype=np.int64)[ck]
    ram = int(ram_base) + top
    keep = _undominated(flash, ram, cost)
    keep = keep[np.lexsort((cost[keep], ram[keep], flash[keep]))]
    mean_bits = bits_w[keep] / size[keep]
    # Plain Python numbers and a C-level map: VGG-16's front holds tens of thousands of plans.
    figures = (a.tolist() for a in (flash[keep], ram[keep], cost[keep], mean_bits))
    return [
        Plan(tuple(map(operator.getitem, layers, row)), f, r, c, mb)
        for row, f, r, c, mb in zip(choice[keep].tolist(), *figures, strict=True)
    ]


def choose(
    front: Sequence[Plan],
    flash_budget: int | None = None,
    ram_budget: int | None = None,
    accept: Callable[[Plan], bool] | None = None,
) -> Plan:
    """The least-cost plan within the budgets (ties: less flash, then less RAM).

    accept: a further test a plan must pass (e.g. the exporter's exact bytes, where the options' sums are
    only bounds); it is asked only of plans within the budgets.
    """
    if not front:
        raise PlanError("the Pareto front is empty; build it with pareto_front")
    fits = [
        p
        for p in front
        if (flash_budget is None or p.flash <= flash_budget) and (ram_budget is None or p.ram <= ram_budget)
    ]
    if accept is not None and fits:
        # cheapest first, so the (possibly slow) test runs only until one passes
        for p in sorted(fits, key=lambda p: (p.cost, p.flash, p.ram)):
            if accept(p):
                return p
        raise PlanError(
            f"no plan within flash {flash_budget} B and RAM {ram_budget} B passes the caller's test; "
            "raise a budget or offer cheaper options"
        )
    if not fits:
        least_f = min(front, key=lambda p: (p.flash, p.ram))
        least_r = min(front, key=lambda p: (p.ram, p.flash))
        raise PlanError(
            f"no plan fits flash {flash_budget} B and RAM {ram_budget} B: "
            f"the least flash is {least_f.flash:,} B "
            f"(RAM {least_f.ram:,} B), the least RAM {least_r.ram:,} B (flash {least_r.flash:,} B); "
            "raise a budget or offer cheaper options"
        )
    return min(fits, key=lambda p: (p.cost, p.flash, p.ram))


def flash_of_uniform(
    options_per_layer: Mapping[str, Sequence[Option]],
    bits: float,
    *,
    storage: str | None = None,
    flash_base: int = 0,
) -> int:
    """Flash of the uniform plan at `bits`: every layer's least-flash option of that width (or that storage).

    Fractional bits interpolate linearly between the uniform plans at floor(bits) and ceil(bits), so
    target_bits 3.5 allows the flash halfway between the 3- and 4-bit plans.
    """
    layers = _check_options(options_per_layer)
    lo, hi = math.floor(bits), math.ceil(bits)

    def at(b: int) -> int:
        total = int(flash_base)
        for opts in layers:
            cand = [o.flash_bytes for o in opts if o.bits == b and (storage is None or o.storage == storage)]
            if not cand:
                what = f"{b}-bit" + ("" if storage is None else f" {storage}")
                raise PlanError(f"layer {opts[0].layer!r} has no {what} option; offer one or pick other bits")
            total += min(cand)
        return total

    if lo == hi:
        return at(int(lo))
    f_lo, f_hi = at(int(lo)), at(int(hi))
    return int(math.floor(f_lo + (bits - lo) * (f_hi - f_lo)))


def plan_for_target(
    options_per_layer: Mapping[str, Sequence[Option]],
    target_bits: float,
    *,
    storage: str | None = None,
    ram_budget: int | None = None,
    resolution: int | None = None,
    flash_base: int = 0,
    ram_base: int = 0,
    ram_floor: int = 0,
    flash_budget: int | None = None,
    accept: Callable[[Plan], bool] | None = None,
) -> Plan:
    """`edgeq run`'s default: the least-cost plan with no more flash than the uniform plan at target_bits.

    flash_budget replaces that uniform plan's flash (a caller that knows the whole file's bytes better,
    e.g. across storages); accept is passed to choose.
    """
    if flash_budget is None:
        budget = flash_of_uniform(options_per_layer, target_bits, storage=storage, flash_base=flash_base)
    else:
        budget = int(flash_budget)
    front = pareto_front(
        options_per_layer,
        resolution=resolution,
        flash_base=flash_base,
        ram_base=ram_base,
        ram_floor=ram_floor,
    )
    return choose(front, budget, ram_budget, accept)
