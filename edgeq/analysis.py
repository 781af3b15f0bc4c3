"""The paper's Figure 1, testable: per-layer quantization sensitivity and its R^2 with informativeness."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeq.errors import ModelError
from edgeq.informativeness import layer_informativeness
from edgeq.plan import LayerBits
from edgeq.posterior import LayerPosterior
from edgeq.quantizers import quantize


@dataclass(frozen=True)
class Sensitivity:
    """Accuracy with one layer quantized at a time, and the bits each layer needs."""

    layers: list[str]
    bits: list[int]
    accuracy: np.ndarray  # [layer, bits]: accuracy with only that layer quantized to that many bits
    baseline: float
    optimal_bits: dict[str, int]  # fewest bits whose accuracy drop stays within the tolerance
    informativeness: dict[str, float] | None = None
    r2: float | None = None  # R^2 of the linear fit optimal_bits ~ informativeness


def _accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(model.predict(x, verbose=0, batch_size=512).argmax(1) == y))


def r_squared(x: Sequence[float], y: Sequence[float]) -> float:
    """Coefficient of determination of the least-squares line y ~ a x + b."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    a, b = np.polyfit(x, y, 1)
    resid = y - (a * x + b)
    return float(1.0 - np.sum(resid**2) / np.sum((y - y.mean()) ** 2))


def sensitivity(
    model,
    data: tuple[np.ndarray, np.ndarray],
    layers: Sequence[str] | None = None,
    bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    *,
    tolerance: float = 0.005,
    posteriors: list[LayerPosterior] | None = None,
    aggregate: str = "mean",
) -> Sensitivity:
    """Quantize one layer at a time (uniform on its P5-P95 range), record the accuracy, restore the model.

    With posteriors, also the R^2 between layer informativeness and the sensitivity-optimal bits
    (the paper reports 0.82-0.87 against bits found by Bayesian optimisation).
    """
    from edgeq.layers import weight_layers

    x, y = data
    names = list(layers) if layers is not None else list(weight_layers(model))
    missing = [n for n in names if n not in {lyr.name for lyr in model.layers}]
    if missing:
        raise ModelError(f"sensitivity: model {model.name!r} has no layers {missing}")
    bits = sorted(int(b) for b in bits)
    baseline = _accuracy(model, x, y)
    acc = np.zeros((len(names), len(bits)))
    for i, name in enumerate(names):
        layer = model.get_layer(name)
        original = layer.get_weights()
        # The range is given explicitly: a grid may have more levels than a small layer has weights.
        lo, hi = np.percentile(original[0], [5, 95])
        for j, b in enumerate(bits):
            q = quantize(original[0], LayerBits(b, "uniform", float(lo), float(hi)))
            layer.set_weights([q.astype(original[0].dtype), *original[1:]])
            acc[i, j] = _accuracy(model, x, y)
        layer.set_weights(original)
    optimal = {}
    for i, name in enumerate(names):
        ok = [b for j, b in enumerate(bits) if baseline - acc[i, j] <= tolerance]
        optimal[name] = ok[0] if ok else bits[-1]
    info = r2 = None
    if posteriors is not None:
        info = layer_informativeness([p for p in posteriors if p.name in names], aggregate)
        r2 = r_squared([info[n] for n in names if n in info], [optimal[n] for n in names if n in info])
    return Sensitivity(names, bits, acc, baseline, optimal, info, r2)
