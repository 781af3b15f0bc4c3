"""Bit allocation: Quantile Inform (QIU/QINU), Random Bits (RB) and the uniform baseline, as BitPlans."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edgeq.errors import PlanError
from edgeq.informativeness import info, layer_informativeness
from edgeq.plan import BitPlan, LayerBits
from edgeq.posterior import LayerPosterior, check_posteriors
from edgeq.quantizers import _uniform_grid, gaussian_quantile

QI_QUANTIZERS = ("uniform", "quantile")


def _max_bits_for(size: int) -> int:
    """The most bits a layer of `size` weights can fill: floor(log2(size))."""
    return int(size).bit_length() - 1


def _check_range(target_bits: float, min_bits: int, max_bits: int) -> None:
    """Raise unless 1 <= min_bits <= target_bits <= max_bits."""
    if int(min_bits) != min_bits or int(max_bits) != max_bits or not 1 <= min_bits <= max_bits <= 32:
        raise PlanError(
            f"min_bits={min_bits}, max_bits={max_bits}: need integers with 1 <= min_bits <= max_bits <= 32"
        )
    if not (np.isfinite(target_bits) and min_bits <= target_bits <= max_bits):
        raise PlanError(
            f"target_bits={target_bits} is outside [min_bits, max_bits] = [{min_bits}, {max_bits}]; "
            "pick a target in that range or widen it"
        )


def _caps(posteriors: list[LayerPosterior], min_bits: int, max_bits: int) -> np.ndarray:
    """Per-layer highest allowed bit width: max_bits, lowered so that 2**bits never exceeds the layer size."""
    caps = np.array([min(max_bits, _max_bits_for(p.size)) for p in posteriors], dtype=np.int64)
    for p, cap in zip(posteriors, caps, strict=True):
        if cap < min_bits:
            raise PlanError(
                f"layer {p.name!r} has {p.size} weights, fewer than 2**min_bits = {2**min_bits}; "
                f"lower min_bits to {max(cap, 1)} or leave the layer out of the posteriors"
            )
    return caps


def _check_size(name: str, size: int, bits: int) -> None:
    """Raise unless a layer of `size` weights can fill a `bits`-bit grid."""
    if size < 2**bits:
        raise PlanError(
            f"layer {name!r} has {size} weights, fewer than 2**{bits} = {2**bits}; "
            f"give it at most {_max_bits_for(size)} bits or leave it out of the plan"
        )


def _p5_p95(mu: np.ndarray) -> tuple[float, float]:
    """The paper's default quantization interval [P5, P95] of the means."""
    lo, hi = np.percentile(mu, [5, 95])
    return float(lo), float(hi)


def _layer_bits(
    p: LayerPosterior,
    bits: int,
    quantizer: str,
    informativeness: float,
    lo_hi: tuple[float, float] | None = None,
) -> LayerBits:
    """A LayerBits that fully describes the layer's grid (lo/hi for uniform, levels for quantile)."""
    if quantizer == "quantile":
        levels = gaussian_quantile(p.mu, bits)[1]
        return LayerBits(bits, "quantile", levels=tuple(levels), informativeness=informativeness)
    lo, hi = _p5_p95(p.mu) if lo_hi is None else lo_hi
    return LayerBits(bits, "uniform", lo=lo, hi=hi, informativeness=informativeness)


def quantile_inform(
    posteriors: list[LayerPosterior],
    target_bits: float,
    *,
    min_bits: int = 2,
    max_bits: int = 8,
    aggregate: str = "mean",
    quantizer: str = "uniform",
    pin: Mapping[str, int] | None = None,
) -> BitPlan:
    """Quantile Inform: bits from thresholds on sqrt-normalised informativeness; largest mean <= target."""
    check_posteriors(posteriors)
    _check_range(target_bits, min_bits, max_bits)
    if quantizer not in QI_QUANTIZERS:
        raise PlanError(f"Quantile Inform quantizer {quantizer!r}; use one of {', '.join(QI_QUANTIZERS)}")
    scores = layer_informativeness(posteriors, aggregate=aggregate)
    names = [p.name for p in posteriors]
    sizes = np.array([p.size for p in posteriors], dtype=np.int64)
    pin = {} if pin is None else dict(pin)
    missing = sorted(n for n in pin if n not in names)
    if missing:
        raise PlanError(f"pin names layers {missing} that are not in the posteriors; pin only {names}")
    for p in posteriors:
        if p.name in pin:
            b = pin[p.name]
            if int(b) != b or b < 1:
                raise PlanError(f"pin for layer {p.name!r} is {b!r}; pin an integer number of bits >= 1")
            _check_size(p.name, p.size, int(b))
    free = [i for i, n in enumerate(names) if n not in pin]
    caps = _caps([posteriors[i] for i in free], min_bits, max_bits)
    total = int(sizes.sum())
    pinned_total = sum(int(pin[n]) * int(sizes[i]) for i, n in enumerate(names) if n in pin)
    free_sizes = sizes[free]
    budget = target_bits * total * (1 + 1e-12)  # float slack so a target equal to a plan's mean admits it
    min_total = pinned_total + min_bits * int(free_sizes.sum())
    if min_total > budget:
        raise PlanError(
            f"no plan meets target_bits={target_bits}: the smallest reachable mean is "
            f"{min_total / total:.4f} "
            f"(every unpinned layer at min_bits={min_bits}); raise the target, lower min_bits or the pins"
        )

    k = max_bits - min_bits + 1
    meta: dict = {
        "target_bits": float(target_bits),
        "min_bits": min_bits,
        "max_bits": max_bits,
        "aggregate": aggregate,
        "pin": {n: int(b) for n, b in pin.items()},
    }
    bits_free = np.zeros(0, dtype=np.int64)
    if free:
        score = np.array([scores[names[i]] for i in free])
        span = score.max() - score.min()
        # Scores equal up to float noise count as equal: normalising noise would invent an order.
        equal = span <= 1e-9 * max(abs(score.max()), abs(score.min()), 1e-300)
        r = np.ones_like(score) if equal else np.sqrt((score - score.min()) / span)
        # Thresholds factor * i / k (i = 1..k-1): a layer sits in interval n = min(k-1, floor(r / delta))
        # with delta = factor / k. The assignment only changes where delta crosses r_j / n, so one delta
        # between each pair of neighbouring breakpoints (plus one beyond each end) covers every plan.
        if k > 1:
            bp = np.unique((r[:, None] / np.arange(1, k)[None, :])[r > 0].ravel())
        else:
            bp = np.zeros(0)
        if bp.size:
            deltas = np.concatenate([[2 * bp[-1]], (bp[1:] + bp[:-1])[::-1] / 2, [bp[0] / 2]])
        else:
            deltas = np.array([1.0])
        n = np.minimum(k - 1, np.floor(r[None, :] / deltas[:, None])).astype(np.int64)  # (D, F)
        b_inits = np.arange(min_bits - (k - 1), max_bits + 1)
        bits = np.clip(b_inits[:, None, None] + n[None], min_bits, caps[None, None, :])  # (B, D, F)
        bits = bits.reshape(-1, len(free))
        tot = bits @ free_sizes + pinned_total
        feasible = tot <= budget
        best = tot[feasible].max()  # all-min_bits is always in the family, and feasible (checked above)
        cand = np.flatnonzero(feasible & (tot == best))
        # Ties: more bits to more informative layers (lexicographic, most informative layer first).
        order = np.argsort(-r, kind="stable")
        keys = bits[cand][:, order].T[::-1]
        pick = cand[np.lexsort(keys)[-1]]
        bits_free = bits[pick]
        b_idx, d_idx = divmod(int(pick), deltas.size)
        meta |= {"b_init": int(b_inits[b_idx]), "factor": float(deltas[d_idx] * k)}

    plan_bits = {n: int(pin[n]) for n in pin}
    plan_bits |= {names[i]: int(b) for i, b in zip(free, bits_free, strict=True)}
    layers = {p.name: _layer_bits(p, plan_bits[p.name], quantizer, scores[p.name]) for p in posteriors}
    sizes = {p.name: p.size for p in posteriors}
    meta["mean_bits"] = BitPlan(layers).mean_bits(sizes)
    return BitPlan(layers, method="qiu" if quantizer == "uniform" else "qinu", meta=meta)


def _softmax(phi: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the allowed entries; disallowed entries get probability exactly 0."""
    z = np.where(mask, phi, -np.inf)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _rb_loss_grad(
    phi: np.ndarray,
    tau: np.ndarray,
    grid: np.ndarray,
    mask: np.ndarray,
    frac: np.ndarray,
    target: float,
    eta: float,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Random Bits loss sum tau*P + eta (E[b_mean] - target)^2, its gradient in phi, and P."""
    p = _softmax(phi, mask)
    mean = float(frac @ (p @ grid))
    loss = float(np.sum(tau * p)) + eta * (mean - target) ** 2
    g_p = tau + 2 * eta * (mean - target) * frac[:, None] * grid[None, :]
    g_phi = p * (g_p - np.sum(p * g_p, axis=1, keepdims=True))  # softmax Jacobian, row by row
    return loss, g_phi, p


def _layer_error(mu: np.ndarray, w: np.ndarray, bits: int, lo: float, hi: float) -> float:
    """sum_w c(w) (Q(mu_w, bits) - mu_w)^2 / sigma_w^2 for one layer, with w = c / sigma^2."""
    q = _uniform_grid(mu, bits, lo, hi)[0]
    return float(w @ (q - mu) ** 2)


def _errors(
    mus: list[np.ndarray], ws: list[np.ndarray], bits: np.ndarray, alpha: np.ndarray, beta: np.ndarray
) -> np.ndarray:
    """Per-layer error T_j at each layer's own bit width (the terms of the paper's eq. 12)."""
    rows = zip(mus, ws, bits, alpha, beta, strict=True)
    return np.array([_layer_error(mu, w, int(b), a, z) for mu, w, b, a, z in rows])


def _tau(
    mus: list[np.ndarray],
    ws: list[np.ndarray],
    alpha: np.ndarray,
    beta: np.ndarray,
    grid: np.ndarray,
    mask: np.ndarray,
) -> np.ndarray:
    """tau[j, i]: layer j's informativeness-weighted error at bit width grid[i] (0 where not allowed)."""
    tau = np.zeros(mask.shape)
    for j, (mu, w) in enumerate(zip(mus, ws, strict=True)):
        for i, b in enumerate(grid):
            if mask[j, i]:
                tau[j, i] = _layer_error(mu, w, int(b), alpha[j], beta[j])
    return tau


def random_bits(
    posteriors: list[LayerPosterior],
    target_bits: float,
    *,
    min_bits: int = 1,
    max_bits: int = 8,
    epochs: int = 1000,
    lr: float = 1e-2,
    eta: float = 3e3,
    boundary_steps: int = 20,
    boundary_lr: float = 1e-4,
    seed: int = 0,
) -> BitPlan:
    """Random Bits: softmax bit distributions trained with Adam on eq. 9, rounded, then interval learning."""
    check_posteriors(posteriors)
    _check_range(target_bits, min_bits, max_bits)
    if int(epochs) != epochs or epochs < 0 or int(boundary_steps) != boundary_steps or boundary_steps < 0:
        raise PlanError(f"epochs={epochs}, boundary_steps={boundary_steps}: both must be integers >= 0")
    if not (lr > 0 and eta >= 0 and boundary_lr > 0):
        raise PlanError(
            f"lr={lr}, eta={eta}, boundary_lr={boundary_lr}: need lr > 0, eta >= 0 and boundary_lr > 0"
        )
    caps = _caps(posteriors, min_bits, max_bits)
    grid = np.arange(min_bits, max_bits + 1, dtype=np.float64)
    mask = grid[None, :] <= caps[:, None]
    sizes = np.array([p.size for p in posteriors], dtype=np.int64)
    frac = sizes / sizes.sum()

    mus = [p.mu.ravel() for p in posteriors]
    ws = []
    for p in posteriors:
        inf_w = info(p.mu, p.sigma).ravel()
        s = inf_w.sum()
        c = inf_w / s if s > 0 else np.full(inf_w.size, 1.0 / inf_w.size)  # all-zero means: equal weights
        ws.append(c / p.sigma.ravel() ** 2)
    bounds = np.array([_p5_p95(mu) for mu in mus])
    alpha, beta = bounds[:, 0].copy(), bounds[:, 1].copy()
    tau = _tau(mus, ws, alpha, beta, grid, mask)

    # Adam over the N x (bit widths) logits; the weights are only touched through tau.
    rng = np.random.default_rng(seed)
    phi = rng.normal(0.0, 0.1, size=mask.shape)
    m1, m2 = np.zeros_like(phi), np.zeros_like(phi)
    b1, b2, eps = 0.9, 0.999, 1e-8
    loss = float("nan")
    for t in range(1, int(epochs) + 1):
        loss, g, _ = _rb_loss_grad(phi, tau, grid, mask, frac, target_bits, eta)
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b2 * m2 + (1 - b2) * g * g
        phi -= lr * (m1 / (1 - b1**t)) / (np.sqrt(m2 / (1 - b2**t)) + eps)
    loss, _, prob = _rb_loss_grad(phi, tau, grid, mask, frac, target_bits, eta)
    expected = prob @ grid
    bits = np.clip(np.floor(expected + 0.5), min_bits, caps).astype(np.int64)

    # Repair: rounding can overshoot the target. Take one bit at a time from the layer whose tau grows
    # least (ties: the larger layer, which saves more), until the mean fits. min_bits <= target makes
    # this always terminate with a feasible plan.
    budget = target_bits * sizes.sum() * (1 + 1e-12)
    col = bits - min_bits
    repaired: list[str] = []
    while int(bits @ sizes) > budget:
        can = bits > min_bits
        rows = np.flatnonzero(can)
        inc = tau[rows, col[rows] - 1] - tau[rows, col[rows]]
        j = rows[np.lexsort((-sizes[rows], inc))[0]]
        bits[j] -= 1
        col[j] -= 1
        repaired.append(posteriors[j].name)

    # Interval learning (paper eqs. 12-13), only when the rounded mean is below the target: the paper's
    # approximate gradient dT/dbeta = 2/(beta-alpha) T_j = -dT/dalpha. Each side moves at most a quarter of
    # the width per step (keeps alpha < beta), and each layer keeps the [alpha, beta] with the lowest T seen,
    # because the approximation ignores clipping and would otherwise shrink the interval without end.
    mean_bits = float(bits @ sizes / sizes.sum())
    err = _errors(mus, ws, bits, alpha, beta)
    err_start = err.copy()
    steps_done = 0
    if mean_bits < target_bits and boundary_steps > 0:
        best_a, best_b, best_err = alpha.copy(), beta.copy(), err.copy()
        active = beta > alpha
        for _ in range(int(boundary_steps)):
            width = beta - alpha
            grad = np.where(active, 2.0 / np.where(active, width, 1.0) * err, 0.0)
            step = np.minimum(boundary_lr * grad, 0.25 * width)
            beta, alpha = beta - step, alpha + step
            err = _errors(mus, ws, bits, alpha, beta)
            better = err < best_err
            best_a[better], best_b[better], best_err[better] = alpha[better], beta[better], err[better]
            steps_done += 1
        alpha, beta, err = best_a, best_b, best_err

    scores = layer_informativeness(posteriors)
    layers = {
        p.name: _layer_bits(p, int(b), "uniform", scores[p.name], (float(a), float(z)))
        for p, b, a, z in zip(posteriors, bits, alpha, beta, strict=True)
    }
    meta = {
        "target_bits": float(target_bits),
        "min_bits": min_bits,
        "max_bits": max_bits,
        "mean_bits": mean_bits,
        "seed": int(seed),
        "epochs": int(epochs),
        "lr": float(lr),
        "eta": float(eta),
        "loss": loss,
        "expected_bits": {p.name: float(e) for p, e in zip(posteriors, expected, strict=True)},
        "tau": {
            p.name: [float(v) for v in row[: int(c) - min_bits + 1]]
            for p, row, c in zip(posteriors, tau, caps, strict=True)
        },
        "repaired": repaired,
        "boundary_steps": steps_done,
        "boundary_error_before": {p.name: float(e) for p, e in zip(posteriors, err_start, strict=True)},
        "boundary_error_after": {p.name: float(e) for p, e in zip(posteriors, err, strict=True)},
    }
    return BitPlan(layers, method="rb", meta=meta)


def uniform_plan(
    posteriors_or_layers: Sequence[LayerPosterior] | Mapping[str, int] | Sequence[str], bits: int
) -> BitPlan:
    """The baseline: every layer at `bits`, uniform on [P5, P95] of mu when posteriors are given."""
    if int(bits) != bits or bits < 1:
        raise PlanError(f"bits must be an integer >= 1, got {bits!r}")
    bits = int(bits)
    src = posteriors_or_layers
    if not src:
        raise PlanError("uniform_plan got no layers; pass posteriors, a dict name -> size, or layer names")
    if isinstance(src, Mapping):
        for name, size in src.items():
            _check_size(name, int(size), bits)
        return BitPlan({n: LayerBits(bits) for n in src}, method="uniform", meta={"bits": bits})
    items = list(src)
    if all(isinstance(p, LayerPosterior) for p in items):
        check_posteriors(items)
        for p in items:
            _check_size(p.name, p.size, bits)
        scores = layer_informativeness(items)
        layers = {p.name: _layer_bits(p, bits, "uniform", scores[p.name]) for p in items}
        return BitPlan(layers, method="uniform", meta={"bits": bits})
    if all(isinstance(n, str) for n in items):
        if len(set(items)) != len(items):
            raise PlanError(f"duplicate layer names in {items}; name each layer once")
        return BitPlan({n: LayerBits(bits) for n in items}, method="uniform", meta={"bits": bits})
    raise PlanError("uniform_plan takes a list of LayerPosterior, a dict name -> size, or a list of names")
