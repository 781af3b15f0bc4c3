"""Keras callbacks: edgeq inside a user's own model.fit (informativeness, bit allocation, KL annealing).

For pruning, use TF-MOT's own callbacks beside these: `tfmot.sparsity.keras.UpdatePruningStep()` (required
when fitting a model from edgeq.prune.prune_model) and `PruningSummaries(log_dir)` for TensorBoard.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tf_keras as keras

import edgeq  # noqa: F401  (TF_USE_LEGACY_KERAS before tf_keras loads)
from edgeq import bayes
from edgeq.errors import ModelError
from edgeq.informativeness import layer_informativeness
from edgeq.plan import BitPlan


def _require_bayesian(model: keras.Model, who: str) -> None:
    if not any(bayes.is_variational(lyr) for lyr in model.layers):
        raise ModelError(
            f"{who} needs a Bayesian model with variational layers; wrap yours with edgeq.bayes.to_bayesian"
        )


class InformativenessMonitor(keras.callbacks.Callback):
    """Logs each layer's informativeness and the bits Quantile Inform would give it, every epoch."""

    def __init__(self, target_bits: float = 4.0, log_dir: str | Path | None = None, aggregate: str = "mean"):
        super().__init__()
        self.target_bits = target_bits
        self.aggregate = aggregate
        self.log_dir = None if log_dir is None else str(log_dir)
        self.history: list[dict[str, float]] = []
        self._writer = None

    def on_train_begin(self, logs=None):
        _require_bayesian(self.model, "InformativenessMonitor")
        if self.log_dir is not None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_end(self, epoch, logs=None):
        from edgeq.allocate import quantile_inform

        posts = bayes.posteriors(self.model)
        info = layer_informativeness(posts, aggregate=self.aggregate)
        bits = quantile_inform(posts, self.target_bits).bits
        row = {f"info/{n}": float(v) for n, v in info.items()} | {
            f"bits/{n}": float(b) for n, b in bits.items()
        }
        self.history.append(row)
        if logs is not None:
            logs.update(row)
        if self._writer is not None:
            import tensorflow as tf

            with self._writer.as_default(step=epoch):
                for k, v in row.items():
                    tf.summary.scalar(k, v)
            self._writer.flush()


# The methods of edgeq.allocators that need only the posteriors (bb trains gates on the float model).
POSTERIOR_METHODS = ("qiu", "qinu", "rb")


class BitAllocation(keras.callbacks.Callback):
    """Computes the BitPlan from the model's posteriors at the end of training (or after a given epoch)."""

    def __init__(
        self,
        target_bits: float,
        method: str = "qiu",
        at: str | int = "train_end",
        path: str | Path | None = None,
        **allocate_kwargs,
    ):
        super().__init__()
        if method not in POSTERIOR_METHODS:
            raise ModelError(
                f"BitAllocation method {method!r}: use qiu or qinu (Quantile Inform, uniform or quantile "
                "grid) or rb (Random Bits); the other methods of edgeq.allocators need the float model too"
            )
        self.target_bits, self.method, self.at = target_bits, method, at
        self.path = None if path is None else Path(path)
        self.kwargs = allocate_kwargs
        self.plan: BitPlan | None = None

    def on_train_begin(self, logs=None):
        _require_bayesian(self.model, "BitAllocation")

    def _allocate(self) -> None:
        from edgeq import allocate

        posts = bayes.posteriors(self.model)
        if self.method == "rb":
            self.plan = allocate.random_bits(posts, self.target_bits, **self.kwargs)
        else:
            quantizer = "uniform" if self.method == "qiu" else "quantile"
            self.plan = allocate.quantile_inform(posts, self.target_bits, quantizer=quantizer, **self.kwargs)
        if self.path is not None:
            self.plan.save(self.path)

    def on_epoch_end(self, epoch, logs=None):
        if self.at == epoch:
            self._allocate()

    def on_train_end(self, logs=None):
        if self.at == "train_end":
            self._allocate()


class KLWeight(keras.callbacks.Callback):
    """Anneals the KL term: schedule(epoch) -> weight in [0, 1], set before each epoch."""

    def __init__(self, schedule: Callable[[int], float]):
        super().__init__()
        self.schedule = schedule
        self.values: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        var = bayes.kl_weight(self.model)
        value = float(self.schedule(epoch))
        var.assign(value)
        self.values.append(value)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["kl_weight"] = self.values[-1]


def linear_warmup(epochs: int) -> Callable[[int], float]:
    """A KL schedule that rises linearly from 1/epochs to 1 over `epochs` epochs, then stays at 1."""
    return lambda epoch: min(1.0, (epoch + 1) / max(1, epochs))
