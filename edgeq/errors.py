"""Errors edgeq raises; the CLI prints their message on one line and exits 2."""

from __future__ import annotations


class EdgeqError(Exception):
    """Base class: the message says what was wrong and what to do."""


class PlanError(EdgeqError):
    """A bit plan or allocation request that cannot be satisfied."""


class PosteriorError(EdgeqError):
    """Posterior parameters that are not usable (non-finite, sigma <= 0, empty)."""


class ModelError(EdgeqError):
    """A Keras model edgeq cannot transform (unsupported layer, missing layer)."""


class DataError(EdgeqError):
    """A data set that cannot be loaded or has the wrong shape."""


class PipelineError(EdgeqError):
    """A pipeline file that does not exist or defines no pipeline."""
