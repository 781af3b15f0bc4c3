"""The posterior of one layer's kernel: the value handed from Bayesian training to allocation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.errors import PosteriorError


@dataclass(frozen=True)
class LayerPosterior:
    """Mean-field Gaussian posterior N(mu, sigma) of one layer's kernel, named as in the float model."""

    name: str
    mu: np.ndarray
    sigma: np.ndarray

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if mu.shape != sigma.shape:
            raise PosteriorError(
                f"layer {self.name!r}: mu shape {mu.shape} != sigma shape {sigma.shape}; "
                "pass mu and sigma of the same kernel"
            )
        if mu.size == 0:
            raise PosteriorError(f"layer {self.name!r} has no weights; drop it from the posteriors")
        if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
            raise PosteriorError(
                f"layer {self.name!r} has non-finite mu or sigma; retrain the Bayesian model "
                "(lower the learning rate or the KL weight)"
            )
        if np.any(sigma <= 0):
            raise PosteriorError(
                f"layer {self.name!r} has sigma <= 0; sigma must be positive "
                "(use a softplus-parameterised scale)"
            )
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def size(self) -> int:
        """Number of weights in the kernel."""
        return int(self.mu.size)


def check_posteriors(posteriors: list[LayerPosterior]) -> None:
    """Raise unless posteriors is a non-empty list with unique layer names."""
    if not posteriors:
        raise PosteriorError("no posteriors given; train a Bayesian twin with edgeq.bayes first")
    names = [p.name for p in posteriors]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise PosteriorError(f"duplicate layer names in posteriors: {sorted(dup)}; names must be unique")
