"""edgeq.allocate: Quantile Inform, Random Bits and the uniform baseline against independent references."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.allocate import _rb_loss_grad, quantile_inform, random_bits, uniform_plan
from edgeq.errors import PlanError, PosteriorError
from edgeq.plan import BitPlan
from edgeq.posterior import LayerPosterior

Z125, Z25 = -1.1503493803760079, -0.6744897501960817  # standard normal quantiles from tables


def make_posts(sizes, ratios, seed=0):
    """Layers whose mean informativeness is exactly ratios[j] (|mu| = ratio * sigma, random signs)."""
    rng = np.random.default_rng(seed)
    posts = []
    for j, (n, r) in enumerate(zip(sizes, ratios, strict=True)):
        sigma = np.full(n, 0.02)
        mu = r * sigma * rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 1.5, n)
        mu *= r * n * 0.02 / np.abs(mu).sum()  # make mean(|mu|/sigma) exactly r
        posts.append(LayerPosterior(f"l{j}", mu, sigma))
    return posts


def lenet_like(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for name, n in [("conv1", 800), ("conv2", 6400), ("fc1", 20000), ("fc2", 1280)]:
        mu = rng.normal(0, 0.05, n)
        sigma = np.exp(rng.normal(np.log(0.02) + rng.normal(0, 0.4), 0.3, n))
        out.append(LayerPosterior(name, mu, sigma))
    return out


def sizes_of(posts):
    return {p.name: p.size for p in posts}


def qi_reference(scores, sizes, target, min_bits, max_bits):
    """Brute force over a fine grid of factors and every b_init, straight from the definition."""
    s = np.asarray(scores, float)
    sizes = np.asarray(sizes)
    r = np.sqrt((s - s.min()) / (s.max() - s.min())) if s.max() > s.min() else np.ones_like(s)
    k = max_bits - min_bits + 1
    factors = np.geomspace(1e-4, 1e3, 20000)
    thresholds = factors[:, None] * np.arange(1, k)[None, :] / k  # (F, k-1)
    interval = (r[None, :, None] >= thresholds[:, None, :]).sum(axis=2)  # (F, layers)
    best = -1.0
    for b0 in range(min_bits - k, max_bits + 1):
        means = np.clip(b0 + interval, min_bits, max_bits) @ sizes / sizes.sum()
        ok = means <= target + 1e-12
        if ok.any():
            best = max(best, means[ok].max())
    return best


def test_qi_hand_example_tie_prefers_informative():
    # two equal layers: (2, 4) and (3, 3) both reach mean 3; the informative layer gets the bits
    posts = make_posts([1000, 1000], [1.0, 5.0])
    plan = quantile_inform(posts, 3.0, min_bits=2, max_bits=4)
    assert plan.bits == {"l0": 2, "l1": 4}
    assert plan.method == "qiu" and plan.meta["mean_bits"] == 3.0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [2.3, 3.0, 3.7, 5.2])
def test_qi_matches_brute_force(seed, target):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(300, 3000, 5)
    ratios = rng.uniform(0.5, 5, 5)
    posts = make_posts(sizes, ratios, seed)
    plan = quantile_inform(posts, target, min_bits=2, max_bits=8)
    mean = plan.mean_bits(sizes_of(posts))
    assert mean <= target
    assert mean == pytest.approx(qi_reference(ratios, sizes, target, 2, 8))
    # monotone: a more informative layer never has fewer bits
    order = np.argsort(ratios)
    got = np.array([plan.bits[f"l{j}"] for j in order])
    assert np.all(np.diff(got) >= 0)


def test_qi_plan_describes_grid():
    posts = lenet_like()
    plan = quantile_inform(posts, 4.0)
    for p in posts:
        lb = plan.layers[p.name]
        assert (lb.lo, lb.hi) == pytest.approx(tuple(np.percentile(p.mu, [5, 95])))
        assert lb.informativeness == pytest.approx(np.mean(np.abs(p.mu) / p.sigma))
    assert BitPlan.from_dict(plan.to_dict()).bits == plan.bits


def test_qinu_levels_are_gaussian_quantiles():
    posts = lenet_like()
    plan = quantile_inform(posts, 3.0, quantizer="quantile")
    assert plan.method == "qinu"
    p = posts[0]
    lb = plan.layers[p.name]
    if lb.bits == 2:
        m, s = p.mu.mean(), p.mu.std()
        np.testing.assert_allclose(lb.levels, m + s * np.array([Z125, Z25 / 2, -Z25 / 2, -Z125]))
    assert len(lb.levels) == 2**lb.bits and lb.quantizer == "quantile"


def test_qi_equal_informativeness_gives_equal_bits():
    posts = make_posts([500, 700, 900], [2.0, 2.0, 2.0])
    assert set(quantile_inform(posts, 4.5).bits.values()) == {4}


def test_qi_entropy_aggregate():
    plan = quantile_inform(lenet_like(), 4.0, aggregate="entropy")
    assert plan.meta["aggregate"] == "entropy" and plan.mean_bits(sizes_of(lenet_like())) <= 4.0


def test_qi_pins_respected_and_counted():
    posts = lenet_like()
    plan = quantile_inform(posts, 4.0, pin={"conv1": 8, "fc2": 8})
    assert plan.bits["conv1"] == 8 and plan.bits["fc2"] == 8
    assert plan.mean_bits(sizes_of(posts)) <= 4.0


def test_qi_pins_that_cannot_be_met():
    posts = make_posts([1000, 1000], [1.0, 2.0])
    with pytest.raises(PlanError, match=r"smallest reachable mean is 5\.0000"):
        quantile_inform(posts, 3.0, pin={"l0": 8})


def test_qi_pin_missing_layer():
    with pytest.raises(PlanError, match="nope"):
        quantile_inform(lenet_like(), 4.0, pin={"nope": 8})


@pytest.mark.parametrize("target", [1.5, 8.5, float("nan")])
def test_qi_target_outside_range(target):
    with pytest.raises(PlanError, match="outside"):
        quantile_inform(lenet_like(), target)


def test_qi_bad_quantizer():
    with pytest.raises(PlanError, match="uniform, quantile"):
        quantile_inform(lenet_like(), 4.0, quantizer="lloyd")


def test_small_layer_capped_or_rejected():
    posts = make_posts([100, 5000], [9.0, 1.0])
    plan = quantile_inform(posts, 6.0, max_bits=8)
    assert plan.bits["l0"] <= 6  # 100 weights cannot fill a 7-bit grid
    tiny = make_posts([3, 5000], [9.0, 1.0])
    with pytest.raises(PlanError, match="'l0'.*3 weights"):
        quantile_inform(tiny, 4.0)
    with pytest.raises(PlanError, match="'l0'"):
        random_bits(tiny, 4.0, min_bits=2, epochs=5)


def test_empty_posteriors():
    for fn in (quantile_inform, random_bits):
        with pytest.raises(PosteriorError):
            fn([], 4.0)


def test_rb_tau_matches_formula():
    posts = make_posts([256, 512], [1.0, 3.0], seed=3)
    plan = random_bits(posts, 3.0, min_bits=1, max_bits=4, epochs=10, boundary_steps=0)
    for p in posts:
        c = (np.abs(p.mu) / p.sigma) / np.sum(np.abs(p.mu) / p.sigma)
        lo, hi = np.percentile(p.mu, [5, 95])
        want = []
        for b in range(1, 5):
            s = (hi - lo) / (2**b - 1)
            q = lo + s * np.clip(np.round((p.mu - lo) / s), 0, 2**b - 1)
            want.append(np.sum(c * (q - p.mu) ** 2 / p.sigma**2))
        np.testing.assert_allclose(plan.meta["tau"][p.name], want, rtol=1e-10)


def test_rb_loss_and_gradient():
    rng = np.random.default_rng(0)
    phi, tau = rng.normal(size=(3, 4)), rng.uniform(0, 2, (3, 4))
    grid, mask = np.arange(2.0, 6.0), np.ones((3, 4), bool)
    frac, target, eta = np.array([0.2, 0.3, 0.5]), 3.4, 7.0
    loss, grad, _ = _rb_loss_grad(phi, tau, grid, mask, frac, target, eta)
    p = np.exp(phi) / np.exp(phi).sum(1, keepdims=True)
    assert loss == pytest.approx(np.sum(tau * p) + eta * (frac @ (p @ grid) - target) ** 2)
    num = np.zeros_like(phi)
    for idx in np.ndindex(*phi.shape):  # central differences
        d = np.zeros_like(phi)
        d[idx] = 1e-6
        up = _rb_loss_grad(phi + d, tau, grid, mask, frac, target, eta)[0]
        dn = _rb_loss_grad(phi - d, tau, grid, mask, frac, target, eta)[0]
        num[idx] = (up - dn) / 2e-6
    np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("target", [2.0, 3.3, 4.0, 6.5])
def test_rb_respects_target_and_is_reproducible(target):
    posts = lenet_like()
    a = random_bits(posts, target, epochs=200)
    b = random_bits(posts, target, epochs=200)
    assert a.to_dict() == b.to_dict()
    assert a.method == "rb" and a.mean_bits(sizes_of(posts)) <= target
    assert all(1 <= v <= 8 for v in a.bits.values())


def test_rb_repair_takes_cheapest_bits():
    # eta = 0: nothing holds the mean, every layer drifts to max_bits and the repair must pull it down
    posts = make_posts([1000, 1000, 2000], [1.0, 2.0, 4.0], seed=1)
    plan = random_bits(posts, 3.0, min_bits=2, max_bits=5, eta=0.0, epochs=300, boundary_steps=0)
    assert plan.mean_bits(sizes_of(posts)) <= 3.0 and plan.meta["repaired"]
    # replay the greedy repair from the expected bits with the plan's own tau
    tau = {n: np.array(v) for n, v in plan.meta["tau"].items()}
    bits = {n: int(np.clip(np.floor(e + 0.5), 2, 5)) for n, e in plan.meta["expected_bits"].items()}
    sizes = sizes_of(posts)
    while sum(bits[n] * sizes[n] for n in bits) > 3.0 * sum(sizes.values()):
        inc = {n: tau[n][bits[n] - 3] - tau[n][bits[n] - 2] for n in bits if bits[n] > 2}
        n = min(inc, key=lambda k: (inc[k], -sizes[k]))
        bits[n] -= 1
    assert plan.bits == bits


def test_rb_boundary_learning_shrinks_overwide_interval():
    # uniform weights on [-1, 1]: the best 2-bit interval is [-0.75, 0.75], narrower than [P5, P95]
    rng = np.random.default_rng(0)
    post = LayerPosterior("u", rng.uniform(-1, 1, 4000), np.full(4000, 0.1))
    lo0, hi0 = np.percentile(post.mu, [5, 95])
    plan = random_bits([post], 2.5, min_bits=2, max_bits=3, epochs=10, boundary_lr=1e-3)
    lb = plan.layers["u"]
    assert lb.bits == 2 and plan.meta["boundary_steps"] == 20
    assert lo0 < lb.lo < lb.hi < hi0
    assert plan.meta["boundary_error_after"]["u"] < plan.meta["boundary_error_before"]["u"]


def test_rb_boundaries_never_worse():
    posts = lenet_like()
    plan = random_bits(posts, 3.5, epochs=200, boundary_lr=1e-2)
    for p in posts:
        lb = plan.layers[p.name]
        assert lb.lo < lb.hi
        assert plan.meta["boundary_error_after"][p.name] <= plan.meta["boundary_error_before"][p.name]


def test_rb_bad_input():
    with pytest.raises(PlanError, match="outside"):
        random_bits(lenet_like(), 9.0)
    with pytest.raises(PlanError, match="epochs"):
        random_bits(lenet_like(), 4.0, epochs=-1)


def test_uniform_plan_forms():
    posts = lenet_like()
    plan = uniform_plan(posts, 4)
    assert plan.method == "uniform" and set(plan.bits.values()) == {4}
    assert plan.layers["fc1"].lo == pytest.approx(np.percentile(posts[2].mu, 5))
    assert uniform_plan({"a": 100, "b": 50}, 3).bits == {"a": 3, "b": 3}
    assert uniform_plan(["a", "b"], 8).bits == {"a": 8, "b": 8}


def test_uniform_plan_bad_input():
    with pytest.raises(PlanError, match="'b' has 50 weights.*at most 5 bits"):
        uniform_plan({"a": 100, "b": 50}, 6)
    with pytest.raises(PlanError, match=">= 1"):
        uniform_plan(["a"], 0)
    with pytest.raises(PlanError, match="no layers"):
        uniform_plan([], 4)
    with pytest.raises(PlanError, match="duplicate"):
        uniform_plan(["a", "a"], 4)
