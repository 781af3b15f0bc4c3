"""edgeq.planner: uncertainty cost per grid, best range, the Pareto front over layer options, and choice."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from edgeq.errors import PlanError
from edgeq.plan import BitPlan
from edgeq.planner import (
    STORAGE_BITS,
    Grid,
    Option,
    best_range,
    choose,
    flash_of_uniform,
    levels_grid,
    lloyd_grid,
    make_plan,
    model_options,
    pareto_front,
    plan_for_target,
    plan_from_bitplan,
    symmetric_grid,
    uncertainty_cost,
    uncertainty_costs,
)
from edgeq.posterior import LayerPosterior


def standin_byte_cost(
    name: str, shape: tuple[int, ...], bits: int, storage: str, grid: Grid
) -> tuple[int, int]:
    """STAND-IN for the exporter's byte cost model (deploy owns the real one).

    flash: payload ceil(n * stored bits / 8) + 64 B per tensor (+ 2**bits table entries per LUT channel);
    RAM: 0 for int8, n for INT4 (reference kernels unpack it) and LUT (DECODE writes the int8 tensor).
    """
    n = math.prod(shape)
    stored = {"int8": 8, "int4": 4, "lut": bits}[storage]
    table = 2**bits * (shape[grid.axis] if grid.per_channel else 1) if storage == "lut" else 0
    return math.ceil(n * stored / 8) + 64 + table, 0 if storage == "int8" else n


def _posterior(name: str, shape: tuple[int, ...], seed: int, tails: str = "gauss") -> LayerPosterior:
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 0.05, shape) if tails == "gauss" else 0.02 * rng.standard_t(3, shape)
    sigma = np.exp(rng.normal(np.log(0.02), 0.5, shape))
    return LayerPosterior(name, mu, sigma)


# ---------------------------------------------------------------- uncertainty cost


def _direct(post: LayerPosterior, grid: Grid) -> float:
    """The cost by a plain loop over every weight, written from the grid's definition."""
    mu, sigma = post.mu, post.sigma
    axis = None if grid.axis is None else grid.axis % mu.ndim
    proj = {}
    for idx in np.ndindex(mu.shape):
        x = float(mu[idx])
        if grid.kind == "symmetric":
            s = grid.scale[idx[axis]] if axis is not None else grid.scale[0]
            lv = 2 ** (grid.bits - 1) - 1
            q = s * min(lv, max(-lv, math.floor(x / s + 0.5)))
        elif grid.kind == "uniform":
            s = (grid.hi - grid.lo) / (2**grid.bits - 1)
            q = grid.lo + s * min(2**grid.bits - 1, max(0, round((x - grid.lo) / s)))
        else:
            q = min(grid.levels, key=lambda v: (abs(v - x), v))  # nearest, ties to the lower level
        proj[idx] = q
    if grid.kind == "levels" and grid.requant_bits is not None:
        top = {}
        for idx, q in proj.items():
            c = idx[axis] if axis is not None else 0
            top[c] = max(top.get(c, 0.0), abs(q))
        lv8 = 2 ** (grid.requant_bits - 1) - 1
        for idx, q in proj.items():
            s8 = top[idx[axis] if axis is not None else 0] / lv8 or 1.0
            proj[idx] = s8 * math.floor(q / s8 + 0.5)
    return sum((proj[idx] - float(mu[idx])) ** 2 / float(sigma[idx]) ** 2 for idx in proj)


def test_cost_matches_a_direct_loop_on_every_grid_kind():
    post = _posterior("conv", (3, 3, 2, 5), 0)
    mu = post.mu
    grids = [
        symmetric_grid(post, 3),
        symmetric_grid(post, 4, axis=-1),
        symmetric_grid(post, 2, axis=2),  # a depthwise kernel's channels are its third axis
        symmetric_grid(post, 3, axis=-1, clip=0.5 * np.abs(mu).max()),  # the clamp bites
        Grid("uniform", 3, lo=float(np.percentile(mu, 5)), hi=float(np.percentile(mu, 95))),
        levels_grid([-0.08, -0.02, 0.0, 0.03, 0.09], 3, requant_bits=None),
        levels_grid([-0.08, -0.02, 0.0, 0.03, 0.09], 3, axis=-1),
        levels_grid([-0.06, 0.01, 0.05], 2),
    ]
    got = uncertainty_costs(post, grids)
    for g, v in zip(grids, got, strict=True):
        assert v == pytest.approx(_direct(post, g), rel=1e-12), g
        assert uncertainty_cost(post, g) == v


def test_cost_is_the_same_over_many_chunks():
    # 64 x 1152 rows x channels: many _BLOCK chunks; compare with one whole-tensor numpy expression.
    post = _posterior("big", (3, 3, 128, 64), 1)
    g = symmetric_grid(post, 3, axis=-1, clip=0.7 * np.abs(post.mu).max(axis=(0, 1, 2)))
    s = np.asarray(g.scale)
    q = s * np.clip(np.floor(post.mu / s + 0.5), -3, 3)
    assert uncertainty_cost(post, g) == pytest.approx(np.sum((q - post.mu) ** 2 / post.sigma**2), rel=1e-10)


def test_cost_falls_with_bits_and_sure_layers_cost_more():
    post = _posterior("fc", (256, 64), 2)
    costs = uncertainty_costs(post, [symmetric_grid(post, b) for b in range(2, 9)])
    assert np.all(np.diff(costs) < 0)
    sure = LayerPosterior("fc", post.mu, post.sigma / 4)  # same means, a twin four times surer
    assert uncertainty_cost(sure, symmetric_grid(sure, 3)) == pytest.approx(16 * costs[1])


def test_levels_cost_with_many_and_crowded_levels_matches_searchsorted():
    post = _posterior("fc", (300, 40), 7, "heavy")
    rng = np.random.default_rng(0)
    lv = np.sort(np.r_[rng.normal(0, 0.03, 120), [0.0, 1e-12, 2e-12, 3e-12], rng.normal(0, 0.03, 4)])
    for g in (levels_grid(lv, 7, requant_bits=None), levels_grid(lv, 7, axis=-1)):
        mids = (lv[1:] + lv[:-1]) / 2
        q = lv[np.searchsorted(mids, post.mu, side="left")]
        if g.requant_bits:
            s8 = np.abs(q).max(axis=0) / 127
            q = s8 * np.floor(q / s8 + 0.5)
        want = np.sum((q - post.mu) ** 2 / post.sigma**2)
        assert uncertainty_cost(post, g) == pytest.approx(want, rel=1e-12)


def test_an_all_zero_channel_costs_nothing_and_breaks_nothing():
    post = _posterior("conv", (3, 3, 4, 6), 8)
    mu = post.mu.copy()
    mu[..., 2] = 0.0
    post = LayerPosterior("conv", mu, post.sigma)
    for bits in (2, 5):
        for g in (symmetric_grid(post, bits, axis=-1), best_range(post, bits, True)):
            per = uncertainty_costs(post, [g])[0]
            assert np.isfinite(per) and np.all(np.asarray(g.scale) > 0)
    g = symmetric_grid(post, 3, axis=-1)
    alone = LayerPosterior("c", mu[..., 2:3], post.sigma[..., 2:3])
    assert uncertainty_cost(alone, symmetric_grid(alone, 3, axis=-1)) == 0.0
    assert uncertainty_cost(post, g) > 0


# ---------------------------------------------------------------- best range


@pytest.mark.parametrize("tails", ["gauss", "heavy"])
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("per_channel", [False, True])
def test_best_range_beats_p5_p95_and_max(tails, bits, per_channel):
    post = _posterior("conv", (3, 3, 32, 16), 3, tails)
    axis = -1 if per_channel else None
    best = best_range(post, bits, per_channel)
    red = None if per_channel else (0, 1, 2, 3)
    chan = (0, 1, 2) if per_channel else None
    p5, p95 = np.percentile(post.mu, [5, 95], axis=chan)
    clip_p = np.maximum(np.abs(p5), np.abs(p95))
    p5p95 = symmetric_grid(post, bits, axis=axis, clip=clip_p)
    full = symmetric_grid(post, bits, axis=axis)
    c_best, c_p, c_full = uncertainty_costs(post, [best, p5p95, full])
    assert c_best < c_p and c_best < c_full, (c_best, c_p, c_full)
    assert best.per_channel == per_channel and len(best.scale) == (16 if per_channel else 1)
    assert red is None or best.clip[0] <= np.abs(post.mu).max()


def test_best_range_is_near_an_exact_dense_search():
    post = _posterior("fc", (512, 64), 4, "heavy")
    m = float(np.abs(post.mu).max())
    for bits in (2, 3, 4, 6):
        fracs = np.linspace(0.005, 1.0, 600)
        dense = uncertainty_costs(post, [symmetric_grid(post, bits, clip=f * m) for f in fracs]).min()
        got = uncertainty_cost(post, best_range(post, bits))
        assert got <= dense * 1.01, (bits, got, dense)


@pytest.mark.parametrize("per_channel", [False, True])
def test_best_range_matches_the_exact_sorted_search(per_channel):
    from edgeq.quantizers import symmetric_range  # exact per candidate, sort-based (slower)

    post = _posterior("conv", (3, 3, 64, 32), 9, "heavy")
    for bits in (2, 3, 4, 8):
        r = np.ravel(symmetric_range(post.mu, bits, 1 / post.sigma**2, per_channel=per_channel))
        exact = Grid(
            "symmetric", bits, scale=tuple(r / (2 ** (bits - 1) - 1)), axis=-1 if per_channel else None
        )
        got = uncertainty_cost(post, best_range(post, bits, per_channel))
        assert got <= uncertainty_cost(post, exact) * 1.005, bits


def test_best_range_never_loses_to_max_at_high_bits():
    post = _posterior("conv", (5, 5, 8, 12), 5)
    for bits in (6, 7, 8):
        for per_channel, axis in ((False, None), (True, -1)):
            best = best_range(post, bits, per_channel)
            full = symmetric_grid(post, bits, axis=axis)
            assert uncertainty_cost(post, best) <= uncertainty_cost(post, full)


def test_lloyd_levels_beat_gaussian_quantile_levels():
    from edgeq.quantizers import gaussian_quantile

    post = _posterior("fc", (400, 50), 6, "heavy")
    for bits in (2, 3):
        lloyd = lloyd_grid(post, bits, requant_bits=None)
        quant = levels_grid(gaussian_quantile(post.mu, bits)[1], bits, requant_bits=None)
        assert len(lloyd.levels) == 2**bits
        assert uncertainty_cost(post, lloyd) < uncertainty_cost(post, quant)


# ---------------------------------------------------------------- Pareto front vs brute force


def _instance(seed: int) -> tuple[dict[str, list[Option]], int, int]:
    """A random small planning problem: 3-5 layers x 4-7 options, at most 4000 plans; ram_base, ram_floor."""
    rng = np.random.default_rng(seed)
    while True:
        counts = rng.integers(4, 8, size=rng.integers(3, 6))
        if np.prod(counts) <= 4000:
            break
    grid = Grid("symmetric", 4, scale=(1.0,))
    tradeoff = seed % 2 == 0  # even seeds: cost falls as flash grows (like bits), so fronts are long
    opts = {}
    for j, k in enumerate(counts):
        name = f"l{j}"
        flash = rng.integers(50, 3000, size=k)
        if tradeoff:
            cost = 100 * np.exp(-flash / rng.uniform(300, 1500)) * rng.uniform(0.8, 1.25, size=k)
        else:
            cost = rng.exponential(10.0, size=k)
        opts[name] = [
            Option(
                name,
                4,
                "int8",
                grid,
                flash_bytes=int(flash[i]),
                ram_bytes=int(rng.choice([0, 100, 250, 400, 900])),
                cost=float(cost[i]),
                size=int(rng.integers(16, 5000)),
            )
            for i in range(k)
        ]
    return opts, int(rng.integers(0, 50)), int(rng.choice([0, 200]))


def _brute(opts, ram_base: int, ram_floor: int):
    """Every plan's (flash, ram, cost), and a mask of the Pareto-optimal ones, by exhaustion."""
    layers = list(opts.values())
    combos = np.array(list(itertools.product(*[range(len(o)) for o in layers])))
    f = sum(np.array([o.flash_bytes for o in layer])[combos[:, j]] for j, layer in enumerate(layers))
    r = ram_base + np.maximum(
        ram_floor,
        np.max([np.array([o.ram_bytes for o in layer])[combos[:, j]] for j, layer in enumerate(layers)], 0),
    )
    c = sum(np.array([o.cost for o in layer])[combos[:, j]] for j, layer in enumerate(layers))
    le = (f[None, :] <= f[:, None]) & (r[None, :] <= r[:, None]) & (c[None, :] <= c[:, None])
    lt = (f[None, :] < f[:, None]) | (r[None, :] < r[:, None]) | (c[None, :] < c[:, None])
    pareto = ~np.any(le & lt, axis=1)
    return f, r, c, pareto


@pytest.mark.parametrize("seed", range(8))
def test_front_matches_brute_force(seed):
    opts, ram_base, ram_floor = _instance(seed)
    f, r, c, pareto = _brute(opts, ram_base, ram_floor)
    # resolution 1 B: the DP is exact, the front is the brute-force front.
    front = pareto_front(opts, resolution=1, ram_base=ram_base, ram_floor=ram_floor)
    got = {(p.flash, p.ram, round(p.cost, 9)) for p in front}
    want = {
        (int(a), int(b), round(float(z), 9)) for a, b, z in zip(f[pareto], r[pareto], c[pareto], strict=True)
    }
    assert got == want
    # A coarse resolution: every brute-force Pareto point is matched within one bucket of flash.
    res = 97
    front = pareto_front(opts, resolution=res, ram_base=ram_base, ram_floor=ram_floor)
    pf = np.array([p.flash for p in front])
    pr = np.array([p.ram for p in front])
    pc = np.array([p.cost for p in front])
    for a, b, z in zip(f[pareto], r[pareto], c[pareto], strict=True):
        assert np.any((pf < a + res) & (pr <= b) & (pc <= z + 1e-9)), (a, b, z)
    for p in front:  # each plan's figures are its options', and no plan on the front beats another
        assert p == make_plan(p.options, ram_base=ram_base, ram_floor=ram_floor)
        assert not np.any(
            (pf <= p.flash) & (pr <= p.ram) & (pc <= p.cost) & ((pf < p.flash) | (pr < p.ram) | (pc < p.cost))
        )


@pytest.mark.parametrize("seed", range(8))
def test_choose_within_budgets_vs_brute_force(seed):
    opts, ram_base, ram_floor = _instance(100 + seed)
    f, r, c, _ = _brute(opts, ram_base, ram_floor)
    res = 61
    exact = pareto_front(opts, resolution=1, ram_base=ram_base, ram_floor=ram_floor)
    coarse = pareto_front(opts, resolution=res, ram_base=ram_base, ram_floor=ram_floor)
    rng = np.random.default_rng(seed)
    for fb, rb in zip(
        rng.integers(f.min() - 20, f.max() + 20, 40), rng.choice(np.unique(r), 40), strict=True
    ):
        ok = (f <= fb) & (r <= rb)
        if not ok.any():
            with pytest.raises(PlanError, match="no plan fits"):
                choose(coarse, int(fb), int(rb))
            continue
        p = choose(exact, int(fb), int(rb))
        assert p.flash <= fb and p.ram <= rb and p.cost == pytest.approx(c[ok].min(), rel=1e-12)
        q = choose(coarse, int(fb), int(rb))  # found whenever a plan fits; optimal up to one bucket
        assert q.flash <= fb and q.ram <= rb
        tight = (f <= fb - res) & (r <= rb)
        if tight.any():
            assert q.cost <= c[tight].min() + 1e-9


def test_more_budget_never_raises_the_chosen_cost():
    opts, ram_base, ram_floor = _instance(7)
    front = pareto_front(opts, ram_base=ram_base, ram_floor=ram_floor)
    flashes = np.linspace(front[0].flash, front[-1].flash + 10, 60).astype(int)
    for rb in sorted({p.ram for p in front}) + [None]:
        costs = [
            choose(front, int(fb), rb).cost
            for fb in flashes
            if any(p.flash <= fb and (rb is None or p.ram <= rb) for p in front)
        ]
        assert all(b <= a for a, b in zip(costs, costs[1:], strict=False))
    by_ram = [choose(front, None, rb).cost for rb in sorted({p.ram for p in front})]
    assert all(b <= a for a, b in zip(by_ram, by_ram[1:], strict=False))


# ---------------------------------------------------------------- options, uniform budget, BitPlan


@pytest.fixture(scope="module")
def lenet_like():
    """Small conv/dense posteriors, their options under the stand-in byte cost."""
    posts = [
        _posterior("conv1", (5, 5, 1, 8), 10),
        _posterior("conv2", (5, 5, 8, 16), 11),
        _posterior("fc1", (256, 64), 12),
        _posterior("fc2", (64, 10), 13),
    ]
    opts = model_options(posts, standin_byte_cost, channel_axis={"conv1": -1, "conv2": -1}, lut_levels=True)
    return posts, opts


def test_layer_options_cover_every_storage_and_share_grids(lenet_like):
    posts, opts = lenet_like
    for p in posts:
        o = opts[p.name]
        for storage, bits in STORAGE_BITS.items():
            assert {x.bits for x in o if x.storage == storage} == set(bits)
        sym = {(x.bits, x.storage): x for x in o if x.grid.kind == "symmetric"}
        assert sym[(3, "int8")].grid == sym[(3, "int4")].grid == sym[(3, "lut")].grid
        assert sym[(3, "int8")].cost == sym[(3, "lut")].cost == uncertainty_cost(p, sym[(3, "int8")].grid)
        assert sym[(3, "int8")].grid.per_channel == p.name.startswith("conv")
        assert all(x.size == p.size for x in o)


def test_plan_for_target_beats_the_uniform_plan_in_its_flash(lenet_like):
    posts, opts = lenet_like
    for bits in (2, 3, 4):
        budget = flash_of_uniform(opts, bits)
        uni = make_plan(
            min((o for o in opts[p.name] if o.bits == bits), key=lambda o: o.flash_bytes) for p in posts
        )
        assert uni.flash == budget
        plan = plan_for_target(opts, bits)
        assert plan.flash <= budget and plan.cost <= uni.cost
    f3, f4 = flash_of_uniform(opts, 3), flash_of_uniform(opts, 4)
    assert flash_of_uniform(opts, 3.5) == (f3 + f4) // 2
    assert flash_of_uniform(opts, 4, storage="int8") == sum(
        min(o.flash_bytes for o in v if o.bits == 4 and o.storage == "int8") for v in opts.values()
    )
    with pytest.raises(PlanError, match="no 8-bit int4 option"):
        flash_of_uniform(opts, 8, storage="int4")


def test_to_bitplan_round_trips(lenet_like):
    posts, opts = lenet_like
    front = pareto_front(opts, ram_base=512, ram_floor=1000)
    for plan in (front[0], front[len(front) // 2], front[-1]):
        bp = plan.to_bitplan()
        again = BitPlan.from_dict(json.loads(json.dumps(bp.to_dict())))
        assert plan_from_bitplan(again, opts, ram_base=512, ram_floor=1000) == plan
        sizes = {p.name: p.size for p in posts}
        assert again.bits == plan.bits and again.mean_bits(sizes) == pytest.approx(plan.mean_bits)
        for name, o in plan.layers.items():
            lb = again.layers[name]
            if o.grid.kind == "symmetric":
                assert (
                    lb.quantizer == "uniform" and lb.hi == pytest.approx(float(o.grid.clip.max())) == -lb.lo
                )
            else:
                assert lb.quantizer == "lloyd_max" and lb.levels == o.grid.levels
            assert again.meta["planner"]["layers"][name]["storage"] == o.storage


# ---------------------------------------------------------------- errors and boundaries


def test_bad_inputs_say_what_to_do():
    g = Grid("symmetric", 4, scale=(1.0,))
    with pytest.raises(PlanError, match="differ from its grid"):
        Option("a", 3, "int8", g, 10, 0, 1.0, 8)
    with pytest.raises(PlanError, match="needs bits >= 2"):
        Grid("symmetric", 1, scale=(1.0,))
    with pytest.raises(PlanError, match="no layers"):
        pareto_front({})
    opts = {n: [Option(n, 4, "int8", g, f, 0, 10.0 / f, 8) for f in (100, 10_000_000)] for n in "ab"}
    with pytest.raises(PlanError, match="pass resolution >= "):
        pareto_front(opts, resolution=1, max_buckets=1000)
    assert len(pareto_front(opts)) == 3  # default resolution: both small, one big, both big
    post = _posterior("c", (3, 3, 2, 4), 0)
    with pytest.raises(PlanError, match="4 scales for 2 channels"):
        uncertainty_cost(post, Grid("symmetric", 3, scale=(1.0,) * 4, axis=2))


def test_planner_imports_no_tensorflow():
    code = "import sys, edgeq.planner; sys.exit('tensorflow' in sys.modules or 'deploy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
