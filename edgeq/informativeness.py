"""Informativeness |mu|/sigma of Bayesian weights, per weight and aggregated per layer (paper eqs. 2, 15)."""

from __future__ import annotations

import numpy as np

from edgeq.errors import PlanError, PosteriorError
from edgeq.posterior import LayerPosterior, check_posteriors

AGGREGATES = ("mean", "entropy")


def info(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Per-weight informativeness |mu| / sigma, same shape as mu."""
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.shape != sigma.shape:
        raise PosteriorError(f"mu shape {mu.shape} != sigma shape {sigma.shape}; pass one kernel's mu, sigma")
    if np.any(~(sigma > 0)):
        raise PosteriorError("sigma must be positive and finite; use a softplus-parameterised scale")
    return np.abs(mu) / sigma


def _entropy_informativeness(values: np.ndarray) -> float:
    """1 - H(p) / log(n) for p = values / sum(values) (paper eq. 15)."""
    n = values.size
    total = values.sum()
    # A single weight has no spread to measure, and an all-zero layer is maximally uninformative:
    # both get 0 rather than 0/0.
    if n < 2 or total <= 0:
        return 0.0
    p = values / total
    nz = p[p > 0]  # 0 log 0 = 0
    h = -np.sum(nz * np.log(nz))
    return float(1.0 - h / np.log(n))


def layer_informativeness(posteriors: list[LayerPosterior], aggregate: str = "mean") -> dict[str, float]:
    """Layer name -> aggregated informativeness: mean of |mu|/sigma (eq. 2) or normalised entropy (eq. 15)."""
    if aggregate not in AGGREGATES:
        raise PlanError(
            f"unknown informativeness aggregate {aggregate!r}; use one of {', '.join(AGGREGATES)}"
        )
    check_posteriors(posteriors)
    out: dict[str, float] = {}
    for p in posteriors:
        values = info(p.mu, p.sigma).ravel()
        out[p.name] = float(values.mean()) if aggregate == "mean" else _entropy_informativeness(values)
    return out
